"""The refusal pipeline: residual recovery in every projection mode, a soft-suffix baseline,
and the refusal metrics of the summary (PAPER_NOTES, the refusal row and "Metrics").

:func:`run_refusal` runs ``pipeline.recover`` for the residual modes (none / encoder / jacobian /
sketch) and then the ``"suffix"`` baseline on the same valid flips, in one run directory, and
adds per mode the non-refusal rate, the base-like rates (lenient and strict) with Wilson 95%
intervals, and the defended-feature drift Phi (``phi_relative_drift``) with a bootstrap interval.

The suffix baseline (an embedding-space soft suffix in the spirit of OABD-style attacks):
``n_suffix`` placeholder tokens are appended to the prompt, before the response, and a delta at
``blocks.0.hook_resid_pre`` restricted to those rows is optimized with the clamp active toward
the same target, unconstrained (mode "none"), under the same budget. A delta at the input of
block 0 at those rows is exactly a learned additive change of their input embeddings. Its
``phi_relative_drift`` is Phi over every clamped site, from the first suffix row on, against
the defended state of the same suffixed prompt, so the drift / recovery trade-off of residual
recovery and of suffixes can be read side by side.

:func:`toy_setting` builds the toy world's refusal setting (requests the base model answers,
refusal features by contrast at two or more sites, the mean-activation clamp).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .clamp import Clamp
from .defense import DefendedModel
from .pipeline import Flips, RunResult, _record, recover
from .projection import PROJECTIONS, defended_features
from .recovery import ExampleOutcome, RecoveryConfig
from .refusal_features import contrast_table, mean_activation_clamp, refusal_contrast, select_refusal_features
from .tasks.base import Examples, pad_right
from .tasks.refusal import Refusal

SUFFIX = "suffix"
REFUSAL_MODES = (*PROJECTIONS, SUFFIX)
SUFFIX_SITE = "blocks.0.hook_resid_pre"
#: Placeholder suffix tokens tried in order: the first that is one known token is used.
SUFFIX_PLACEHOLDERS = ("!", " !", ".", " .")
DEFAULT_TOY_SITES = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")


# --------------------------------------------------------------------------------------------
# the soft-suffix baseline


def placeholder_token(tokenizer: Any, token: str | int | None = None) -> int:
    """The suffix placeholder token id: ``token`` (an id or a one-token string), or the first
    of :data:`SUFFIX_PLACEHOLDERS` that is one known token (else the EOS token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(token, int) and not isinstance(token, bool):
        return int(token)
    for text in ([token] if token is not None else SUFFIX_PLACEHOLDERS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != unk:
            return int(ids[0])
    eos = getattr(tokenizer, "eos_token_id", None)
    if token is None and isinstance(eos, int):
        return eos  # a vocabulary without punctuation: the EOS token as placeholder
    raise ValueError(f"no one-token suffix placeholder among {token or SUFFIX_PLACEHOLDERS}; pass suffix_token=ID")


def suffix_examples(task: Refusal, ex: Examples, n_suffix: int, token_id: int) -> tuple[Examples, torch.Tensor]:
    """``ex`` with ``n_suffix`` copies of ``token_id`` inserted after each prompt, before the
    response. Returns (examples, suffix_start (n,)); ``prompt_len`` includes the suffix."""
    if n_suffix < 1:
        raise ValueError(f"n_suffix must be >= 1, got {n_suffix}")
    plen = ex.targets["prompt_len"].tolist()
    rlen = ex.targets["response_len"].tolist()
    seqs = []
    for i in range(len(ex)):
        row = ex.input_ids[i].tolist()
        p, r = int(plen[i]), int(rlen[i])
        seqs.append(row[:p] + [token_id] * n_suffix + row[p:p + r])
    ids, mask = pad_right(seqs, task._pad())
    prompt_len = torch.tensor(plen, dtype=torch.long) + n_suffix
    response_len = torch.tensor(rlen, dtype=torch.long)
    out = Examples(input_ids=ids, attention_mask=mask, answer_pos=prompt_len - 1, ids=list(ex.ids),
                   targets={"prompt_len": prompt_len, "response_len": response_len,
                            "weights": task.response_weights(prompt_len, response_len, ids.shape[1])},
                   meta=list(ex.meta))
    return out, torch.tensor(plen, dtype=torch.long)


def recover_suffix(
    defended: DefendedModel,
    task: Refusal,
    ex: Examples,
    *,
    cfg: RecoveryConfig,
    n_suffix: int = 8,
    token: str | int | None = None,
    lr: float | None = None,
    budget: float | None = None,
) -> list[ExampleOutcome]:
    """The soft-suffix baseline on ``ex`` (examples of ``task``), batched.

    Optimizes delta (n, seq, d_model) at ``blocks.0.hook_resid_pre``, non-zero only at the
    suffix rows, with Adam on ``task.loss`` (+ ``cfg.lambda_act`` x relative Phi drift, as the
    residual modes), the clamp active, for ``cfg.steps`` steps; C4 by rescaling to ``budget``
    (default ``cfg.budget``). Then judges with the clamp and the suffix delta active and
    measures ``phi_relative_drift`` / ``phi_floor_violation`` over every clamped site.
    """
    cfg.validate()
    model, clamp = defended.model, defended.clamp
    dev = model.device
    token_id = placeholder_token(task.tokenizer, token)
    sx, start = suffix_examples(task, ex, n_suffix, token_id)
    sx.validate()
    sx = sx.to(dev)
    n, seq = sx.input_ids.shape
    cols = torch.arange(seq, device=dev).unsqueeze(0)
    start = start.to(dev).unsqueeze(1)
    mask = (cols >= start) & (cols < start + n_suffix)
    phi_mask = sx.attention_mask.bool() & (cols >= start)
    order = {name: i for i, name in enumerate(model.site_names())}
    phi_sites = sorted((sc.site.hook_name for sc in clamp.site_clamps), key=order.__getitem__)
    lr = float(lr if lr is not None else cfg.lr)
    bud = float(budget if budget is not None else cfg.budget)
    torch.manual_seed(cfg.seed)

    with torch.no_grad():
        ref = defended.forward(sx, track=(*phi_sites, SUFFIX_SITE))
        phi_ref = defended_features(clamp, ref.sites, phi_sites, phi_mask)
        embed = ref.sites[SUFFIX_SITE].h_def.float()
        init_scores = task.judge(defended, sx, with_clamp=True, stage="suffix_init")
    phi_ref_norm = phi_ref.norm(dim=1)
    delta = torch.zeros(n, seq, model.d_model, device=dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr) if cfg.optimizer == "adam" else torch.optim.SGD([delta], lr=lr)
    histories: list[list[dict[str, float]]] = [[] for _ in range(n)]
    for step in range(cfg.steps):
        out = defended.forward(sx, {SUFFIX_SITE: delta}, reclamp=cfg.reclamp, track=tuple(phi_sites))
        loss_vec = task.loss(out.logits, sx)
        if cfg.lambda_act > 0:
            phi = defended_features(clamp, out.sites, phi_sites, phi_mask)
            loss_vec = loss_vec + cfg.lambda_act * (phi - phi_ref).norm(dim=1) / (phi_ref_norm + 1e-8)
        if cfg.lambda_delta > 0:
            loss_vec = loss_vec + cfg.lambda_delta * delta.pow(2).flatten(1).sum(1).sqrt()
        if not bool(torch.isfinite(loss_vec.detach()).all()):
            raise FloatingPointError(f"non-finite suffix loss at step {step}")
        (grad,) = torch.autograd.grad(loss_vec.sum(), [delta])
        delta.grad = grad * mask.unsqueeze(-1)
        opt.step()
        with torch.no_grad():
            delta.mul_(mask.unsqueeze(-1))
            norms = delta.flatten(1).norm(dim=1)
            scale = torch.where(norms > bud, bud / norms.clamp_min(1e-30), torch.ones_like(norms))
            delta.mul_(scale.view(n, 1, 1))  # C4
        if cfg.history:
            score = task.score(out.logits.detach(), sx).cpu()
            lv = loss_vec.detach().cpu()
            for i in range(n):
                histories[i].append({"step": step, "score": float(score[i]), "loss": float(lv[i]),
                                     "delta_norm": float(norms[i].clamp(max=bud))})

    with torch.no_grad():
        fixed = {SUFFIX_SITE: delta.detach()}
        final = defended.forward(sx, fixed, reclamp=cfg.reclamp, track=tuple(phi_sites))
        scores = task.judge(defended, sx, with_clamp=True, deltas=fixed, reclamp=cfg.reclamp).float().cpu()
        phi = defended_features(clamp, final.sites, phi_sites, phi_mask)
        target_score = task.score(final.logits, sx).cpu()
    outcomes = []
    for i in range(n):
        rows = mask[i].nonzero().flatten()
        d_rows = delta.detach()[i, rows].float()
        dphi = phi[i] - phi_ref[i]
        ref_norm = float(phi_ref[i].norm())
        d_norm = float(d_rows.norm())
        metrics: dict[str, Any] = {
            "delta_norm": d_norm,
            "relative_delta_norm": d_norm / (float(embed[i, rows].norm()) + 1e-8),
            "phi_relative_drift": float(dphi.norm()) / (ref_norm + 1e-8),
            "phi_floor_violation": float(torch.clamp(-dphi, min=0).norm()) / (ref_norm + 1e-8),
            "suffix_tokens": int(n_suffix),
            "suffix_token_id": int(token_id),
            "suffix_init_answered": bool(init_scores[i] > 0),
            "target_logprob": float(target_score[i]),
        }
        tensors = {"delta": d_rows.cpu().contiguous(), "rows": rows.cpu().contiguous(),
                   "h_def": embed[i, rows].cpu().contiguous()}
        outcomes.append(ExampleOutcome(example_id=sx.ids[i], recovered=bool(scores[i] > 0),
                                       recovered_score=float(scores[i]), steps=cfg.steps, metrics=metrics,
                                       tensors=tensors, history=histories[i]))
    return outcomes


# --------------------------------------------------------------------------------------------
# refusal metrics of the summary


def _wilson(k: int, n: int) -> list[float] | None:
    from .stats import wilson_interval

    ci = wilson_interval(k, n)
    return None if ci is None else [ci[0], ci[1]]


def refusal_summary(records: Sequence[Mapping[str, Any]], modes: Sequence[str] | None = None) -> dict[str, dict]:
    """Per mode, over valid flips: ``non_refusal`` (the recovered response is answered, by the
    task's judge), ``base_like`` and ``base_like_strict`` (close to the base response), each
    with count, rate and Wilson 95% interval (a failed example counts as neither); and the mean
    and bootstrap 95% interval of ``phi_relative_drift``, ``phi_floor_violation``,
    ``relative_drift`` (delta site only) and ``relative_delta_norm``, plus the largest
    ``jacobian_step_residual`` and ``c1_residual``."""
    from .stats import bootstrap_ci

    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_mode.setdefault(str(r["mode"]), []).append(r)
    out: dict[str, dict] = {}
    for mode in (list(modes) if modes is not None else list(by_mode)):
        valid = [r for r in by_mode.get(mode, []) if r.get("valid") is True]
        n = len(valid)
        row: dict[str, Any] = {"n_valid": n}
        for key in ("non_refusal", "base_like", "base_like_strict"):
            k = sum(1 for r in valid if r.get(key) is True)
            row[key] = k
            row[f"{key}_rate"] = k / n if n else None
            row[f"{key}_rate_ci95"] = _wilson(k, n)
        for key in ("phi_relative_drift", "phi_floor_violation", "relative_drift", "relative_delta_norm"):
            vals = [float(r[key]) for r in valid if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            row[f"{key}_n"] = len(vals)
            row[f"{key}_mean"] = sum(vals) / len(vals) if vals else None
            ci = bootstrap_ci(vals)
            row[f"{key}_ci95"] = None if ci is None else [ci[0], ci[1]]
        res = [float(r["jacobian_step_residual"]) for r in valid if isinstance(r.get("jacobian_step_residual"), (int, float))]
        row["jacobian_step_residual_max"] = max(res) if res else None
        c1 = [float(r["c1_residual"]) for r in valid if isinstance(r.get("c1_residual"), (int, float))]
        row["c1_residual_max"] = max(c1) if c1 else None
        out[mode] = row
    return out


def refusal_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of the refusal metrics of a summary (see :func:`refusal_summary`)."""
    from .report import _markdown_table, _num, _rate_with_ci

    rows = []
    for mode, m in (summary.get("modes") or {}).items():
        m = m or {}
        rows.append([
            str(mode), f"{m.get('non_refusal', 'n/a')}/{m.get('n_valid', 'n/a')}",
            _rate_with_ci(m, "non_refusal_rate"), _rate_with_ci(m, "base_like_rate"),
            _rate_with_ci(m, "base_like_strict_rate"), _mean_ci(m, "phi_relative_drift"),
            _num(m.get("phi_floor_violation_mean")), _num(m.get("relative_delta_norm_mean")),
            _num(m.get("c1_residual_max")), _num(m.get("jacobian_step_residual_max")),
        ])
    return _markdown_table(["mode", "non-refusal / valid", "non-refusal rate [95% CI]", "base-like rate [95% CI]",
                            "strict base-like rate [95% CI]", "phi relative drift [95% CI]", "phi floor violation",
                            "relative delta norm", "C1 max", "J step ratio max"], rows)


def _mean_ci(m: Mapping[str, Any], key: str) -> str:
    from .report import _num

    ci = m.get(f"{key}_ci95")
    mean = _num(m.get(f"{key}_mean"))
    return f"{mean} [{_num(ci[0])}, {_num(ci[1])}]" if ci else mean


def add_refusal_summary(summary: dict[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge :func:`refusal_summary` into ``summary["modes"][mode]`` (in place) and return it."""
    extra = refusal_summary(records, list(summary.get("modes") or {}))
    for mode, row in extra.items():
        target = summary["modes"].setdefault(mode, {})
        for k, v in row.items():  # summarize()'s own metrics (relative_drift, c1_residual, ...) stay as they are
            if k != "n_valid" and (k not in target or k.startswith(("non_refusal", "base_like", "phi_"))):
                target[k] = v
    summary["refusal_metrics"] = {
        "non_refusal": "the recovered response is answered by the task's judge (strict: no refusal, "
                       "safety cue or degenerate opening)",
        "base_like": "refusal_text.base_like(recovered, base) (lenient); base_like_strict: strict thresholds",
        "phi_relative_drift": "||Phi_rec - Phi_def|| / ||Phi_def|| over every clamped (layer, feature, row)",
    }
    return summary


# --------------------------------------------------------------------------------------------
# the runner


@dataclass
class SuffixSettings:
    """The soft-suffix baseline: ``n_suffix`` placeholder tokens; lr / budget default to the
    residual modes' (``RecoveryConfig.lr`` / ``budget``)."""

    n_suffix: int = 8
    token: str | int | None = None
    lr: float | None = None
    budget: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"n_suffix": self.n_suffix, "token": self.token, "lr": self.lr, "budget": self.budget,
                "site": SUFFIX_SITE}


def run_refusal(
    model: Any,
    clamp: Clamp,
    task: Refusal,
    *,
    modes: Sequence[str] = REFUSAL_MODES,
    out: str | Path | None = None,
    delta_site: str | None = None,
    suffix: SuffixSettings | None = None,
    batch_size: int = 16,
    progress: bool = True,
    report: bool = True,
    overwrite: bool = False,
    extra_config: Mapping[str, Any] | None = None,
    config: RecoveryConfig | None = None,
    **overrides: Any,
) -> RunResult:
    """Recover the valid refusal flips of ``task`` under ``clamp`` in every mode of ``modes``
    (any of none / encoder / jacobian / sketch / suffix), in one run directory ``out``.

    overrides: RecoveryConfig fields (default ``positions="prompt"``: delta on every prompt
    row). The summary's modes carry the refusal metrics (:func:`refusal_summary`) and the
    report gets a refusal table.
    """
    from .stats import summarize

    t0 = time.perf_counter()
    modes = list(modes)
    bad = [m for m in modes if m not in REFUSAL_MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct names from {', '.join(REFUSAL_MODES)}; got {modes}")
    if not isinstance(task, Refusal):
        raise TypeError(f"task must be a saerecover Refusal task, got {type(task).__name__}")
    cfg = config or RecoveryConfig(positions="prompt")
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"unknown recovery option {key!r}; valid: {', '.join(cfg.to_dict())}")
        setattr(cfg, key, value)
    cfg.validate()
    suffix = suffix or SuffixSettings()
    residual = [m for m in modes if m != SUFFIX]
    extra = {"refusal": {"modes": modes, "suffix": suffix.to_dict() if SUFFIX in modes else None},
             **dict(extra_config or {})}
    # recover() needs at least one residual mode to find the flips and own the run directory;
    # with only "suffix" asked for, "none" runs as well
    run_modes = residual or ["none"]
    result = recover(model, clamp, task, projection=run_modes, out=out, batch_size=batch_size,
                     delta_site=delta_site, config=cfg, progress=progress, extra_config=extra,
                     report=False, overwrite=overwrite)
    flips = result.flips
    records = list(result.records)
    outcomes = dict(result.outcomes)
    run_dir = None
    if result.path is not None:
        from .runs import RunDirectory, open_run

        run_dir = RunDirectory(result.path, config=open_run(result.path).config)
    try:
        if SUFFIX in modes:
            outcomes[SUFFIX] = _run_suffix(model, clamp, task, flips, cfg, suffix, batch_size, run_dir,
                                           records, progress)
        if run_dir is not None:
            records = run_dir.records()
        all_modes = run_modes + ([SUFFIX] if SUFFIX in modes else [])
        summary = summarize(records, task=task.name, modes=all_modes,
                            extra={k: v for k, v in result.summary.items()
                                   if k not in ("task", "n_valid", "n_records", "modes", "intervals")})
        summary["seconds"] = time.perf_counter() - t0
        add_refusal_summary(summary, records)
        if run_dir is not None:
            run_dir.write_summary(summary)
    finally:
        if run_dir is not None:
            run_dir.close()
    if result.path is not None and report:
        write_refusal_report(result.path)
    return RunResult(summary=summary, records=records, path=result.path, flips=flips,
                     seconds=time.perf_counter() - t0, outcomes=outcomes)


def _run_suffix(model, clamp, task, flips: Flips, cfg, suffix: SuffixSettings, batch_size, run_dir, records,
                progress) -> list[ExampleOutcome]:
    from tqdm.auto import tqdm

    defended = DefendedModel(model, clamp)
    ex = task.examples()
    done = run_dir.done() if run_dir is not None else set()
    results: list[ExampleOutcome] = []

    def emit(rec, oc):
        if run_dir is not None:
            if oc is not None:
                run_dir.save_tensors(SUFFIX, rec["example_id"], oc.tensors, metadata={"site": SUFFIX_SITE})
            run_dir.append_record(rec)
        else:
            records.append(rec)

    for i, eid in enumerate(ex.ids):
        if not bool(flips.valid[i]) and (eid, SUFFIX) not in done:
            emit(_record(None, eid, SUFFIX, flips, i, task=task), None)
    todo = [i for i in torch.nonzero(flips.valid).flatten().tolist() if (ex.ids[i], SUFFIX) not in done]
    bar = tqdm(total=len(todo), desc=f"recover [{SUFFIX}]", disable=not progress or not todo, leave=False)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        part = ex.select(chunk)
        try:
            ocs = recover_suffix(defended, task, part, cfg=cfg, n_suffix=suffix.n_suffix, token=suffix.token,
                                 lr=suffix.lr, budget=suffix.budget)
            errs = [None] * len(chunk)
        except FloatingPointError as err:
            ocs, errs = [None] * len(chunk), [f"non-finite loss or gradient: {err}"] * len(chunk)
        for i, oc, err in zip(chunk, ocs, errs):
            rec = _record(oc, ex.ids[i], SUFFIX, flips, i, err, task=task)
            emit(rec, oc)
            if oc is not None:
                results.append(oc)
            bar.update(1)
    bar.close()
    return results


def write_refusal_report(run_dir: str | Path) -> Path:
    """``report.write_report`` plus a refusal section (non-refusal and base-like rates, Phi drift)."""
    from .report import write_report
    from .runs import atomic_write_text, open_run

    path = write_report(run_dir)
    summary = open_run(run_dir).read_summary()
    text = path.read_text(encoding="utf-8")
    section = ["## Refusal", "",
               "Over valid flips (base answered without refusal or safety cue, clamped model refuses). "
               "Non-refusal: the response generated with the clamp and delta active is answered by the "
               "task's judge. Base-like: close to the unclamped base response (lenient / strict). "
               "Phi drift: relative change of every clamped feature at every clamped site.", "",
               refusal_table(summary), ""]
    marker = "## Plots"
    text = text.replace(marker, "\n".join(section) + "\n" + marker, 1) if marker in text else text + "\n" + "\n".join(section)
    atomic_write_text(path, text)
    return path


# --------------------------------------------------------------------------------------------
# the toy world's refusal setting


def toy_requests(n: int, *, harmful: bool, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` distinct toy-corpus requests (harmful: danger level >= the threshold)."""
    from .toy import corpus

    rng = random.Random(f"refusal-{seed}-{int(harmful)}")
    seen = set(exclude)
    out: list[str] = []
    for _ in range(200 * n):
        r = corpus.request_example(rng, harmful=harmful).request
        if r not in seen:
            seen.add(r)
            out.append(r)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct {'harmful' if harmful else 'harmless'} toy requests")


@dataclass
class RefusalSetting:
    """What :func:`toy_setting` (or the CLI) builds: the task, the clamp, and how."""

    task: Refusal
    clamp: Clamp
    features: dict[str, torch.Tensor]
    selection: dict[str, Any] = field(default_factory=dict)


def build_setting(model: Any, sites: Sequence[Any], requests: Sequence[str], contrast_requests: Sequence[str], *,
                  top_k: int = 16, features: Mapping[str, Sequence[int]] | None = None, scale: float = 1.0,
                  only_answered: bool = True, positions: str = "prompt", **task_kw: Any) -> RefusalSetting:
    """Refusal features by contrast and the mean-activation clamp, and the task.

    contrast_requests: requests whose base responses split them into refused / answered (the
    contrast classes). requests: the task's requests; with ``only_answered`` only those the
    base model answers are kept (the others could never be valid flips).
    """
    ctask = Refusal(model, list(contrast_requests), **{**task_kw, "ids": None, "name": "refusal-contrast",
                                                       "source": None})
    refused = torch.nonzero(ctask.base_refused()).flatten().tolist()
    answered = torch.nonzero(ctask.base_answered()).flatten().tolist()
    if not refused or not answered:
        raise ValueError(f"the contrast set needs refused and answered requests; the base model refused "
                         f"{len(refused)} and answered {len(answered)} of {len(contrast_requests)}")
    contrast = refusal_contrast(model, list(sites), ctask.prompt_examples(refused), ctask.prompt_examples(answered),
                                positions=positions)
    feats = select_refusal_features(contrast, top_k, features=features)
    clamp = mean_activation_clamp(contrast, feats, scale=scale)
    task = Refusal(model, list(requests), **task_kw)
    n_requests = len(task.requests)
    if only_answered:
        keep = torch.nonzero(task.base_answered()).flatten().tolist()
        if not keep:
            raise ValueError("the base model answers none of the requests: no valid flip is possible")
        task = task.subset(keep)
    selection = {"n_contrast": len(contrast_requests), "n_refused": len(refused), "n_answered": len(answered),
                 "positions": positions, "top_k": top_k, "scale": scale, "n_requests": n_requests,
                 "n_kept": len(task.requests), "sites": contrast_table(contrast, feats)}
    return RefusalSetting(task=task, clamp=clamp, features=feats, selection=selection)


def toy_setting(world: Any, *, n: int = 24, n_contrast: int = 48, sites: Sequence[str] = DEFAULT_TOY_SITES,
                top_k: int = 16, seed: int = 0, max_new_tokens: int = 16, positions: str = "last",
                scale: float = 1.0, **task_kw: Any) -> RefusalSetting:
    """The toy world's refusal setting: ``n`` harmless requests (kept where the base model
    answers), features by contrast on ``n_contrast`` harmful + ``n_contrast`` harmless requests
    (other draws) at ``sites``, each set to ``scale`` x its mean activation on refused requests.

    positions: where the contrast and the clamp values are measured. "last" (the last prompt
    token, where the toy model decides between "Sure" and "I") by default: measured on the
    shipped toy GPT-2, the mean over all prompt positions ("prompt") at scale 1 induced no
    refusal at K = 8, 16 or 32 (24 answered requests), while "last" at scale 1 made all 24
    stop answering."""
    if len(sites) < 1:
        raise ValueError("give at least one site")
    harmless = toy_requests(n, harmful=False, seed=seed)
    contrast = (toy_requests(n_contrast, harmful=True, seed=seed + 1)
                + toy_requests(n_contrast, harmful=False, seed=seed + 1, exclude=harmless))
    site_objs = [world.site(s) for s in sites]
    task_kw.setdefault("source", {"kind": "toy", "n": n, "seed": seed})
    return build_setting(world.model, site_objs, harmless, contrast, top_k=top_k, positions=positions, scale=scale,
                         max_new_tokens=max_new_tokens, **task_kw)


__all__ = [
    "REFUSAL_MODES",
    "SUFFIX",
    "SUFFIX_SITE",
    "RefusalSetting",
    "SuffixSettings",
    "add_refusal_summary",
    "build_setting",
    "placeholder_token",
    "recover_suffix",
    "refusal_summary",
    "refusal_table",
    "run_refusal",
    "suffix_examples",
    "toy_requests",
    "toy_setting",
    "write_refusal_report",
]
