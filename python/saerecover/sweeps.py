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

from . import collection
from .stats import wilson_interval

__all__ = ["SweepResult", "attribution_clamps", "budget_sweep", "check_grid", "feature_sweep", "robustness",
           "write_sweep_report"]


@dataclass
class SweepResult:
    """The combined summary, the run of every grid point, and where they were written."""

    summary: dict[str, Any]
    runs: dict[Any, Any] = field(default_factory=dict)  # grid value -> RunResult
    path: Path | None = None

    def table(self) -> str:
        return sweep_table(self.summary)


def _modes(projection: str | Sequence[str]) -> list[str]:
    return [projection] if isinstance(projection, str) else list(projection)


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
                 extra_config: Mapping[str, Any] | None = None, **overrides: Any) -> SweepResult:
    """Recover ``task`` under ``clamp`` at every budget of ``budgets`` (each > 0): one run
    directory ``OUT/budget-<b>/`` per budget, then the combined summary with a ``budget_sweep``
    list and a ``robustness`` entry (:func:`robustness`), a report and a plot.

    overrides: other RecoveryConfig fields, the same for every budget.
    """
    from .pipeline import recover

    grid = check_grid(budgets, "budgets", integer=False)
    if "budget" in overrides:
        raise TypeError("budget_sweep sets the budget itself; give the grid as budgets=[...]")
    modes = _modes(projection)
    root = collection.prepare(out)
    runs: dict[float, Any] = {}
    rows: list[dict[str, Any]] = []
    for b in grid:
        name = collection.member_name("budget", b)
        res = recover(model, clamp, task, projection=modes, out=root / name, batch_size=batch_size,
                      progress=progress, overwrite=overwrite, report=report,
                      extra_config={**(extra_config or {}), "sweep": {"kind": "budget", "budget": b}},
                      budget=b, **overrides)
        runs[b] = res
        rows += [collection.mode_row(res.summary["modes"][m], mode=m, budget=b, run_dir=name) for m in modes]
    rob = robustness({b: r.records for b, r in runs.items()}, modes)
    first = next(iter(runs.values()))
    summary = {
        "collection": "budget_sweep",
        "task": getattr(task, "name", "task"),
        "clamp": clamp.describe(),
        "budgets": grid,
        "modes": modes,
        "n_examples": first.summary.get("n_examples"),
        "n_valid": first.summary.get("n_valid"),
        "recovery": dict(overrides),
        "budget_sweep": rows,
        "robustness": rob,
        "intervals": {"rates": "Wilson score 95%", "continuous": "means over valid examples"},
    }
    write_sweep_report(root, summary)
    return SweepResult(summary=summary, runs=runs, path=root)


def write_sweep_report(root: str | Path, summary: Mapping[str, Any]) -> Path:
    """(Re)write a sweep's summary.json, report.md and plot from its summary; the report path."""
    root = Path(root)
    kind = summary.get("collection")
    if kind == "budget_sweep":
        collection.write(root, summary, _budget_report(summary, [_plot_budget(summary, root)]))
    elif kind == "feature_sweep":
        collection.write(root, summary, _feature_report(summary, [_plot_features(summary, root)]))
    else:
        raise ValueError(f"{root}: summary.json is a {kind!r} collection, not a budget or feature sweep")
    return root / "report.md"


def _plot_rate_and_drift(ax_rate: Any, ax_drift: Any, rows: Sequence[Mapping[str, Any]], mode: str, key: str,
                         color: Any) -> list[Any]:
    """One mode's recovery rate (Wilson bars) and mean activation drift against ``key``; the x values."""
    sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r[key])
    xs = [r[key] for r in sel]
    ys = [r["recovery_rate"] if r["recovery_rate"] is not None else float("nan") for r in sel]
    lo = [max(0.0, y - r["recovery_rate_ci95"][0]) if r.get("recovery_rate_ci95") else 0.0 for y, r in zip(ys, sel)]
    hi = [max(0.0, r["recovery_rate_ci95"][1] - y) if r.get("recovery_rate_ci95") else 0.0 for y, r in zip(ys, sel)]
    ax_rate.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=color, label=mode)
    drift = [float("nan") if r["activation_drift_mean"] is None else r["activation_drift_mean"] for r in sel]
    ax_drift.plot(xs, drift, marker="o", color=color, label=mode)
    return xs


def _plot_budget(summary: Mapping[str, Any], root: Path) -> str:
    rows = summary["budget_sweep"]
    modes = list(summary["modes"])
    col = collection.colors(modes)
    fig = collection.figure(15.0, 4.4)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for m in modes:
        xs = _plot_rate_and_drift(ax1, ax2, rows, m, "budget", col[m])
        per = summary["robustness"][m]["per_example"]
        n = len(per)
        if n:
            ax3.step(xs, [sum(1 for v in per.values() if v is not None and v <= x) / n for x in xs],
                     where="post", marker="o", color=col[m], label=m)
    ax1.set_ylabel("recovery rate (95% Wilson CI)")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title("Recovery vs budget")
    ax2.set_ylabel("mean activation drift ||E_S(h_rec) - E_S(h_def)||")
    ax2.set_title("Drift vs budget")
    ax3.set_ylabel("share recovered at or below budget")
    ax3.set_ylim(-0.05, 1.05)
    ax3.set_title("Smallest recovering budget (CDF)")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("budget ||delta||_F <= eps (C4)")
        grid = summary["budgets"]
        if len(grid) > 1 and max(grid) / min(grid) >= 10:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(title="mode", loc="best", fontsize="small")
    fname = "budget_sweep.png"
    collection.save_figure(fig, root / collection.PLOTS_DIR / fname)
    return fname


def _budget_report(summary: Mapping[str, Any], plots: Sequence[str]) -> str:
    rob_rows = []
    for m, r in summary["robustness"].items():
        rob_rows.append([m, str(r["n"]), collection.num(r["q1"]) if r["q1"] is not None else "never",
                         collection.num(r["median"]) if r["median"] is not None else "never",
                         collection.num(r["q3"]) if r["q3"] is not None else "never",
                         collection.rate_ci(r["never_share"], r["never_share_ci95"]), str(r["nonmonotone"])])
    lines = [f"# saerecover budget sweep: {summary['task']}", "",
             f"Budgets {', '.join(collection.num(b) for b in summary['budgets'])}; "
             f"modes {', '.join(summary['modes'])}; "
             f"{summary['n_examples']} examples, {summary['n_valid']} valid flips.", "",
             "## Recovery and drift against the budget", "", sweep_table(summary), "",
             "## Robustness of the clamp: the smallest budget that recovers each example", "",
             "Over the examples valid at every budget; quantiles on the budget grid, \"never\" counted as "
             "infinite.", "",
             collection.markdown_table(["mode", "examples", "q1", "median", "q3", "never recovered [95% Wilson]",
                                        "non-monotone"], rob_rows), ""]
    lines += ["## Plots", ""] + [f"![{p}]({collection.PLOTS_DIR}/{p})" for p in plots] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# feature-set size


def attribution_clamps(model: Any, site: Any, task: Any, *, value: float = -5.0, mode: str = "set",
                       where: str = "active", positions: str = "answer") -> Callable[[int], Any]:
    """``k -> Clamp`` of the top-k features by attribution (scores computed once, so the sets
    are nested), with the given clamp settings."""
    from .clamp import Clamp
    from .features import attribution_scores, top_features

    scores = attribution_scores(model, site, task, task.examples(), positions=positions)

    def make(k: int) -> Any:
        feats = top_features(scores, int(k))
        return Clamp({site: feats}, value=value, mode=mode, where=where)  # type: ignore[arg-type]

    return make


def feature_sweep(model: Any, task: Any, ks: Sequence[int], *, make_clamp: Callable[[int], Any],
                  out: str | Path, projection: str | Sequence[str] = ("none", "encoder"), batch_size: int = 32,
                  progress: bool = False, overwrite: bool = False, report: bool = True,
                  extra_config: Mapping[str, Any] | None = None, **overrides: Any) -> SweepResult:
    """Recover ``task`` under ``make_clamp(K)`` for every K of ``ks``: one run directory
    ``OUT/k-<K>/`` per K (valid flips recomputed for each clamp), then the combined summary with a
    ``feature_sweep`` list, a report and a plot.

    overrides: RecoveryConfig fields, the same for every K.
    """
    from .pipeline import recover

    grid = check_grid(ks, "ks", integer=True)
    modes = _modes(projection)
    root = collection.prepare(out)
    runs: dict[int, Any] = {}
    rows: list[dict[str, Any]] = []
    for k in grid:
        clamp = make_clamp(k)
        n_feat = sum(int(sc.features.numel()) for sc in clamp.site_clamps)
        name = collection.member_name("k", k)
        res = recover(model, clamp, task, projection=modes, out=root / name, batch_size=batch_size,
                      progress=progress, overwrite=overwrite, report=report,
                      extra_config={**(extra_config or {}), "sweep": {"kind": "features", "k": k}}, **overrides)
        runs[k] = res
        rows += [collection.mode_row(res.summary["modes"][m], mode=m, k=k, n_features=n_feat,
                                     n_examples=res.summary.get("n_examples"), run_dir=name) for m in modes]
    summary = {
        "collection": "feature_sweep",
        "task": getattr(task, "name", "task"),
        "ks": grid,
        "modes": modes,
        "recovery": dict(overrides),
        "feature_sweep": rows,
        "intervals": {"rates": "Wilson score 95%", "continuous": "means over valid examples"},
    }
    write_sweep_report(root, summary)
    return SweepResult(summary=summary, runs=runs, path=root)


def _plot_features(summary: Mapping[str, Any], root: Path) -> str:
    rows = summary["feature_sweep"]
    modes = list(summary["modes"])
    col = collection.colors(modes)
    fig = collection.figure(10.5, 4.4)
    ax1, ax2 = fig.subplots(1, 2)
    for m in modes:
        _plot_rate_and_drift(ax1, ax2, rows, m, "k", col[m])
    first = sorted((r for r in rows if r["mode"] == modes[0]), key=lambda r: r["k"])
    axv = ax1.twinx()
    axv.bar([r["k"] for r in first], [r["n_valid"] or 0 for r in first], alpha=0.15, color="0.3",
            width=max(0.4, 0.3 * min(np.diff([r["k"] for r in first]), default=1)))
    axv.set_ylabel("valid flips (bars)")
    ax1.set_ylabel("recovery rate (95% Wilson CI)")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title("Recovery vs feature-set size")
    ax2.set_ylabel("mean activation drift ||E_S(h_rec) - E_S(h_def)||")
    ax2.set_title("Drift vs feature-set size")
    for ax in (ax1, ax2):
        ax.set_xlabel("K (clamped features)")
        ax.grid(alpha=0.3)
        ax.legend(title="mode", loc="best", fontsize="small")
    fname = "feature_sweep.png"
    collection.save_figure(fig, root / collection.PLOTS_DIR / fname)
    return fname


def _feature_report(summary: Mapping[str, Any], plots: Sequence[str]) -> str:
    lines = [f"# saerecover feature-set sweep: {summary['task']}", "",
             f"K in {', '.join(str(k) for k in summary['ks'])}; modes {', '.join(summary['modes'])}. "
             "Valid flips are recomputed for each K.", "",
             sweep_table(summary), ""]
    lines += ["## Plots", ""] + [f"![{p}]({collection.PLOTS_DIR}/{p})" for p in plots] + [""]
    return "\n".join(lines)


def sweep_table(summary: Mapping[str, Any]) -> str:
    """One row per (grid value, mode) of a budget or feature sweep summary."""
    if "budget_sweep" in summary:
        key, title, rows = "budget", "budget", summary["budget_sweep"]
    else:
        key, title, rows = "k", "K", summary.get("feature_sweep") or []
    body = [[collection.num(r[key]), r["mode"], *collection.mode_cells(r)] for r in rows]
    return collection.markdown_table([title, "mode", *collection.mode_header()], body)
