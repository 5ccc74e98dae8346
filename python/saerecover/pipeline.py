"""One verb for the whole method: find the valid flips, recover them per mode, write the run.

base pass (B true?) -> defended pass (B false?) -> valid flips -> recovery per mode, batched
-> records (appended as each batch finishes) -> summary -> report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .clamp import Clamp
from .defense import DefendedModel
from .models.base import ModelAdapter
from .recovery import PROJECTIONS, ExampleOutcome, RecoveryConfig, recover_batch
from .tasks.base import Examples, Task

RECORD_SCHEMA = 1


@dataclass
class Flips:
    """Base and defended behavior scores for every example; valid = B(base) and not B(defended)."""

    base: torch.Tensor
    defended: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return (self.base > 0) & ~(self.defended > 0)


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
        from .report import summary_table

        return summary_table(self.summary)


def behavior_scores(defended: DefendedModel, task: Task, ex: Examples, *, with_clamp: bool,
                    batch_size: int = 64) -> torch.Tensor:
    """Task scores (n,) of the base (with_clamp=False) or defended model, no gradients."""
    out = []
    with torch.no_grad():
        for start in range(0, len(ex), batch_size):
            part = ex.select(list(range(start, min(start + batch_size, len(ex))))).to(defended.model.device)
            logits = defended.forward(part, defended=with_clamp).logits
            out.append(task.score(logits, part).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def find_flips(defended: DefendedModel, task: Task, ex: Examples, *, batch_size: int = 64) -> Flips:
    return Flips(base=behavior_scores(defended, task, ex, with_clamp=False, batch_size=batch_size),
                 defended=behavior_scores(defended, task, ex, with_clamp=True, batch_size=batch_size))


def describe_model(model: ModelAdapter) -> dict[str, Any]:
    return {
        "name": str(getattr(model, "name", getattr(getattr(model.model, "config", None), "_name_or_path", "")) or ""),
        "backend": model.backend,
        "dtype": str(model.dtype).replace("torch.", ""),
        "n_layers": model.n_layers,
        "d_model": model.d_model,
    }


def _record(oc: ExampleOutcome | None, example_id: str, mode: str, flips: Flips, i: int,
            error: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "example_id": example_id,
        "mode": mode,
        "valid": bool(flips.valid[i]),
        "base_score": float(flips.base[i]),
        "defended_score": float(flips.defended[i]),
        "recovered": None,
        "failed": error is not None,
        "error": error,
    }
    if oc is not None:
        rec.update({"recovered": oc.recovered, "recovered_score": oc.recovered_score, "steps": oc.steps})
        rec.update(oc.metrics)
    return rec


def _recover_chunk(defended, task, part, mode, cfg, delta_site):
    """Recover a batch; if it hits a non-finite value, retry one by one and mark the culprits."""
    try:
        return [(oc, None) for oc in recover_batch(defended, task, part, mode=mode, cfg=cfg, delta_site=delta_site)]
    except FloatingPointError:
        if len(part) == 1:
            raise
    results = []
    for j in range(len(part)):
        single = part.select([j])
        try:
            results.append((recover_batch(defended, task, single, mode=mode, cfg=cfg, delta_site=delta_site)[0], None))
        except FloatingPointError as err:
            results.append((None, f"non-finite loss or gradient: {err}"))
    return results


def recover(
    model: ModelAdapter,
    clamp: Clamp,
    task: Task,
    *,
    projection: str | Sequence[str] = ("none", "encoder"),
    out: str | Path | None = None,
    batch_size: int = 32,
    delta_site: str | None = None,
    config: RecoveryConfig | None = None,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
    report: bool = True,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> RunResult:
    """Stress-test ``clamp`` on ``task``: recover every valid flip in each projection mode.

    overrides: RecoveryConfig fields (steps, lr, budget, optimizer, positions, ...).
    out: a run directory; an existing one with the same config resumes where it stopped
    (``overwrite=True`` empties it first). shard: ``(i, n)`` runs only examples i, i+n, i+2n, ...
    so that n processes can share the work; ``saerecover merge`` joins their run directories.
    """
    t0 = time.perf_counter()
    modes = [projection] if isinstance(projection, str) else list(projection)
    bad = [m for m in modes if m not in PROJECTIONS]
    if bad or not modes:
        raise ValueError(f"unknown projection mode(s) {bad}; valid: {', '.join(PROJECTIONS)}")
    cfg = config or RecoveryConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"unknown recovery option {key!r}; valid: {', '.join(cfg.to_dict())}")
        setattr(cfg, key, value)
    cfg.validate()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(clamp) == 0:
        raise ValueError("the clamp has no sites: nothing is defended")
    defended = DefendedModel(model, clamp)
    if delta_site is not None and clamp.at(delta_site) is None:
        raise ValueError(f"delta site {delta_site!r} is not clamped; clamped sites: "
                         f"{[sc.site.hook_name for sc in clamp.site_clamps]}")
    ex = task.examples()
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
        "delta_site": delta_site or clamp.site_clamps[0].site.hook_name,
        **(extra_config or {}),
    }
    if shard is not None:
        resolved["shard"] = {"index": index, "count": count}
    run_dir = None
    if out is not None:
        from .runs import RunDirectory

        run_dir = RunDirectory(out, config=resolved, overwrite=overwrite)
    try:
        flips = find_flips(defended, task, ex, batch_size=batch_size)
        done = run_dir.done() if run_dir is not None else set()
        records: list[dict[str, Any]] = []
        outcomes: dict[str, list[ExampleOutcome]] = {m: [] for m in modes}
        valid_idx = torch.nonzero(flips.valid).flatten().tolist()

        def emit(rec: dict[str, Any], oc: ExampleOutcome | None) -> None:
            if run_dir is not None:
                if oc is not None:
                    run_dir.save_tensors(rec["mode"], rec["example_id"], oc.tensors)
                run_dir.append_record(rec)
            else:
                records.append(rec)

        for mode in modes:
            for i, eid in enumerate(ex.ids):
                if not bool(flips.valid[i]) and (eid, mode) not in done:
                    emit(_record(None, eid, mode, flips, i), None)
            todo = [i for i in valid_idx if (ex.ids[i], mode) not in done]
            bar = tqdm(total=len(todo), desc=f"recover [{mode}]", disable=not progress or not todo, leave=False)
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                for j, (oc, err) in enumerate(_recover_chunk(defended, task, ex.select(chunk), mode, cfg, delta_site)):
                    i = chunk[j]
                    emit(_record(oc, ex.ids[i], mode, flips, i, err), oc)
                    if oc is not None:
                        outcomes[mode].append(oc)
                bar.update(len(chunk))
            bar.close()

        from .stats import summarize

        if run_dir is not None:
            records = run_dir.records()
        summary = summarize(records, task=getattr(task, "name", "task"), modes=modes,
                            extra={"n_examples": len(ex), "clamp": clamp.describe(),
                                   "model": resolved["model"], "seconds": time.perf_counter() - t0})
        if run_dir is not None:
            run_dir.write_summary(summary)
        path = run_dir.path if run_dir is not None else None
    finally:
        if run_dir is not None:
            run_dir.close()
    if path is not None and report:
        from .report import write_report

        write_report(path)
    return RunResult(summary=summary, records=records, path=path, flips=flips,
                     seconds=time.perf_counter() - t0, outcomes=outcomes)
