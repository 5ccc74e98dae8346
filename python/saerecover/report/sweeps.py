"""Reports of budget and feature-set sweeps: recovery and drift against the budget or the
feature-set size, and the robustness score (smallest recovering budget)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saerecover.report.document import Figure, Page, Section, Table
from saerecover.report.figures import colors, figure, save_figure
from saerecover.report.format import mode_cells, mode_header, num, rate_ci
from saerecover.runs import collection


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
    palette = colors(modes)
    fig = figure(15.0, 4.4)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for m in modes:
        xs = _plot_rate_and_drift(ax1, ax2, rows, m, "budget", palette[m])
        per = summary["robustness"][m]["per_example"]
        n = len(per)
        if n:
            ax3.step(xs, [sum(1 for v in per.values() if v is not None and v <= x) / n for x in xs],
                     where="post", marker="o", color=palette[m], label=m)
    ax1.set_ylabel("recovery rate (95% Wilson CI)")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title("Recovery vs budget")
    ax2.set_ylabel("mean activation drift ||E_S(h_rec) - E_S(h_def)||")
    ax2.set_title("Drift vs budget")
    ax3.set_ylabel("share recovered at or below budget")
    ax3.set_ylim(-0.05, 1.05)
    ax3.set_title("Smallest recovering budget (CDF)")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("relative budget ||delta||_F <= eps x ||h_def|| (C4)" if summary.get("relative")
                      else "budget ||delta||_F <= eps (C4)")
        grid = summary["budgets"]
        if len(grid) > 1 and max(grid) / min(grid) >= 10:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(title="mode", loc="best", fontsize="small")
    fname = "budget_sweep.png"
    save_figure(fig, root / collection.PLOTS_DIR / fname)
    return fname


def budget_report(root: Path, summary: Mapping[str, Any]) -> Page:
    """The report of a budget sweep (its plot written under ``root``)."""
    plot = _plot_budget(summary, root)
    rob_rows = []
    for m, r in summary["robustness"].items():
        rob_rows.append([m, str(r["n"]), num(r["q1"]) if r["q1"] is not None else "never",
                         num(r["median"]) if r["median"] is not None else "never",
                         num(r["q3"]) if r["q3"] is not None else "never",
                         rate_ci(r["never_share"], r["never_share_ci95"]), str(r["nonmonotone"])])
    return Page(f"saerecover budget sweep: {summary['task']}", [
        f"Budgets {', '.join(num(b) for b in summary['budgets'])}; modes {', '.join(summary['modes'])}; "
        f"{summary['n_examples']} examples, {summary['n_valid']} valid flips."], [
        Section("Recovery and drift against the budget", [sweep_rows(summary)]),
        Section("Robustness of the clamp: the smallest budget that recovers each example", [
            "Over the examples valid at every budget; quantiles on the budget grid, \"never\" counted as infinite.",
            Table(["mode", "examples", "q1", "median", "q3", "never recovered [95% Wilson]", "non-monotone"],
                  rob_rows)]),
        Section("Plots", [Figure(f"{collection.PLOTS_DIR}/{plot}",
                                 "Recovery rate (Wilson bars) and mean activation drift against the budget, and "
                                 "the share of examples recovered at or below each budget.")]),
    ])


def _plot_features(summary: Mapping[str, Any], root: Path) -> str:
    rows = summary["feature_sweep"]
    modes = list(summary["modes"])
    palette = colors(modes)
    fig = figure(10.5, 4.4)
    ax1, ax2 = fig.subplots(1, 2)
    for m in modes:
        _plot_rate_and_drift(ax1, ax2, rows, m, "k", palette[m])
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
    save_figure(fig, root / collection.PLOTS_DIR / fname)
    return fname


def feature_report(root: Path, summary: Mapping[str, Any]) -> Page:
    """The report of a feature-set sweep (its plot written under ``root``)."""
    plot = _plot_features(summary, root)
    return Page(f"saerecover feature-set sweep: {summary['task']}", [
        f"K in {', '.join(str(k) for k in summary['ks'])}; modes {', '.join(summary['modes'])}. "
        "Valid flips are recomputed for each K.", sweep_rows(summary)], [
        Section("Plots", [Figure(f"{collection.PLOTS_DIR}/{plot}",
                                 "Recovery rate (Wilson bars, valid flips as grey bars) and mean activation "
                                 "drift against the number of clamped features K.")]),
    ])


def sweep_rows(summary: Mapping[str, Any]) -> Table:
    """One row per (grid value, mode) of a budget or feature sweep summary."""
    if "budget_sweep" in summary:
        key, title, rows = "budget", "budget", summary["budget_sweep"]
    else:
        key, title, rows = "k", "K", summary.get("feature_sweep") or []
    return Table([title, "mode", *mode_header()], [[num(r[key]), r["mode"], *mode_cells(r)] for r in rows])


def sweep_table(summary: Mapping[str, Any]) -> str:
    """:func:`sweep_rows` as a markdown table."""
    return sweep_rows(summary).markdown()
