"""One verb for the whole method: find the valid flips, recover them per mode, write the run.

base pass (B true?) -> defended pass (B false?) -> valid flips -> recovery per mode, batched
-> records (appended as each batch finishes) -> summary -> report.
"""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from saerecover.core import protocol as protocols
from saerecover.core.clamp import Clamp
from saerecover.core.config import RecoveryConfig
from saerecover.core.decomposition import recovery_features
from saerecover.core.defended import DefendedModel
from saerecover.core.examples import Examples, Task
from saerecover.core.projection import encoder_null_warnings
from saerecover.core.recovery import PROJECTIONS, ExampleOutcome, recover_batch
from saerecover.core.shared import recover_shared
from saerecover.experiments.baselines import Baseline
from saerecover.models.base import ModelAdapter
from saerecover.models.memory import first_line, free_cached_memory, is_out_of_memory, oom_label, run_in_chunks
from saerecover.progress import progress_bar
from saerecover.report.run import summary_table, write_report
from saerecover.runs import RunDirectory, validate_name
from saerecover.runs.interrupt import Interrupted, StopOnSignal
from saerecover.runs.history import history_tensors
from saerecover.runs.records import make_record
from saerecover.runs.stats import summarize


@dataclass
class Flips:
    """Base and defended behavior scores for every example; valid = B(base) and not B(defended)."""

    base: torch.Tensor
    defended: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """B(base) and not B(defended), both scores finite (a NaN defended score is not a flip)."""
        finite = torch.isfinite(self.base) & torch.isfinite(self.defended)
        return finite & (self.base > 0) & ~(self.defended > 0)

    def record(self, i: int, example_id: str, mode: str, task: Task, outcome: ExampleOutcome | None = None,
               error: str | None = None) -> dict[str, Any]:
        """The records.jsonl line of example ``i`` in ``mode`` (see :func:`saerecover.runs.records.make_record`),
        with the task's own per-example fields when it has ``record_fields``."""
        extra = (task.record_fields(example_id, "recovered" if outcome is not None else "flips")
                 if hasattr(task, "record_fields") else None)
        return make_record(example_id, mode, valid=bool(self.valid[i]), base_score=float(self.base[i]),
                           defended_score=float(self.defended[i]), outcome=outcome, error=error, extra=extra)

    @property
    def non_finite(self) -> torch.Tensor:
        """Examples whose base or defended score is NaN or infinite (never valid)."""
        return ~(torch.isfinite(self.base) & torch.isfinite(self.defended))


@dataclass
class RunResult:
    """What :func:`recover` returns: the summary, every record, and where they were written."""

    summary: dict[str, Any]
    records: list[dict[str, Any]]
    path: Path | None = None
    flips: Flips | None = None
    seconds: float = 0.0
    outcomes: dict[str, list[ExampleOutcome]] = field(default_factory=dict)

    def table(self) -> str:
        return summary_table(self.summary)


@dataclass
class RunPlan:
    """A checked :func:`recover` call that an executor runs elsewhere, cut into shards: the
    keywords every unit passes to ``recover`` (``options``) and what the driver checks, counts
    and merges (saerecover.experiments.study)."""

    out: Path
    config: dict[str, Any]  # the resolved config.json content, without "shard"
    example_ids: list[str]
    modes: list[str]  # every mode of the run, baselines included
    options: dict[str, Any]
    report: bool = True
    overwrite: bool = False
    progress: bool = True


def behavior_scores(defended: DefendedModel, task: Task, ex: Examples, *, with_clamp: bool,
                    batch_size: int = 64, on_chunk: Callable[[int], Any] | None = None) -> torch.Tensor:
    """Behavior scores (n,) of the base (with_clamp=False) or defended model, no gradients.

    A task with a ``judge`` method (e.g. one that generates text and looks for a refusal)
    decides the behavior itself; otherwise B holds iff ``task.score(...) > 0``. On out of memory
    (CUDA's or the CPU allocator's) a chunk is halved and retried, and the smaller size kept
    for the chunks after it (saerecover.models.memory.run_in_chunks); one example that does not
    fit raises MemoryError naming it. on_chunk: called with the number of examples of each
    chunk scored (a progress bar's ``update``).
    """
    def score(start: int, stop: int) -> torch.Tensor:
        scores = _score_chunk(defended, task, ex.select(list(range(start, stop))), with_clamp)
        if on_chunk is not None:
            on_chunk(stop - start)
        return scores

    with torch.no_grad():
        out = run_in_chunks(len(ex), batch_size, score,
                            what=f"scoring {'with' if with_clamp else 'without'} the clamp",
                            name_item=lambda i: f"example {ex.ids[i]!r}")
    return torch.cat(out) if out else torch.zeros(0)


def _score_chunk(defended: DefendedModel, task: Task, part: Examples, with_clamp: bool) -> torch.Tensor:
    part = part.to(defended.model.device)
    if hasattr(task, "judge"):
        return task.judge(defended, part, with_clamp=with_clamp).float().cpu()
    logits = defended.forward(part, defended=with_clamp).logits
    return task.score(logits, part).float().cpu()


def find_flips(defended: DefendedModel, task: Task, ex: Examples, *, batch_size: int = 64,
               progress: bool = False) -> Flips:
    """Behavior scores without and with the clamp; warns when some are not finite (those
    examples are never valid, and their records keep the NaN/inf scores as null). progress: a
    bar over both passes."""
    with progress_bar(2 * len(ex), "find flips (base, defended)", enabled=progress) as bar:
        flips = Flips(base=behavior_scores(defended, task, ex, with_clamp=False, batch_size=batch_size,
                                           on_chunk=bar.update),
                      defended=behavior_scores(defended, task, ex, with_clamp=True, batch_size=batch_size,
                                               on_chunk=bar.update))
    bad = int(flips.non_finite.sum())
    if bad:
        warnings.warn(f"{bad} of {len(flips.base)} examples have a non-finite base or defended behavior score "
                      "(NaN/inf from the model or the clamp); they are not counted as valid flips",
                      RuntimeWarning, stacklevel=2)
    return flips


def describe_model(model: ModelAdapter) -> dict[str, Any]:
    return {
        "name": str(getattr(model, "name", getattr(getattr(model.model, "config", None), "_name_or_path", "")) or ""),
        "backend": model.backend,
        "dtype": str(model.dtype).replace("torch.", ""),
        "n_layers": model.n_layers,
        "d_model": model.d_model,
    }



def _recover_residual(defended: DefendedModel, task: Task, part: Examples, *, mode: str, cfg: RecoveryConfig,
                      delta_site: str | list[str] | None) -> list[ExampleOutcome]:
    """A projection mode's recovery of a batch: a residual delta at the delta site."""
    return recover_batch(defended, task, part, mode=mode, cfg=cfg, delta_site=delta_site)


def _numerical_error(err: FloatingPointError) -> str:
    """An example's ``error``: what was not finite, where (recover_batch's messages say it)."""
    text = str(err).strip() or type(err).__name__
    return text if text.startswith(("non-finite", "the ")) else f"non-finite value: {text}"
#: Non-clamped features kept per recovered example in its record (``top_features``).
RECORD_TOP_FEATURES = 5


def path_features(clamp: Clamp, delta_site: str | None, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``{"top_features": [[feature, ||dz_j||], ...]}``: the non-clamped features of the delta
    site's SAE that carry an example's recovery (:func:`recovery_features`), computed while the
    SAE is loaded so that a report never needs it; empty for a delta at several sites."""
    if "h_def" not in tensors or "delta" not in tensors or any(k.startswith("delta@") for k in tensors):
        return {}
    sc = clamp.at(delta_site) if delta_site is not None else clamp.site_clamps[0]
    top = recovery_features(sc.site, sc.features, tensors["h_def"], tensors["delta"], top_k=RECORD_TOP_FEATURES)
    return {"top_features": [[j, v] for j, v in top]}


def _delta_sites(clamp: Clamp, delta_site: str | list[str] | None) -> list[str]:
    """The sites where delta is added (recover_batch's rule: default the first clamped site)."""
    if isinstance(delta_site, str):
        return [delta_site]
    return list(delta_site or [clamp.site_clamps[0].site.hook_name])


def _recover_chunk(run: Callable[[Examples], list[ExampleOutcome]], part: Examples) -> list:
    """``run(part)`` as (outcome, error) pairs; if it hits a non-finite value (loss, gradient,
    score, or a step that overflows float32), retry one by one and mark the culprits."""
    try:
        return [(oc, None) for oc in run(part)]
    except FloatingPointError as err:
        if len(part) == 1:
            return [(None, _numerical_error(err))]
    results = []
    for j in range(len(part)):
        try:
            results.append((run(part.select([j]))[0], None))
        except FloatingPointError as err:
            results.append((None, _numerical_error(err)))
    return results


#: Values kept per token and layer for the backward pass, for the activation-memory estimate
#: of ``memory_limit_mb`` (about 34 bytes x d_model at 16 bits per layer: Korthikanti et al.
#: 2022, "Reducing activation recomputation", without the attention-score term).
ACTIVATION_VALUES_PER_TOKEN_LAYER = 17


def estimate_activation_bytes(batch: int, seq: int, d_model: int, n_layers: int, *, bytes_per_value: int = 4) -> int:
    """A rough estimate of the activation memory of one recovery step: batch * seq * d_model *
    n_layers * ``ACTIVATION_VALUES_PER_TOKEN_LAYER`` values."""
    return batch * seq * d_model * n_layers * ACTIVATION_VALUES_PER_TOKEN_LAYER * bytes_per_value


def _token_limit(model: ModelAdapter, max_batch_tokens: int | None, memory_limit_mb: float | None) -> int | None:
    """The tokens (batch * padded seq) one recovery chunk may hold, from either limit."""
    limits = []
    if max_batch_tokens is not None:
        limits.append(int(max_batch_tokens))
    if memory_limit_mb is not None:
        per_token = estimate_activation_bytes(1, 1, model.d_model, model.n_layers,
                                              bytes_per_value=max(torch.finfo(model.dtype).bits // 8, 4))
        limits.append(max(1, int(memory_limit_mb * 2**20 // per_token)))
    return min(limits) if limits else None


def _next_chunk(todo: list[int], start: int, batch: int, lengths: torch.Tensor, tokens: int | None) -> list[int]:
    """Up to ``batch`` examples from ``todo[start:]`` whose padded size fits ``tokens`` (at least one)."""
    chunk = [todo[start]]
    longest = int(lengths[todo[start]])
    for i in todo[start + 1:start + batch]:
        longest_next = max(longest, int(lengths[i]))
        if tokens is not None and (len(chunk) + 1) * longest_next > tokens:
            break
        chunk.append(i)
        longest = longest_next
    return chunk


def _recover_fitting(run_chunk, chunk: list[int], emit, state: dict[str, int], retries: int = 0) -> None:
    """Run ``run_chunk(chunk)`` and pass ``emit(i, outcome, error, retries)`` each result. On an
    out-of-memory error (CUDA's or the CPU allocator's) the chunk is halved and each half
    retried, down to one example (which is then marked failed); ``state["batch"]`` keeps the smaller size for later chunks and
    ``state["oom_retries"]`` counts the halvings."""
    try:
        results = run_chunk(chunk)
    except RuntimeError as err:  # out of memory (CUDA's or the CPU allocator's)
        if not is_out_of_memory(err):
            raise
        results, reason, label = None, first_line(err), oom_label(err)
    if results is not None:
        for i, (oc, err_msg) in zip(chunk, results):
            emit(i, oc, err_msg, retries)
        return
    free_cached_memory()
    if len(chunk) == 1:
        emit(chunk[0], None, f"{label} even with a batch of 1 ({reason})", retries)
        return
    state["oom_retries"] += 1
    half = (len(chunk) + 1) // 2
    state["batch"] = min(state["batch"], half)
    for part in (chunk[:half], chunk[half:]):
        _recover_fitting(run_chunk, part, emit, state, retries + 1)


def recover(
    model: ModelAdapter,
    clamp: Clamp,
    task: Task,
    *,
    projection: str | Sequence[str] = ("none", "encoder"),
    out: str | Path | None = None,
    batch_size: int = 32,
    delta_site: str | Sequence[str] | None = None,
    config: RecoveryConfig | None = None,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
    report: bool = True,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    max_batch_tokens: int | None = None,
    memory_limit_mb: float | None = None,
    baselines: Mapping[str, Baseline] | None = None,
    summarize_extra: Callable[[dict[str, Any], list[dict[str, Any]]], Any] | None = None,
    protocol: str | Mapping[str, Any] | None = None,
    executor: Any = None,
    **overrides: Any,
) -> RunResult:
    """Stress-test ``clamp`` on ``task``: recover every valid flip in each projection mode, then
    with each baseline.

    overrides: RecoveryConfig fields (steps, lr, budget, optimizer, positions, ...).
    out: a run directory; an existing one with the same config resumes where it stopped
    (``overwrite=True`` empties it first). shard: ``(i, n)`` runs only examples i, i+n, i+2n, ...
    so that n processes can share the work; ``saerecover merge`` joins their run directories.
    max_batch_tokens / memory_limit_mb: cap each recovery chunk at this many tokens (batch x padded
    length), or at an activation-memory estimate (:func:`estimate_activation_bytes`); neither
    changes results. On out of memory (CUDA's or the CPU allocator's) a chunk is halved and
    retried (down to 1); records of examples that needed it carry ``oom_retries`` and the
    summary counts the halvings.
    baselines: other ways to recover the same valid flips (e.g. ``{"suffix": SuffixSettings()}``),
    each a mode of the run after the projection modes, written and summarised the same way.
    summarize_extra: ``(summary, records)``, adds a task's own summary fields before it is written.
    delta_site: the clamped site of delta (default: the first), or several (a delta at each; the
    config records the first as ``delta_site`` and all as ``delta_sites``).
    protocol: "saerecover" (default) or "reference" (saerecover.core.protocol): the protocol's
    recovery choices of the task's scope (``task.protocol_scope``) are set where neither
    ``overrides`` nor a non-default field of ``config`` chose them; or an entry ``{"name",
    "choices"}`` a command or task runner resolved. config.json records the name and every choice.
    executor: run the work elsewhere (``LocalExecutor()`` in saerecover.experiments.executor,
    ``RayExecutor(...)`` in saerecover.experiments.ray_executor): shards of the examples become
    units that each write a run directory under ``OUT.study/``, merged into ``out`` in the format
    of a one-process run (docs/clusters.md); a shared-delta run is one unit. Needs ``out``; excludes ``shard``. The result has no
    ``outcomes`` (they stay in the workers; the tensors are in the run directory).
    """
    t0 = time.perf_counter()
    modes = [projection] if isinstance(projection, str) else list(projection)
    bad = [m for m in modes if m not in PROJECTIONS]
    if bad or not modes:
        raise ValueError(f"unknown projection mode(s) {bad}; valid: {', '.join(PROJECTIONS)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"projection modes repeat: {modes}; give each mode once")
    baselines = dict(baselines or {})
    clash = [b for b in baselines if b in PROJECTIONS]
    if clash:
        raise ValueError(f"baseline name(s) {clash} are projection modes; name baselines otherwise")
    all_modes = [*modes, *baselines]
    for name, limit in (("max_batch_tokens", max_batch_tokens), ("memory_limit_mb", memory_limit_mb)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not limit > 0
                                  or limit == float("inf")):
            raise ValueError(f"{name} must be a finite number > 0 (or None for no limit), got {limit!r}")
    cfg = config or RecoveryConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"unknown recovery option {key!r}; valid: {', '.join(cfg.to_dict())}")
        setattr(cfg, key, value)
    chosen = protocols.apply(cfg, protocol, getattr(task, "protocol_scope", None), explicit=overrides)
    cfg.validate()
    if cfg.shared_delta and (baselines or shard is not None):
        raise ValueError("shared_delta optimises one delta on all of the task's examples: it runs without "
                         f"{'baselines' if baselines else 'shards'}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(clamp, Clamp):
        raise TypeError(f"clamp must be a saerecover Clamp, got {type(clamp).__name__}")
    if len(clamp) == 0:
        raise ValueError("the clamp has no sites: nothing is defended")
    for sc in clamp.site_clamps:
        if sc.features.numel() == 0:
            raise ValueError(f"the clamp at {sc.site.hook_name!r} has an empty feature set: nothing is defended "
                             f"there; give at least one feature index (valid: 0..{sc.site.d_sae - 1})")
    defended = DefendedModel(model, clamp)
    if delta_site is not None and not isinstance(delta_site, str):  # several delta sites
        delta_site = list(delta_site)
    unclamped = [s for s in ([delta_site] if isinstance(delta_site, str) else delta_site or []) if clamp.at(s) is None]
    if unclamped:
        raise ValueError(f"delta site {unclamped[0]!r} is not clamped; clamped sites: "
                         f"{[sc.site.hook_name for sc in clamp.site_clamps]}")
    ex = task.examples()
    ex.validate()
    if len(ex) == 0:
        raise ValueError(f"task {getattr(task, 'name', task)!r} has no examples")

    for eid in ex.ids:  # ids become file names in the run directory: no path escapes
        validate_name(eid, "example_id")
    if shard is not None:
        index, count = (int(shard[0]), int(shard[1]))
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
        ex = ex.select(list(range(index, len(ex), count)))

    resolved = {
        "task": task.describe(),
        "model": describe_model(model),
        "clamp": clamp.describe(),
        "recovery": cfg.to_dict(),
        "modes": modes,
        "delta_site": (delta_site if isinstance(delta_site, str) else (delta_site or [None])[0])
        or clamp.site_clamps[0].site.hook_name,
        **({"delta_sites": delta_site} if isinstance(delta_site, list) and len(delta_site) > 1 else {}),
        "protocol": chosen,
        **(extra_config or {}),
    }
    if shard is not None:
        resolved["shard"] = {"index": index, "count": count}
    if executor is not None:
        if out is None or shard is not None:
            raise ValueError("an executor needs out=DIR (each unit writes a run directory) and no shard "
                             "(it shards the run itself)")
        return executor.recover(model, clamp, task, RunPlan(
            out=Path(out), config=resolved, example_ids=list(ex.ids), modes=all_modes, report=report,
            overwrite=overwrite, progress=progress,
            options={"projection": modes, "batch_size": batch_size, "delta_site": delta_site, "config": cfg,
                     "extra_config": extra_config, "max_batch_tokens": max_batch_tokens,
                     "memory_limit_mb": memory_limit_mb, "baselines": baselines or None,
                     "summarize_extra": summarize_extra, "protocol": chosen}))
    run_dir = None
    if out is not None:
        run_dir = RunDirectory(out, config=resolved, overwrite=overwrite)
    stop = StopOnSignal()
    try:
        stop.__enter__()  # SIGINT / SIGTERM: stop once the batch in flight is written
        # a clamp whose encoder columns fill (almost) the whole residual leaves the encoder mode nothing to move
        run_warnings = encoder_null_warnings(clamp, _delta_sites(clamp, delta_site), cfg.rcond) \
            if "encoder" in modes else []
        flips = find_flips(defended, task, ex, batch_size=batch_size, progress=progress)
        stop.check()
        done = run_dir.done() if run_dir is not None else set()
        records: list[dict[str, Any]] = []
        outcomes: dict[str, list[ExampleOutcome]] = {m: [] for m in all_modes}
        valid_idx = torch.nonzero(flips.valid).flatten().tolist()
        lengths = ex.attention_mask.sum(dim=1)
        tokens = _token_limit(model, max_batch_tokens, memory_limit_mb)
        oom = {"batch": batch_size, "oom_retries": 0}

        def emit(rec: dict[str, Any], oc: ExampleOutcome | None) -> None:
            if run_dir is not None:
                if oc is not None:
                    meta = getattr(baselines.get(rec["mode"]), "tensor_metadata", None)
                    run_dir.save_tensors(rec["mode"], rec["example_id"], {**oc.tensors, **history_tensors(oc.history)},
                                         metadata=meta)
                run_dir.append_record(rec)
            else:
                records.append(rec)

        for mode in all_modes:
            for i, eid in enumerate(ex.ids):
                if not bool(flips.valid[i]) and (eid, mode) not in done:
                    emit(flips.record(i, eid, mode, task), None)
            todo = [i for i in valid_idx if (ex.ids[i], mode) not in done]
            bar = progress_bar(len(todo), f"recover [{mode}]", enabled=progress)
            def emit_result(i: int, oc: ExampleOutcome | None, err: str | None, retries: int) -> None:
                rec = flips.record(i, ex.ids[i], mode, task, oc, err)
                if retries:
                    rec["oom_retries"] = retries
                if oc is not None and mode not in baselines:
                    rec.update(path_features(clamp, delta_site, oc.tensors))
                emit(rec, oc)
                if oc is not None:
                    outcomes[mode].append(oc)
                bar.update(1)

            def run_chunk(chunk: list[int], mode: str = mode) -> list:
                if mode in baselines:
                    return _recover_chunk(partial(baselines[mode].recover, defended, task, cfg=cfg), ex.select(chunk))
                return _recover_chunk(partial(_recover_residual, defended, task, mode=mode, cfg=cfg,
                                              delta_site=delta_site), ex.select(chunk))

            if cfg.shared_delta:  # one delta optimised on every example, applied to each valid flip
                if todo:
                    _, shared = recover_shared(defended, task, ex, todo, mode=mode, cfg=cfg, delta_site=delta_site,
                                               batch_size=oom["batch"])
                    for i, oc in zip(todo, shared):
                        emit_result(i, oc, None, 0)
                bar.close()
                continue
            start = 0
            while start < len(todo):
                chunk = _next_chunk(todo, start, oom["batch"], lengths, tokens)
                _recover_fitting(run_chunk, chunk, emit_result, oom)
                start += len(chunk)
                stop.check()
            bar.close()

        if run_dir is not None:
            records = run_dir.records()
        summary = summarize(records, task=getattr(task, "name", "task"), modes=all_modes,
                            extra={"n_examples": len(ex), "clamp": clamp.describe(),
                                   "model": resolved["model"], "seconds": time.perf_counter() - t0,
                                   "oom_retries": oom["oom_retries"], "protocol": chosen["name"],
                                   "delta": {"shared": cfg.shared_delta,
                                             "n_optimised": len(ex) if cfg.shared_delta else None}})
        if run_warnings:
            summary["warnings"] = run_warnings
        if summarize_extra is not None:
            summarize_extra(summary, records)
        if run_dir is not None:
            run_dir.write_summary(summary)
        path = run_dir.path if run_dir is not None else None
    except Interrupted as err:
        if run_dir is None:
            raise
        raise Interrupted(err.signum, run_dir.path, len(run_dir.done())) from None
    finally:
        stop.__exit__(None, None, None)
        if run_dir is not None:
            run_dir.close()
    if path is not None and report:
        write_report(path)
    return RunResult(summary=summary, records=records, path=path, flips=flips,
                     seconds=time.perf_counter() - t0, outcomes=outcomes)
