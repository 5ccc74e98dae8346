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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.config import RecoveryConfig
from saerecover.core.projection import PROJECTIONS
from saerecover.core.selection import fewer_features_note
from saerecover.data.requests import toy_requests
from saerecover.experiments.baselines import BASELINES
from saerecover.experiments.pipeline import RunResult, recover
from saerecover.experiments.suffix import SUFFIX, SuffixSettings
from saerecover.runs.stats import bootstrap_ci, wilson_interval
from saerecover.tasks.refusal.features import (
    CLAMPS,
    contrast_table,
    mean_activation_clamp,
    multiply_clamp,
    refusal_contrast,
    select_refusal_features,
)
from saerecover.tasks.refusal.task import Refusal

REFUSAL_MODES = (*PROJECTIONS, *BASELINES)
DEFAULT_TOY_SITES = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")


# --------------------------------------------------------------------------------------------
# the soft-suffix baseline



# --------------------------------------------------------------------------------------------
# refusal metrics of the summary


def _wilson(k: int, n: int) -> list[float] | None:
    ci = wilson_interval(k, n)
    return None if ci is None else [ci[0], ci[1]]


#: Per-example flags counted by :func:`refusal_summary`: ours, the reference's judge beside them,
#: and, when a recovered delta had rows after the prompt, the two generations (prompt rows only,
#: all rows).
REFUSAL_COUNTS = ("non_refusal", "base_like", "base_like_strict", "reference_non_refusal", "reference_base_like",
                  "reference_base_like_strict", "non_refusal_prompt_rows", "non_refusal_all_rows",
                  "reference_non_refusal_prompt_rows", "reference_non_refusal_all_rows")
#: Per-example numbers averaged (with bootstrap intervals) by :func:`refusal_summary`.
REFUSAL_MEANS = ("phi_relative_drift", "phi_floor_violation", "relative_drift", "relative_delta_norm",
                 "relative_delta_norm_phi", "anchor_delta_norm", "main_delta_norm")


def refusal_summary(records: Sequence[Mapping[str, Any]], modes: Sequence[str] | None = None) -> dict[str, dict]:
    """Per mode, over valid flips: ``non_refusal`` (the recovered response is answered, by the
    task's judge), ``base_like`` and ``base_like_strict`` (close to the base response), the
    reference's ``reference_non_refusal`` / ``reference_base_like(_strict)`` beside them (and the
    other :data:`REFUSAL_COUNTS` where records carry them), each with count, rate and Wilson 95%
    interval (a failed example counts as neither); and the mean and bootstrap 95% interval of
    ``phi_relative_drift``, ``phi_floor_violation``, ``relative_drift`` (delta site only),
    ``relative_delta_norm`` (||delta|| / ||h_def||), ``relative_delta_norm_phi`` (the
    reference's: ||delta|| / ||Phi_def||), plus the largest ``jacobian_step_residual`` and
    ``c1_residual``."""
    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_mode.setdefault(str(r["mode"]), []).append(r)
    out: dict[str, dict] = {}
    for mode in (list(modes) if modes is not None else list(by_mode)):
        valid = [r for r in by_mode.get(mode, []) if r.get("valid") is True]
        n = len(valid)
        row: dict[str, Any] = {"n_valid": n}
        for key in REFUSAL_COUNTS:
            if key not in ("non_refusal", "base_like", "base_like_strict") and not any(key in r for r in valid):
                continue
            k = sum(1 for r in valid if r.get(key) is True)
            row[key] = k
            row[f"{key}_rate"] = k / n if n else None
            row[f"{key}_rate_ci95"] = _wilson(k, n)
        for key in REFUSAL_MEANS:
            if key in ("anchor_delta_norm", "main_delta_norm") and not any(key in r for r in valid):
                continue
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



def add_refusal_summary(summary: dict[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge :func:`refusal_summary` into ``summary["modes"][mode]`` (in place) and return it."""
    extra = refusal_summary(records, list(summary.get("modes") or {}))
    for mode, row in extra.items():
        target = summary["modes"].setdefault(mode, {})
        for k, v in row.items():  # summarize()'s own metrics (relative_drift, c1_residual, ...) stay as they are
            if k != "n_valid" and (k not in target or k.startswith(("non_refusal", "base_like", "phi_", "reference_"))):
                target[k] = v
    summary["refusal_metrics"] = {
        "non_refusal": "the recovered response is answered by the task's judge (strict: no refusal, "
                       "safety cue or degenerate opening)",
        "base_like": "refusal_text.base_like(recovered, base) (lenient); base_like_strict: strict thresholds",
        "reference_non_refusal": "the paper's count: no refusal_sae phrase anywhere in the response "
                                 "(case-insensitive); safety cues do not count against it",
        "reference_base_like": "the reference's base-like rule (judge.reference_quality); _strict: its strict variant",
        "phi_relative_drift": "||Phi_rec - Phi_def|| / ||Phi_def|| over every clamped (layer, feature, row)",
        "relative_delta_norm_phi": "the reference's relative delta norm: ||delta|| (the last stage's) / ||Phi_def||",
    }
    rows = [r for r in records if any(k in r for k in ("non_refusal_prompt_rows", "non_refusal_all_rows"))]
    if rows:
        summary["refusal_metrics"]["generation_rows"] = (
            "the recovered delta has rows after the prompt: the response was generated with the prompt rows "
            "only (non_refusal_prompt_rows; the reference's generation, whose KV cache never applies the "
            "others) and with every row at its position (non_refusal_all_rows)")
    return summary


# --------------------------------------------------------------------------------------------
# the runner



def run_refusal(
    model: Any,
    clamp: Clamp,
    task: Refusal,
    *,
    modes: Sequence[str] = REFUSAL_MODES,
    out: str | Path | None = None,
    delta_site: str | Sequence[str] | None = None,
    suffix: SuffixSettings | None = None,
    batch_size: int = 16,
    progress: bool = True,
    report: bool = True,
    overwrite: bool = False,
    extra_config: Mapping[str, Any] | None = None,
    config: RecoveryConfig | None = None,
    protocol: str | Mapping[str, Any] | None = None,
    executor: Any = None,
    **overrides: Any,
) -> RunResult:
    """Recover the valid refusal flips of ``task`` under ``clamp`` in every mode of ``modes``
    (any of none / encoder / jacobian / sketch / suffix), in one run directory ``out``.

    overrides: RecoveryConfig fields (default ``positions="prompt"``: delta on every prompt
    row). delta_site: a clamped site, several, or "all" (a delta at every clamped site, as the
    reference). The summary's modes carry the refusal metrics (:func:`refusal_summary`) and the
    report gets a refusal table. protocol, executor: the run's (:func:`saerecover.experiments.pipeline.recover`).
    """
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
    if delta_site == "all":
        order = {name: i for i, name in enumerate(model.site_names())}
        delta_site = sorted((sc.site.hook_name for sc in clamp.site_clamps), key=order.__getitem__)
    suffix = suffix or SuffixSettings()
    residual = [m for m in modes if m not in BASELINES]
    extra = {"refusal": {"modes": modes, "suffix": suffix.to_dict() if SUFFIX in modes else None},
             **dict(extra_config or {})}
    # the run's projection modes; with only "suffix" asked for, "none" runs as well (its
    # records are the reference the suffix is read against)
    run_modes = residual or ["none"]
    return recover(model, clamp, task, projection=run_modes, baselines={SUFFIX: suffix} if SUFFIX in modes else None,
                   out=out, batch_size=batch_size, delta_site=delta_site, config=cfg, progress=progress,
                   extra_config=extra, report=report, overwrite=overwrite, summarize_extra=add_refusal_summary,
                   protocol=protocol, executor=executor)




# --------------------------------------------------------------------------------------------
# the toy world's refusal setting



@dataclass
class RefusalSetting:
    """What :func:`toy_setting` (or the CLI) builds: the task, the clamp, and how."""

    task: Refusal
    clamp: Clamp
    features: dict[str, torch.Tensor]
    selection: dict[str, Any] = field(default_factory=dict)


#: The fewest refused and the fewest answered contrast requests ``build_setting`` accepts.
MIN_CONTRAST = 5


def build_setting(model: Any, sites: Sequence[Any], requests: Sequence[str], contrast_requests: Sequence[str], *,
                  top_k: int = 16, features: Mapping[str, Sequence[int]] | None = None, scale: float = 1.0,
                  clamp: str = "mean", multiplier: float = 3.0, only_answered: bool = True,
                  positions: str = "prompt", min_contrast: int = MIN_CONTRAST, **task_kw: Any) -> RefusalSetting:
    """Refusal features by contrast, the clamp, and the task.

    contrast_requests: requests whose base responses split them into refused / answered (the
    contrast classes). requests: the task's requests; with ``only_answered`` only those the
    base model answers are kept (the others could never be valid flips). clamp: "mean" (each
    feature set to ``scale`` x its mean on refused requests, at every position) or "multiply"
    (the paper's: each feature multiplied by ``multiplier`` at every position). min_contrast:
    the fewest refused and the fewest answered contrast requests the contrast may rest on (a
    mean over one refused request is that request's activations, not a refusal direction).
    """
    if clamp not in CLAMPS:
        raise ValueError(f"unknown refusal clamp {clamp!r}; valid: {', '.join(CLAMPS)}")
    ctask = Refusal(model, list(contrast_requests), **{**task_kw, "ids": None, "name": "refusal-contrast",
                                                       "source": None})
    refused = torch.nonzero(ctask.base_refused()).flatten().tolist()
    answered = torch.nonzero(ctask.base_answered()).flatten().tolist()
    least = max(1, int(min_contrast))
    if min(len(refused), len(answered)) < least:
        raise ValueError(f"the feature contrast needs at least {least} refused and "
                         f"{least} answered requests; the base model refused {len(refused)} and "
                         f"answered {len(answered)} of {len(contrast_requests)} contrast requests: give --contrast "
                         "more requests of the kind it lacks (or lower --min-contrast, at the contrast's risk)")
    contrast = refusal_contrast(model, list(sites), ctask.prompt_examples(refused), ctask.prompt_examples(answered),
                                positions=positions)
    feats = select_refusal_features(contrast, top_k, features=features)
    defense = (mean_activation_clamp(contrast, feats, scale=scale) if clamp == "mean"
               else multiply_clamp({s.hook_name: s for s in sites}, feats, multiplier=multiplier))
    task = Refusal(model, list(requests), **task_kw)
    n_requests = len(task.requests)
    if only_answered:
        keep = torch.nonzero(task.base_answered()).flatten().tolist()
        if not keep:
            raise ValueError("the base model answers none of the requests: no valid flip is possible")
        task = task.subset(keep)
    selection = {"n_contrast": len(contrast_requests), "n_refused": len(refused), "n_answered": len(answered),
                 "min_contrast": least, "positions": positions, "top_k": top_k, "scale": scale, "clamp": clamp,
                 **({"multiplier": multiplier} if clamp == "multiply" else {}), "n_requests": n_requests,
                 "n_kept": len(task.requests), "sites": contrast_table(contrast, feats)}
    notes = []
    for name, chosen in feats.items():
        if features and name in features:
            continue  # given, not selected
        asked = top_k[name] if isinstance(top_k, Mapping) else int(top_k)
        note = fewer_features_note(name, asked, len(chosen), "a positive refused-minus-answered contrast")
        if note:
            notes.append(note)
    if notes:
        selection["notes"] = notes
    return RefusalSetting(task=task, clamp=defense, features=feats, selection=selection)


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
    "MIN_CONTRAST",
    "REFUSAL_MODES",
    "RefusalSetting",
    "add_refusal_summary",
    "build_setting",
    "refusal_summary",
    "run_refusal",
    "toy_setting",
]
