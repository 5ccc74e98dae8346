"""The human-readable face of a run directory: report.md with a table like the paper's and PNG
plots (matplotlib, Agg canvas; pyplot's global state is never touched), and report.html with the
same numbers in one self-contained page (figures embedded; sortable tables; a per-example table
with the features that carry each recovery, linked to Neuronpedia when the SAE has an id).

Reads only what the run wrote (config.json, summary.json, records.jsonl, the histories in
tensors/, attribution.json when present), so a report can be rebuilt on any machine from a
copied run directory, without the model or the SAE.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saerecover.report.attribution import ATTRIBUTION_FILE, attribution_sections
from saerecover.report.document import Features, Figure, Section, Table
from saerecover.report.examples import example_table
from saerecover.report.figures import colors, error_bar, figure, finite, save_figure
from saerecover.report.format import NA, interval, num, rate_with_ci
from saerecover.report.html import HTML_FILE, data_uri, render
from saerecover.report.refusal import refusal_section
from saerecover.runs import SUMMARY_FILE, RunDirectoryError, atomic_write_text, open_run
from saerecover.runs.history import read_histories
from saerecover.runs.stats import CONTINUOUS_METRICS, summarize

__all__ = ["HTML_FILE", "REPORT_FILE", "summary_rows", "summary_table", "write_report"]

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


# (column title, how to render one mode's summary)
_Cell = Callable[[Mapping[str, Any]], str]



def _columns(summary: Mapping[str, Any]) -> list[tuple[str, _Cell]]:
    cols: list[tuple[str, _Cell]] = [
        ("valid flips", lambda m: str(m.get("n_valid", NA))),
        (
            "recovered / valid",
            lambda m: f"{m.get('recovered', NA)}/{m.get('n_valid', NA)}",
        ),
        ("recovery rate [95% CI]", lambda m: rate_with_ci(m, "recovery_rate")),
        ("activation drift", lambda m: num(m.get("activation_drift_mean"))),
        ("relative drift", lambda m: num(m.get("relative_drift_mean"))),
        ("floor violation", lambda m: num(m.get("floor_violation_mean"))),
        ("reactivated: of all pairs", lambda m: num(m.get("reactivated_fraction_mean"))),
        ("reactivated: of eligible pairs", lambda m: num(m.get("reactivated_fraction_eligible_mean"))),
        ("zero-reactivation rate", lambda m: rate_with_ci(m, "zero_reactivation_rate")),
        ("mean delta norm", lambda m: num(m.get("delta_norm_mean"))),
        ("relative delta norm", lambda m: num(m.get("relative_delta_norm_mean"))),
        ("c1 residual max", lambda m: num(m.get("c1_residual_max"))),
    ]
    modes = summary.get("modes") or {}
    if any((m or {}).get("n_failed") for m in modes.values()):
        cols.append(("failed", lambda m: str(m.get("n_failed", 0))))
    return cols



def _delta_lines(summary: Mapping[str, Any]) -> list[str]:
    """What delta was: one per example or one shared by all, and its budget (C4) in absolute
    terms and relative to the defended residual."""
    lines = []
    shared = summary.get("delta")
    if isinstance(shared, Mapping) and shared.get("shared"):
        lines.append(f"- **delta**: one vector shared by all {shared.get('n_optimised')} examples (the reference "
                     "code's IOI protocol), optimised on their mean loss, valid flips or not; the "
                     "per-example numbers apply it to each valid flip")
    elif isinstance(shared, Mapping):
        lines.append("- **delta**: one per example")
    modes = [m or {} for m in (summary.get("modes") or {}).values()]
    budget = next((m for m in modes if m.get("budget_mean") is not None), None)
    if budget is not None:
        lines.append(f"- **budget (C4)**: ||delta|| <= {num(budget['budget_mean'])} on average, "
                     f"{num(budget.get('relative_budget_mean'))} x the defended residual's scale at the "
                     "optimized rows (sqrt(rows) x the median row norm)")
    return [*lines, ""] if lines else []
def summary_rows(summary: Mapping[str, Any]) -> Table:
    """One row per mode, the paper's columns (see :func:`summary_table`)."""
    modes = summary.get("modes") or {}
    cols = _columns(summary)
    rows = [[str(name)] + [cell(m or {}) for _, cell in cols] for name, m in modes.items()]
    return Table(["mode"] + [title for title, _ in cols], rows)


def summary_table(summary: Mapping[str, Any]) -> str:
    """One row per mode, the paper's columns, as a markdown pipe table (also readable as text).

    Rates show their Wilson 95% interval; drifts and norms are means over valid, non-failed
    examples; ``n/a`` where there is nothing to average.
    """
    table = summary_rows(summary)
    return table.markdown() if table.rows else "(no modes in this summary)"


def _interval_table(summary: Mapping[str, Any]) -> Table | None:
    modes = summary.get("modes") or {}
    if not modes:
        return None
    if not any((m or {}).get(f"{k}_mean") is not None
               for m in modes.values() for k in CONTINUOUS_METRICS):
        return None
    rows = []
    for metric in CONTINUOUS_METRICS:
        row = [metric]
        for m in modes.values():
            m = m or {}
            mean = m.get(f"{metric}_mean")
            if mean is None:
                row.append(NA)
            else:
                n = m.get(f"{metric}_n")
                suffix = f" (n={n})" if n is not None else ""
                row.append(f"{num(mean)} {interval(m.get(f'{metric}_ci95'))}{suffix}".strip())
        rows.append(row)
    return Table(["metric"] + [str(k) for k in modes], rows)


# ----------------------------------------------------------------------------------------------
# config essentials


def _brief(v: Any, *, max_items: int = 8) -> str:
    """A one-line rendering of a config value: long lists are counted, dicts become k=v pairs."""
    if isinstance(v, Mapping):
        parts = [f"{k}={_brief(x, max_items=max_items)}" for k, x in v.items()]
        return ", ".join(parts) if parts else "{}"
    if isinstance(v, (list, tuple)):
        if len(v) > max_items:
            head = ", ".join(_brief(x) for x in v[:3])
            return f"[{head}, ... ({len(v)} items)]"
        return "[" + ", ".join(_brief(x) for x in v) + "]"
    if isinstance(v, float):
        return num(v, 4)
    if v is None:
        return "null"
    return str(v)


def _compact_json(v: Any, indent: int = 0) -> str:
    """JSON with one dict key per line and lists of scalars on one line (short feature lists)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(v, Mapping) and v:
        items = [f"{inner}{json.dumps(str(k))}: {_compact_json(x, indent + 1)}"
                 for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, list) and v and any(isinstance(x, (Mapping, list)) for x in v):
        items = [f"{inner}{_compact_json(x, indent + 1)}" for x in v]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(v, ensure_ascii=False, default=str)


def _task_name(config: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> str:
    if summary and isinstance(summary.get("task"), str):
        return summary["task"]
    t = config.get("task")
    if isinstance(t, Mapping):
        return str(t.get("name", "task"))
    return str(t) if t is not None else "task"


#: Config keys shown first under "Setup" (in this order) when present; see pipeline.recover.
_ESSENTIALS = (
    ("task", "task"),
    ("model", "model"),
    ("source", "source"),
    ("sae", "SAE"),
    ("site", "site"),
    ("sites", "sites"),
    ("clamp", "clamp"),
    ("delta_site", "delta site"),
    ("recovery", "recovery (optimizer)"),
    ("optimizer", "optimizer"),
    ("modes", "modes"),
    ("seed", "seed"),
)


def _clamp_sites(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each clamped site of the config: hook, its features (linked when the SAE has a
    Neuronpedia id) and the rest of its clamp, one line."""
    v = config.get("clamp")
    if not isinstance(v, (list, tuple)):
        return []
    out = []
    for sc in v:
        if not isinstance(sc, Mapping):
            continue
        feats = sc.get("features") if isinstance(sc.get("features"), (list, tuple)) else []
        rest = {k: x for k, x in sc.items() if k not in ("hook_name", "features", "neuronpedia_id")}
        out.append({"hook_name": str(sc.get("hook_name", "?")), "n": len(feats),
                    "features": Features(list(feats), sc.get("neuronpedia_id")),
                    "neuronpedia_id": sc.get("neuronpedia_id"), "rest": _brief(rest)})
    return out


def neuronpedia_id(config: Mapping[str, Any], hook_name: str | None = None) -> str | None:
    """The Neuronpedia id the run recorded for the SAE at ``hook_name`` (default: the delta
    site); None when its SAE has none."""
    hook = hook_name or config.get("delta_site")
    for sc in config.get("clamp") or []:
        if isinstance(sc, Mapping) and (hook is None or sc.get("hook_name") == hook):
            value = sc.get("neuronpedia_id")
            return str(value) if value else None
    return None


def _setup_items(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, one-line value) of the config's essentials other than the clamp."""
    return [(label, _brief(config[key])) for key, label in _ESSENTIALS if key in config and key != "clamp"]


def _setup_lines(config: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, label in _ESSENTIALS:
        if key not in config:
            continue
        v = config[key]
        sites = isinstance(v, (list, tuple)) and all(isinstance(x, Mapping) for x in v)
        if key == "clamp" and sites:
            lines.append(f"- **{label}**: {len(v)} site(s)")
            for sc in _clamp_sites(config):
                lines.append(f"  - `{sc['hook_name']}`: {sc['n']} features; {sc['rest']}")
        else:
            lines.append(f"- **{label}**: {_brief(v)}")
    return lines


# ----------------------------------------------------------------------------------------------
# plots




def _plot_rate_vs_drift(summary, records, plots: Path) -> tuple[str, str] | str:
    modes = summary.get("modes") or {}
    pts = []
    for name, m in modes.items():
        m = m or {}
        x, y = finite(m.get("relative_drift_mean")), finite(m.get("recovery_rate"))
        if x is not None and y is not None:
            pts.append((name, x, y, error_bar(x, m.get("relative_drift_ci95")),
                        error_bar(y, m.get("recovery_rate_ci95"))))
    if not pts:
        return "no mode has both a recovery rate and a mean relative drift"
    palette = colors(list(modes))
    fig = figure()
    ax = fig.add_subplot()
    for name, x, y, xe, ye in pts:
        ax.errorbar([x], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt="o",
                    color=palette[name], capsize=4, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("mean relative drift of defended features (95% bootstrap CI)")
    ax.set_ylabel("recovery rate (95% Wilson CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(left=min(0.0, ax.get_xlim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(title="mode", loc="best")
    ax.set_title("Recovery vs drift per mode")
    fname = "recovery_vs_drift.png"
    save_figure(fig, plots / fname)
    return (fname, "Recovery rate against mean relative drift, one point per mode; bars are "
                   "95% intervals (Wilson for the rate, bootstrap for the drift).")


def _plot_delta_vs_drift(summary, records, plots: Path) -> tuple[str, str] | str:
    from matplotlib.lines import Line2D

    ok = [r for r in records if r.get("valid") is True and r.get("failed") is not True]
    ykey = "activation_drift"
    if not any(finite(r.get(ykey)) is not None for r in ok):
        ykey = "relative_drift"
    pts = [
        (r["mode"], finite(r.get("relative_delta_norm")), finite(r.get(ykey)),
         r.get("recovered") is True)
        for r in ok
    ]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return "no valid example has both a relative delta norm and a drift"
    mode_names = list(dict.fromkeys([*(summary.get("modes") or {}), *(p[0] for p in pts)]))
    palette = colors(mode_names)
    fig = figure()
    ax = fig.add_subplot()
    for name in mode_names:
        for rec, marker in ((True, "o"), (False, "x")):
            sel = [p for p in pts if p[0] == name and p[3] == rec]
            if sel:
                ax.scatter([p[1] for p in sel], [p[2] for p in sel], marker=marker,
                           color=palette[name], alpha=0.7, s=28)
    handles = [Line2D([], [], color=palette[n], marker="s", linestyle="", label=n)
               for n in mode_names if any(p[0] == n for p in pts)]
    handles += [
        Line2D([], [], color="0.3", marker="o", linestyle="", label="recovered"),
        Line2D([], [], color="0.3", marker="x", linestyle="", label="not recovered"),
    ]
    ax.legend(handles=handles, loc="best", fontsize="small")
    ax.set_xlabel("relative delta norm ||delta||_F / ||h_def||_F")
    ax.set_ylabel(ykey.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.set_title("Per-example perturbation size vs drift")
    fname = "delta_vs_drift.png"
    save_figure(fig, plots / fname)
    return (fname, f"Each valid example: relative delta norm against {ykey.replace('_', ' ')}; "
                   "colour = mode, marker = recovered.")


#: History fields drawn against the step, in panel order: (field, axis label).
HISTORY_PANELS = (("loss", "loss"), ("phi_relative_drift", "relative drift of the defended features (Phi)"))


def _history_columns(h: Any) -> dict[str, list[float]] | None:
    """A history as columns (field -> one value per step): the saved form (a dict of lists) or
    a list of per-step dicts; None when it is neither or empty."""
    if isinstance(h, Mapping):
        cols = {str(k): [finite(x) for x in v] for k, v in h.items() if isinstance(v, list)}
    elif isinstance(h, list) and h and all(isinstance(x, Mapping) for x in h):
        keys = list(dict.fromkeys(k for x in h for k in x))
        cols = {str(k): [finite(x.get(k)) for x in h] for k in keys}
    else:
        return None
    return {k: [float("nan") if v is None else v for v in vals] for k, vals in cols.items() if vals} or None


def _plot_history(summary, records, plots: Path) -> tuple[str, str] | str | None:
    """Median and interquartile band of the loss and of the defended-feature drift against
    the step, per mode, over the valid examples with a saved history."""
    import numpy as np

    series: dict[str, dict[str, list[list[float]]]] = {}  # field -> mode -> one series per example
    for r in records:
        cols = _history_columns(r.get("history")) if r.get("valid") is True else None
        for key, _ in HISTORY_PANELS:
            if cols and key in cols and any(np.isfinite(cols[key])):
                series.setdefault(key, {}).setdefault(r["mode"], []).append(cols[key])
    if not series:
        return None  # nothing recorded per step: not worth a note
    panels = [(key, label) for key, label in HISTORY_PANELS if key in series]
    names = list(dict.fromkeys(m for key, _ in panels for m in series[key]))
    palette = colors(names)
    fig = figure(6.0 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        for name, runs in series[key].items():
            grid = np.full((len(runs), max(len(s) for s in runs)), np.nan)
            for i, s in enumerate(runs):
                grid[i, : len(s)] = s
            keep = np.isfinite(grid).any(axis=0)
            steps = np.arange(grid.shape[1])[keep]
            lo, med, hi = (np.nanpercentile(grid[:, keep], q, axis=0) for q in (25, 50, 75))
            ax.plot(steps, med, color=palette[name], label=f"{name} (median, n={len(runs)})")
            ax.fill_between(steps, lo, hi, color=palette[name], alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle("Optimization history")
    fname = "history.png"
    save_figure(fig, plots / fname)
    return (fname, "Per mode, the median over valid examples (band: 25th to 75th percentile) of the loss "
                   "and of the defended-feature drift ||Phi - Phi_def|| / ||Phi_def|| at each step "
                   "(examples that stop early drop out).")


#: Per-example quantities whose distribution per mode is drawn: (record key, axis label).
DISTRIBUTIONS = (("relative_drift", "relative drift of the clamped features"),
                 ("phi_relative_drift", "Phi relative drift (every clamped site)"),
                 ("delta_norm", "delta norm ||delta||_F"))


def _plot_distributions(summary, records, plots: Path) -> tuple[str, str] | str | None:
    """Per mode, the distribution over valid, evaluated examples of the drift and the delta
    norm: a box (quartiles, whiskers to 1.5 IQR) with every example as a point."""
    import numpy as np

    ok = [r for r in records if r.get("valid") is True and r.get("failed") is not True
          and r.get("recovered") is not None]
    multi_site = len(summary.get("clamp") or []) > 1
    panels = []
    for key, label in DISTRIBUTIONS:
        if key == "phi_relative_drift" and not multi_site:
            continue  # the same numbers as relative_drift for a clamp at the delta site only
        by_mode: dict[str, list[float]] = {}
        for r in ok:
            v = finite(r.get(key))
            if v is not None:
                by_mode.setdefault(r["mode"], []).append(v)
        if by_mode:
            panels.append((key, label, by_mode))
    if not panels:
        return None
    names = list(dict.fromkeys([*(summary.get("modes") or {}), *(m for _, _, d in panels for m in d)]))
    palette = colors(names)
    fig = figure(5.0 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)  # jitter of the points only
    for ax, (key, label, by_mode) in zip(axes, panels):
        present = [n for n in names if n in by_mode]
        ax.boxplot([by_mode[n] for n in present], positions=range(len(present)), widths=0.5, showfliers=False)
        for j, n in enumerate(present):
            ys = by_mode[n]
            ax.scatter(j + rng.uniform(-0.15, 0.15, len(ys)), ys, s=12, alpha=0.6, color=palette[n])
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present)
        ax.set_ylim(bottom=0.0)  # norms and drifts: from zero, so that a budget-saturated norm reads as one
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Per-example distributions by mode")
    fname = "distributions.png"
    save_figure(fig, plots / fname)
    return (fname, "Each valid, evaluated example as a point, per mode, over a box of the quartiles: "
                   + ", ".join(label for _, label, _ in panels) + ".")


def _budget_rows(sweep: Any) -> list[dict[str, Any]]:
    """Budget-sweep rows ``{mode, budget, recovery_rate, recovery_rate_ci95?}`` from either a list
    of such rows or ``{mode: [{budget, recovery_rate, ...}, ...]}``."""
    rows: list[dict[str, Any]] = []
    if isinstance(sweep, Mapping):
        for mode, items in sweep.items():
            if isinstance(items, list):
                rows += [{**x, "mode": mode} for x in items if isinstance(x, Mapping)]
    elif isinstance(sweep, list):
        rows = [dict(x) for x in sweep if isinstance(x, Mapping)]
    return [r for r in rows if finite(r.get("budget")) is not None
            and finite(r.get("recovery_rate")) is not None and "mode" in r]


def _plot_budget_sweep(summary, records, plots: Path) -> tuple[str, str] | str | None:
    if "budget_sweep" not in summary:
        return None
    rows = _budget_rows(summary["budget_sweep"])
    if not rows:
        return "summary has a budget_sweep entry but no rows with mode, budget and recovery_rate"
    names = list(dict.fromkeys(str(r["mode"]) for r in rows))
    palette = colors(names)
    fig = figure()
    ax = fig.add_subplot()
    for name in names:
        sel = sorted((r for r in rows if str(r["mode"]) == name), key=lambda r: float(r["budget"]))
        xs = [float(r["budget"]) for r in sel]
        ys = [float(r["recovery_rate"]) for r in sel]
        errs = [error_bar(y, r.get("recovery_rate_ci95")) for y, r in zip(ys, sel)]
        ax.errorbar(xs, ys, yerr=[[e[0] for e in errs], [e[1] for e in errs]], marker="o",
                    capsize=3, color=palette[name], label=name)
    ax.set_xlabel("budget ||delta||_F <= eps (C4)")
    ax.set_ylabel("recovery rate (95% Wilson CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(title="mode", loc="best")
    ax.set_title("Recovery vs budget")
    fname = "budget_sweep.png"
    save_figure(fig, plots / fname)
    return (fname, "Recovery rate as the perturbation budget grows.")


def warnings_section(summary: Mapping[str, Any]) -> Section | None:
    """The report's "Warnings" section: what the run warned about (``summary["warnings"]``, e.g.
    a clamp whose encoder columns leave the encoder mode no null space to move delta in)."""
    found = summary.get("warnings")
    if not found:
        return None
    items = found if isinstance(found, list) else [found]
    return Section("Warnings", [str(w.get("message", w)) if isinstance(w, Mapping) else str(w) for w in items])


#: Task-specific sections of a run report, each ``summary -> Section`` (None where it does not
#: apply), placed after the results in both files; adding one is one entry here.
SECTIONS: tuple[Callable[[Mapping[str, Any]], Section | None], ...] = (warnings_section, refusal_section)

_PLOTS = (_plot_rate_vs_drift, _plot_delta_vs_drift, _plot_distributions, _plot_history, _plot_budget_sweep)


# ----------------------------------------------------------------------------------------------
# the report


def _versions_line(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta.get("saerecover_version"):
        parts.append(f"saerecover {meta['saerecover_version']}")
    for k, v in (meta.get("versions") or {}).items():
        if v:
            parts.append(f"{k} {v}")
    return ", ".join(parts)


@dataclass
class _Parts:
    """What both files of a run report are made of."""

    run: Any
    config: Mapping[str, Any]
    summary: Mapping[str, Any]
    records: list[dict[str, Any]]
    figures: list[Figure]
    sections: list[Section]
    attribution: list[Section]
    notes: list[str]

    @property
    def title(self) -> str:
        return f"saerecover report: {_task_name(self.config, self.summary)}"

    def info(self, code: Callable[[str], str] = str) -> str:
        meta = self.run.meta
        info = [f"Run directory {code(self.run.path.name)}"]
        if meta.get("created"):
            info.append(f"created {meta['created']}")
        if meta.get("config_hash"):
            info.append(f"config hash {code(str(meta['config_hash'])[:12])}")
        return ", ".join(info) + "."

    def results_text(self) -> str:
        return (f"{self.summary.get('n_examples')} examples, {self.summary.get('n_valid')} valid flips (base "
                "behavior present, defended absent). Recovery is measured on valid flips only.")

    def rates_text(self) -> str:
        iv = self.summary.get("intervals") or {}
        return ("Rates are over valid flips (a failed example counts as not recovered); intervals: "
                f"{iv.get('rates', 'Wilson score 95%')}. Drifts, norms and residuals are means over "
                "valid, non-failed examples; intervals: "
                f"{iv.get('continuous', '95% bootstrap')}. A (row, feature) pair is eligible when the clamp "
                "silenced it (z_def <= eta) and reactivated when delta brings it above eta; the reactivated share "
                "is given of all pairs and of the eligible pairs (the paper's reactivated-feature fraction, as "
                "its reference code computes it). Zero-reactivation rate: recovered with no eligible pair "
                "reactivated. Relative delta norm: ||delta|| / ||h_def|| at the optimized rows.")

    def failures(self) -> list[tuple[str, int, list[str]]]:
        return [(name, int(m["n_failed"]), [str(e)[:200] for e in m.get("errors") or []])
                for name, m in (self.summary.get("modes") or {}).items() if (m or {}).get("n_failed")]

    def other_summary(self) -> dict[str, Any]:
        known = {"task", "n_examples", "n_valid", "n_records", "modes", "intervals", "warnings"}
        return {k: v for k, v in self.summary.items() if k not in known}

    def files(self, code: Callable[[str], str] = str) -> list[str]:
        out = [f"{code('config.json')}: resolved config, versions, config hash",
               f"{code('records.jsonl')}: {len(self.records)} records, one per (example, mode)",
               f"{code('tensors/<mode>/<example_id>.safetensors')}: delta, defended state and optimization "
               "history per example",
               f"{code('summary.json')}: the numbers above"]
        if self.attribution:
            out.append(f"{code(ATTRIBUTION_FILE)}: the attribution replays")
        return out


def _render(p: _Parts) -> str:
    """report.md."""
    def code(x: str) -> str:
        return f"`{x}`"

    out = [f"# {p.title}", "", p.info(code), ""]
    if _versions_line(p.run.meta):
        out += [f"Versions: {_versions_line(p.run.meta)}.", ""]

    out += ["## Setup", ""]
    setup = _setup_lines(p.config)
    out += setup if setup else ["(the config names none of the usual keys; see below)"]
    out += ["", "<details><summary>Full config</summary>", "", "```json",
            _compact_json(p.config), "```", "", "</details>", ""]

    out += ["## Results", "", p.results_text(), "", summary_table(p.summary), "", p.rates_text(), ""]
    out += _delta_lines(p.summary)
    table = _interval_table(p.summary)
    if table:
        out += ["### Means with 95% bootstrap intervals", "", table.markdown(), ""]

    for section in p.sections:
        out += section.markdown_lines()

    out += ["## Plots", ""]
    if p.figures:
        for fig in p.figures:
            out += [fig.markdown(), ""]
    else:
        out += ["(no plots: nothing to plot yet)", ""]
    for section in p.attribution:
        out += section.markdown_lines()

    if p.failures():
        out += ["## Failures", ""]
        for name, n, errors in p.failures():
            out.append(f"- **{name}**: {n} failed example(s)")
            out += [f"  - `{e}`" for e in errors]
        out.append("")
    if p.other_summary():
        out += ["<details><summary>Other summary fields</summary>", "", "```json",
                _compact_json(p.other_summary()), "```", "",
                "</details>", ""]
    if p.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in p.notes] + [""]
    out += ["## Files", ""] + [f"- {f}" for f in p.files(code)] + [""]
    return "\n".join(out)


def _what(err: Exception) -> str:
    """A data error in words: a missing key, or the error's first line."""
    if isinstance(err, KeyError):
        return f"it has no {err.args[0]!r}" if err.args else "a key is missing"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
def _render_html(p: _Parts) -> str:
    """report.html: the same parts, plus the per-example table and the clamped features linked."""
    images = {f.path: data_uri(p.run.path / f.path) for f in p.figures}
    images.update({f.path: data_uri(p.run.path / f.path) for s in p.attribution for f in s.blocks
                   if isinstance(f, Figure)})
    other = p.other_summary()
    return render(
        "run.html.j2", title=p.title, info=p.info(), versions=_versions_line(p.run.meta),
        setup=_setup_items(p.config), clamp_sites=_clamp_sites(p.config),
        config_json=_compact_json(p.config), results_text=p.results_text(), summary_table=summary_rows(p.summary),
        rates_text=p.rates_text(), interval_table=_interval_table(p.summary), sections=p.sections,
        figures=p.figures, images=images, attribution=p.attribution,
        examples=example_table(p.records, neuronpedia_id(p.config)), failures=p.failures(),
        other_json=_compact_json(other) if other else None, notes=p.notes, files=p.files())


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` for a run directory; return the
    path of report.md (report.html lies beside it).

    Uses summary.json when present, otherwise summarizes records.jsonl. A plot that cannot be
    drawn is skipped with a note in the report.
    """
    run = open_run(run_dir)
    config = run.config
    records = run.records()
    if (run.path / SUMMARY_FILE).exists():
        summary = run.read_summary()  # a damaged summary is an error naming it, not a silent fallback
        notes: list[str] = []
    else:
        modes = config.get("modes")
        summary = summarize(records, task=_task_name(config),
                            modes=modes if isinstance(modes, list) else None)
        notes = ["summary.json is missing (run not finished?): statistics computed from "
                 "records.jsonl"]
    selection = config.get("selection")
    if isinstance(selection, dict):
        notes += [f"feature selection: {n}" for n in selection.get("notes") or []]
    evaluated = [(r["example_id"], r["mode"]) for r in records
                 if r.get("valid") is True and r.get("recovered") is not None]
    histories = read_histories(run, evaluated)
    drawn = [{**r, "history": histories[(r["example_id"], r["mode"])]}
             if (r["example_id"], r["mode"]) in histories else r for r in records]
    plots_dir = run.path / PLOTS_DIR
    figures: list[Figure] = []
    for make in _PLOTS:
        try:
            res = make(summary, drawn, plots_dir)
        except Exception as e:  # a broken plot must not cost the report
            notes.append(f"plot `{make.__name__.removeprefix('_plot_')}` failed: "
                         f"{type(e).__name__}: {e}")
            continue
        if isinstance(res, tuple):
            figures.append(Figure(f"{PLOTS_DIR}/{res[0]}", res[1]))
        elif isinstance(res, str):
            notes.append(f"plot `{make.__name__.removeprefix('_plot_')}` skipped: {res}")
    sections = [s for s in (section(summary) for section in SECTIONS) if s is not None]
    parts = _Parts(run=run, config=config, summary=summary, records=records, figures=figures, sections=sections,
                   attribution=attribution_sections(run.path, neuronpedia_id(config), PLOTS_DIR), notes=notes)
    try:
        text, page = _render(parts), _render_html(parts)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:  # a hand-edited summary
        raise RunDirectoryError(f"{run.path / SUMMARY_FILE} cannot be reported: {_what(err)}; rerun the run (it "
                                "resumes and rewrites the summary) or restore the file") from err
    path = run.path / REPORT_FILE
    atomic_write_text(path, text, root=run.path)
    atomic_write_text(run.path / HTML_FILE, page, root=run.path)
    return path
