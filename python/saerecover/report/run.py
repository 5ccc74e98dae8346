"""The human-readable face of a run directory: report.md with a table like the paper's and PNG
plots (matplotlib, Agg canvas; pyplot's global state is never touched).

Reads only what the run wrote (config.json, summary.json, records.jsonl), so a report can be
rebuilt on any machine from a copied run directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from saerecover.report.figures import colors, error_bar, figure, finite, save_figure
from saerecover.report.format import NA, interval, markdown_table, num, rate_with_ci
from saerecover.report.refusal import refusal_section
from saerecover.runs import SUMMARY_FILE, RunDirectoryError, atomic_write_text, open_run
from saerecover.runs.stats import CONTINUOUS_METRICS, summarize

__all__ = ["summary_table", "write_report"]

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


def summary_table(summary: Mapping[str, Any]) -> str:
    """One row per mode, the paper's columns, as a markdown pipe table (also readable as text).

    Rates show their Wilson 95% interval; drifts and norms are means over valid, non-failed
    examples; ``n/a`` where there is nothing to average.
    """
    modes = summary.get("modes") or {}
    cols = _columns(summary)
    rows = [[str(name)] + [cell(m or {}) for _, cell in cols] for name, m in modes.items()]
    if not rows:
        return "(no modes in this summary)"
    return markdown_table(["mode"] + [title for title, _ in cols], rows)


def _interval_table(summary: Mapping[str, Any]) -> str | None:
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
    return markdown_table(["metric"] + [str(k) for k in modes], rows)


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


def _setup_lines(config: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, label in _ESSENTIALS:
        if key not in config:
            continue
        v = config[key]
        sites = isinstance(v, (list, tuple)) and all(isinstance(x, Mapping) for x in v)
        if key == "clamp" and sites:
            lines.append(f"- **{label}**: {len(v)} site(s)")
            for sc in v:
                feats = sc.get("features")
                nf = f"{len(feats)} features" if isinstance(feats, (list, tuple)) else "features ?"
                rest = {k: x for k, x in sc.items() if k not in ("hook_name", "features")}
                lines.append(f"  - `{sc.get('hook_name', '?')}`: {nf}; {_brief(rest)}")
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


def _history_series(h: Any) -> list[float] | None:
    """A per-step loss series from a record's ``history``: a list of numbers, or a list of dicts
    with ``loss`` (or ``score``)."""
    if not isinstance(h, list) or not h:
        return None
    if all(isinstance(x, Mapping) for x in h):
        keys = [k for k in ("loss", "score") if all(k in x for x in h)]
        if not keys:
            return None
        key = keys[0]
        vals = [finite(x[key]) for x in h]
    else:
        vals = [finite(x) for x in h]
    return None if any(v is None for v in vals) else vals  # type: ignore[return-value]


def _plot_history(summary, records, plots: Path) -> tuple[str, str] | str | None:
    import numpy as np

    series: dict[str, list[list[float]]] = {}
    for r in records:
        s = _history_series(r.get("history"))
        if s is not None and r.get("valid") is True:
            series.setdefault(r["mode"], []).append(s)
    if not series:
        return None  # nothing recorded per step: not worth a note
    palette = colors(list(series))
    fig = figure()
    ax = fig.add_subplot()
    for name, runs in series.items():
        length = max(len(s) for s in runs)
        grid = np.full((len(runs), length), np.nan)
        for i, s in enumerate(runs):
            grid[i, : len(s)] = s
        steps = np.arange(length)
        count = np.sum(~np.isnan(grid), axis=0)
        keep = count > 0
        med = np.array([np.median(c[~np.isnan(c)]) if k else np.nan for c, k in zip(grid.T, keep)])
        ax.plot(steps[keep], med[keep], color=palette[name], label=f"{name} (median, n={len(runs)})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("Optimization history")
    fname = "history.png"
    save_figure(fig, plots / fname)
    return (fname, "Median per-step loss over the valid examples of each mode "
                   "(examples that stop early drop out).")


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


#: Task-specific sections of a run report, each ``summary -> lines`` (None where it does not
#: apply), placed after the results; adding one is one entry here.
SECTIONS: tuple[Callable[[Mapping[str, Any]], list[str] | None], ...] = (refusal_section,)

_PLOTS = (_plot_rate_vs_drift, _plot_delta_vs_drift, _plot_history, _plot_budget_sweep)


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


def _render(run, config, summary, records, plots, notes) -> str:
    task = _task_name(config, summary)
    out = [f"# saerecover report: {task}", ""]
    meta = run.meta
    info = [f"Run directory `{run.path.name}`"]
    if meta.get("created"):
        info.append(f"created {meta['created']}")
    if meta.get("config_hash"):
        info.append(f"config hash `{str(meta['config_hash'])[:12]}`")
    out += [", ".join(info) + ".", ""]
    if _versions_line(meta):
        out += [f"Versions: {_versions_line(meta)}.", ""]

    out += ["## Setup", ""]
    setup = _setup_lines(config)
    out += setup if setup else ["(the config names none of the usual keys; see below)"]
    out += ["", "<details><summary>Full config</summary>", "", "```json",
            _compact_json(config), "```", "", "</details>", ""]

    out += ["## Results", ""]
    n_ex, n_valid = summary.get("n_examples"), summary.get("n_valid")
    out += [f"{n_ex} examples, {n_valid} valid flips (base behavior present, defended absent). "
            "Recovery is measured on valid flips only.", ""]
    out += [summary_table(summary), ""]
    iv = summary.get("intervals") or {}
    out += [
        "Rates are over valid flips (a failed example counts as not recovered); intervals: "
        f"{iv.get('rates', 'Wilson score 95%')}. Drifts, norms and residuals are means over "
        "valid, non-failed examples; intervals: "
        f"{iv.get('continuous', '95% bootstrap')}. A (row, feature) pair is eligible when the clamp "
        "silenced it (z_def <= eta) and reactivated when delta brings it above eta; the reactivated share "
        "is given of all pairs and of the eligible pairs (the paper's reactivated-feature fraction, as "
        "its reference code computes it). Zero-reactivation rate: recovered with no eligible pair "
        "reactivated. Relative delta norm: ||delta|| / ||h_def|| at the optimized rows.",
        "",
    ]
    out += _delta_lines(summary)
    table = _interval_table(summary)
    if table:
        out += ["### Means with 95% bootstrap intervals", "", table, ""]

    for section in SECTIONS:
        out += section(summary) or []

    out += ["## Plots", ""]
    if plots:
        for fname, caption in plots:
            alt = fname.removesuffix(".png").replace("_", " ")
            out += [f"![{alt}]({PLOTS_DIR}/{fname})", "", f"*{caption}*", ""]
    else:
        out += ["(no plots: nothing to plot yet)", ""]

    failures = [(name, m) for name, m in (summary.get("modes") or {}).items()
                if (m or {}).get("n_failed")]
    if failures:
        out += ["## Failures", ""]
        for name, m in failures:
            out.append(f"- **{name}**: {m['n_failed']} failed example(s)")
            for e in m.get("errors") or []:
                out.append(f"  - `{str(e)[:200]}`")
        out.append("")

    known = {"task", "n_examples", "n_valid", "n_records", "modes", "intervals"}
    other = {k: v for k, v in summary.items() if k not in known}
    if other:
        out += ["<details><summary>Other summary fields</summary>", "", "```json",
                _compact_json(other), "```", "",
                "</details>", ""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Files", "",
            "- `config.json`: resolved config, versions, config hash",
            f"- `records.jsonl`: {len(records)} records, one per (example, mode)",
            "- `tensors/<mode>/<example_id>.safetensors`: delta and defended state per example",
            "- `summary.json`: the numbers above", ""]
    return "\n".join(out)


def _what(err: Exception) -> str:
    """A data error in words: a missing key, or the error's first line."""
    if isinstance(err, KeyError):
        return f"it has no {err.args[0]!r}" if err.args else "a key is missing"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` for a run directory; return the report's path.

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
    plots_dir = run.path / PLOTS_DIR
    plots: list[tuple[str, str]] = []
    for make in _PLOTS:
        try:
            res = make(summary, records, plots_dir)
        except Exception as e:  # a broken plot must not cost the report
            notes.append(f"plot `{make.__name__.removeprefix('_plot_')}` failed: "
                         f"{type(e).__name__}: {e}")
            continue
        if isinstance(res, tuple):
            plots.append(res)
        elif isinstance(res, str):
            notes.append(f"plot `{make.__name__.removeprefix('_plot_')}` skipped: {res}")
    try:
        text = _render(run, config, summary, records, plots, notes)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:  # a hand-edited summary
        raise RunDirectoryError(f"{run.path / SUMMARY_FILE} cannot be reported: {_what(err)}; rerun the run (it "
                                "resumes and rewrites the summary) or restore the file") from err
    path = run.path / REPORT_FILE
    atomic_write_text(path, text, root=run.path)
    return path
