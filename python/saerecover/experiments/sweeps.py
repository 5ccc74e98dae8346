"""Sweeps: one recovery run per grid point, with a combined summary and plot.

- :func:`budget_sweep`: recovery and drift against the norm budget (C4) of one clamp, per mode,
  and from it a robustness score of the clamp: per example (valid at every budget), the smallest
  budget that recovers it; its distribution (median, quartiles, share never recovered) per mode.
  PAPER_NOTES: "budget curves as a per-clamp robustness score".
- :func:`feature_sweep`: recovery against the feature-set size K, the valid flips recomputed for
  every K (a larger clamp flips more examples).

Both write a collection (see :mod:`saerecover.collection`): ``OUT/budget-<b>/`` or ``OUT/k-<K>/``
run directories plus ``OUT/summary.json`` (``"budget_sweep"`` / ``"feature_sweep"`` rows: mode,
grid value, recovery rate with its Wilson interval, drifts), ``OUT/report.md`` and
``OUT/plots/*.png``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saerecover.core.clamp import Clamp
from saerecover.core.selection import attribution_scores, top_features
from saerecover.experiments.pipeline import recover
from saerecover.experiments.study import Study, study_dir
from saerecover.report.collections import collection_table, write_collection_report
from saerecover.runs import collection
from saerecover.runs.stats import wilson_interval

__all__ = ["SweepResult", "attribution_clamps", "budget_sweep", "check_grid", "feature_sweep", "robustness",
           ]


@dataclass
class SweepResult:
    """The combined summary, the run of every grid point, and where they were written."""

    summary: dict[str, Any]
    runs: dict[Any, Any] = field(default_factory=dict)  # grid value -> RunResult
    path: Path | None = None

    def table(self) -> str:
        return collection_table(self.summary)


def _modes(projection: str | Sequence[str]) -> list[str]:
    return [projection] if isinstance(projection, str) else list(projection)


def _study(executor: Any, root: Path, progress: bool) -> Study | None:
    """The study that runs a sweep's points on ``executor`` (None: each in this process, in turn)."""
    return Study(executor, study_dir(root), progress=progress) if executor is not None else None


def check_grid(values: Sequence[Any], what: str, *, integer: bool) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{what} must be a non-empty list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or v <= 0:
            raise ValueError(f"every {what[:-1]} must be a finite number > 0, got {v!r}")
        if integer and int(v) != v:
            raise ValueError(f"every {what[:-1]} must be an integer, got {v!r}")
        out.append(int(v) if integer else float(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{what} repeat: {out}")
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# budget


def robustness(records_by_budget: Mapping[float, Sequence[Mapping[str, Any]]], modes: Sequence[str]) -> dict[str, Any]:
    """Per mode, the smallest budget that recovers each example valid at every budget.

    Returns ``{mode: {n, median, q1, q3, never, never_share, never_share_ci95, recovered_min,
    nonmonotone, per_example}}``. Quantiles are taken over all such examples with "never" as
    +infinity (so a median is ``None`` when half or more are never recovered), on the budget
    grid itself (inverted-CDF quantiles). ``nonmonotone`` counts examples recovered at some
    budget but not at a larger one (optimisation noise, not a property of the clamp).
    """
    budgets = sorted(records_by_budget)
    out: dict[str, Any] = {}
    for mode in modes:
        valid_at: list[set[str]] = []
        recovered: dict[float, set[str]] = {}
        for b in budgets:
            recs = [r for r in records_by_budget[b] if r.get("mode") == mode]
            valid_at.append({str(r["example_id"]) for r in recs if r.get("valid") is True})
            recovered[b] = {str(r["example_id"]) for r in recs
                            if r.get("valid") is True and r.get("recovered") is True and r.get("failed") is not True}
        common = sorted(set.intersection(*valid_at)) if valid_at else []
        per_example: dict[str, float | None] = {}
        nonmono = 0
        for eid in common:
            hits = [b for b in budgets if eid in recovered[b]]
            per_example[eid] = hits[0] if hits else None
            if hits and any(eid not in recovered[b] for b in budgets if b > hits[0]):
                nonmono += 1
        vals = np.array([v if v is not None else np.inf for v in per_example.values()], dtype=np.float64)
        never = int(np.isinf(vals).sum())
        n = int(vals.size)

        def q(p: float) -> float | None:
            if n == 0:
                return None
            v = float(np.quantile(vals, p, method="inverted_cdf"))
            return v if math.isfinite(v) else None

        ci = wilson_interval(never, n)
        out[mode] = {
            "n": n,
            "q1": q(0.25),
            "median": q(0.5),
            "q3": q(0.75),
            "never": never,
            "never_share": never / n if n else None,
            "never_share_ci95": list(ci) if ci else None,
            "recovered_min": float(vals[np.isfinite(vals)].min()) if n - never > 0 else None,
            "nonmonotone": nonmono,
            "per_example": per_example,
        }
    return out


def budget_sweep(model: Any, clamp: Any, task: Any, budgets: Sequence[float], *, out: str | Path,
                 projection: str | Sequence[str] = ("none", "encoder"), batch_size: int = 32,
                 progress: bool = False, overwrite: bool = False, report: bool = True,
                 extra_config: Mapping[str, Any] | None = None, protocol: str | Mapping[str, Any] | None = None,
                 executor: Any = None, relative: bool = False, **overrides: Any) -> SweepResult:
    """Recover ``task`` under ``clamp`` at every budget of ``budgets`` (each > 0): one run
    directory ``OUT/budget-<b>/`` per budget, then the combined summary with a ``budget_sweep``
    list and a ``robustness`` entry (:func:`robustness`), a report and a plot.

    relative: the budgets are ``budget_rel`` (C4 relative to the defended residual's scale)
    instead of absolute. overrides: other RecoveryConfig fields, the same for every budget.
    protocol: each run's (:func:`saerecover.experiments.pipeline.recover`). executor: run the
    budgets (each a run, cut into units) as one study on it (``recover``'s executor,
    docs/clusters.md).
    """
    grid = check_grid(budgets, "budgets", integer=False)
    if "budget" in overrides or "budget_rel" in overrides and (relative or overrides["budget_rel"] is not None):
        raise TypeError("budget_sweep sets the budget itself; give the grid as budgets=[...] (relative=True for "
                        "budget_rel)")
    key = "budget_rel" if relative else "budget"
    modes = _modes(projection)
    root = collection.prepare(out)
    study = _study(executor, root, progress)
    runs: dict[float, Any] = {}
    for b in grid:
        runs[b] = recover(model, clamp, task, projection=modes, out=root / collection.member_name("budget", b),
                          batch_size=batch_size, progress=progress, overwrite=overwrite, report=report,
                          extra_config={**(extra_config or {}), "sweep": {"kind": "budget", "budget": b,
                                                                           **({"relative": True} if relative else {})}},
                          protocol=protocol, executor=study, **{**overrides, key: b})
    if study is not None:
        runs = study.run(runs)
    rows = [collection.mode_row(res.summary["modes"][m], mode=m, budget=b,
                                run_dir=collection.member_name("budget", b))
            for b, res in runs.items() for m in modes]
    rob = robustness({b: r.records for b, r in runs.items()}, modes)
    first = next(iter(runs.values()))
    summary = {
        "collection": "budget_sweep",
        "task": getattr(task, "name", "task"),
        "clamp": clamp.describe(),
        "budgets": grid,
        **({"relative": True} if relative else {}),
        "modes": modes,
        "n_examples": first.summary.get("n_examples"),
        "n_valid": first.summary.get("n_valid"),
        "recovery": dict(overrides),
        "protocol": first.summary.get("protocol"),
        "budget_sweep": rows,
        "robustness": rob,
        "intervals": {"rates": "Wilson score 95%", "continuous": "means over valid examples"},
    }
    write_collection_report(root, summary)
    return SweepResult(summary=summary, runs=runs, path=root)



# ----------------------------------------------------------------------------------------------
# feature-set size


def attribution_clamps(model: Any, site: Any, task: Any, *, value: float = -5.0, mode: str = "set",
                       where: str = "active", positions: str = "answer") -> Callable[[int], Any]:
    """``k -> Clamp`` of the top-k features by attribution (scores computed once, so the sets
    are nested), with the given clamp settings."""
    scores = attribution_scores(model, site, task, task.examples(), positions=positions)

    def make(k: int) -> Any:
        feats = top_features(scores, int(k))
        return Clamp({site: feats}, value=value, mode=mode, where=where)  # type: ignore[arg-type]

    return make


def feature_sweep(model: Any, task: Any, ks: Sequence[int], *, make_clamp: Callable[[int], Any],
                  out: str | Path, projection: str | Sequence[str] = ("none", "encoder"), batch_size: int = 32,
                  progress: bool = False, overwrite: bool = False, report: bool = True,
                  extra_config: Mapping[str, Any] | None = None, protocol: str | Mapping[str, Any] | None = None,
                  executor: Any = None, **overrides: Any) -> SweepResult:
    """Recover ``task`` under ``make_clamp(K)`` for every K of ``ks``: one run directory
    ``OUT/k-<K>/`` per K (valid flips recomputed for each clamp), then the combined summary with a
    ``feature_sweep`` list, a report and a plot.

    overrides: RecoveryConfig fields, the same for every K. protocol: each run's
    (:func:`saerecover.experiments.pipeline.recover`). executor: run the Ks (each a run, cut into
    units) as one study on it (``recover``'s executor, docs/clusters.md).
    """
    grid = check_grid(ks, "ks", integer=True)
    modes = _modes(projection)
    root = collection.prepare(out)
    study = _study(executor, root, progress)
    runs: dict[int, Any] = {}
    n_feat: dict[int, int] = {}
    for k in grid:
        clamp = make_clamp(k)
        n_feat[k] = sum(int(sc.features.numel()) for sc in clamp.site_clamps)
        runs[k] = recover(model, clamp, task, projection=modes, out=root / collection.member_name("k", k),
                          batch_size=batch_size, progress=progress, overwrite=overwrite, report=report,
                          extra_config={**(extra_config or {}), "sweep": {"kind": "features", "k": k}},
                          protocol=protocol, executor=study, **overrides)
    if study is not None:
        runs = study.run(runs)
    rows = [collection.mode_row(res.summary["modes"][m], mode=m, k=k, n_features=n_feat[k],
                                n_examples=res.summary.get("n_examples"), run_dir=collection.member_name("k", k))
            for k, res in runs.items() for m in modes]
    summary = {
        "collection": "feature_sweep",
        "task": getattr(task, "name", "task"),
        "ks": grid,
        "modes": modes,
        "recovery": dict(overrides),
        "protocol": next(iter(runs.values())).summary.get("protocol"),
        "feature_sweep": rows,
        "intervals": {"rates": "Wilson score 95%", "continuous": "means over valid examples"},
    }
    write_collection_report(root, summary)
    return SweepResult(summary=summary, runs=runs, path=root)


