"""Reports of a comparison of defenses or SAEs (``"collection": "compare"``, written by
:mod:`saerecover.experiments.compare`): the ranked table (robustness score, recovery per
relative budget, collateral cost), each hardening round, and the frontier plot of robustness
against collateral cost."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.report.document import Figure, Page, Section, Table
from saerecover.report.figures import colors, error_bar, figure, finite, save_figure
from saerecover.report.format import interval, num, rate_ci
from saerecover.runs import collection

FRONTIER_PLOT = "frontier.png"


def _rate_at(m: Mapping[str, Any], budget: float, mode: str) -> str:
    for r in m["rates"]:
        if r["mode"] == mode and r["budget"] == budget:
            return f"{rate_ci(r['recovery_rate'], r['recovery_rate_ci95'])} ({r['recovered']}/{r['n_valid']})"
    return "n/a"


def _score(m: Mapping[str, Any], mode: str) -> str:
    r = m["robustness"].get(mode) or {}
    return f"{num(r.get('score'))} {interval(r.get('score_ci95'))}".strip()


def _median(m: Mapping[str, Any], mode: str) -> str:
    r = m["robustness"].get(mode) or {}
    if not r.get("n"):
        return "n/a"
    return "never" if r.get("median") is None else num(r["median"])


def _collateral_cells(m: Mapping[str, Any]) -> list[str]:
    c = m.get("collateral")
    if not c:
        return ["n/a", "n/a"]
    nt = c["non_target"]
    acc = (f"{rate_ci(nt['accuracy'], nt['accuracy_ci95'])} ({nt['correct']}/{nt['n']}; base "
           f"{nt['base']['correct']}/{nt['base']['n']})")
    return [acc, f"{num(c['kl_mean'])} {interval(c['kl_ci95'])}"]


def _label(m: Mapping[str, Any]) -> str:
    """A member's name in tables and plots: the SAE as given, or the defense's spec."""
    if m.get("kind") == "sae":
        return str((m.get("sae") or {}).get("id") or m["name"])
    return m.get("defense", m["name"])


def ranked_rows(summary: Mapping[str, Any]) -> Table:
    """One row per headline member, best first: rank, valid flips, recovery per budget,
    median smallest recovering budget, robustness score, collateral accuracy and KL."""
    mode = summary["score_mode"]
    by_name = {m["name"]: m for m in summary["members"]}
    header = ["rank", "defense" if summary["kind"] == "defenses" else "SAE", "valid flips",
              *[f"recovery at {num(b)} x ||h_def||" for b in summary["budgets"]],
              "median smallest recovering budget", "robustness score [95% CI]",
              "non-target accuracy [95% CI]", "KL vs undefended [95% CI]", "frontier"]
    rows = []
    for name in summary["ranking"]:
        m = by_name[name]
        rows.append([str(m["rank"]), _label(m), str(m["n_valid"]), *[_rate_at(m, b, mode) for b in summary["budgets"]],
                     _median(m, mode), _score(m, mode), *_collateral_cells(m), "yes" if m.get("pareto") else ""])
    return Table(header, rows)


def round_rows(summary: Mapping[str, Any]) -> Table | None:
    """Every round of the iterated defenses (hardened:R), in order."""
    mode = summary["score_mode"]
    iterated = [m for m in summary["members"] if m.get("kind") == "defense" and m["name"] != m.get("defense")]
    if not iterated:
        return None
    rows = [[m["defense"], str(m["round"]), str(sum((m.get("basis_rank") or {}).values())), str(m["n_valid"]),
             *[_rate_at(m, b, mode) for b in summary["budgets"]], _score(m, mode), *_collateral_cells(m)[1:]]
            for m in iterated]
    return Table(["defense", "round", "ablated dims", "valid flips",
                  *[f"recovery at {num(b)} x ||h_def||" for b in summary["budgets"]], "robustness score [95% CI]",
                  "KL vs undefended [95% CI]"], rows)


def _plot_frontier(summary: Mapping[str, Any], root: Path) -> str:
    mode = summary["score_mode"]
    members = [m for m in summary["members"] if m.get("headline", True)]
    names = [_label(m) for m in members]
    palette = colors(names)
    fig = figure(6.8, 4.8)
    ax = fig.subplots()
    for name, m in zip(names, members):
        r = m["robustness"].get(mode) or {}
        y = finite(r.get("score"))
        c = m.get("collateral") or {}
        x = finite(c.get("kl_mean"))
        if x is None or y is None:
            continue
        xe, ye = error_bar(x, c.get("kl_ci95")), error_bar(y, r.get("score_ci95"))
        ax.errorbar([x], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], marker="o", capsize=3,
                    color=palette[name], label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.set_xlabel("collateral cost: KL(p_base || p_defended), nats per token")
    ax.set_ylabel(f"robustness score ({mode} mode; 95% CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Robustness against collateral cost")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    save_figure(fig, root / collection.PLOTS_DIR / FRONTIER_PLOT)
    return FRONTIER_PLOT


def compare_report(root: Path, summary: Mapping[str, Any]) -> Page:
    """The report of a comparison (its frontier plot written under ``root``)."""
    plot = _plot_frontier(summary, root)
    what = "defenses" if summary["kind"] == "defenses" else "SAEs"
    col = summary.get("collateral") or {}
    sections = [
        Section(f"Ranking of the {what}", [
            f"Ranked by robustness score ({summary['score_mode']} mode), then by KL. {summary['score']}. "
            f"Non-target examples: {col.get('non_target')}. KL: {col.get('kl')} over "
            f"{col.get('n_reference_texts')} reference texts.",
            ranked_rows(summary)]),
    ]
    rounds = round_rows(summary)
    if rounds is not None:
        sections.append(Section("Hardening rounds", [
            "Round 0 is the clamp re-applied after delta; each later round also ablates the principal directions "
            "of the previous rounds' recovered deltas.", rounds]))
    sections.append(Section("Frontier", [Figure(f"{collection.PLOTS_DIR}/{plot}",
                                                "One point per " + ("defense" if what == "defenses" else "SAE")
                                                + ": robustness score against KL to the undefended model, "
                                                  "with 95% intervals.")]))
    defs = sorted({(m.get("defense"), m.get("doc")) for m in summary["members"] if m.get("kind") == "defense"})
    if defs:
        sections.append(Section("Defenses", [Table(["defense", "what it does"], [[d, doc] for d, doc in defs])]))
    return Page(f"saerecover compare {summary['kind']}: {summary['task']}", [
        f"Budgets {', '.join(num(b) for b in summary['budgets'])} x ||h_def|| (C4 relative to the defended "
        f"residual); modes {', '.join(summary['modes'])}; each member's budget sweep is in its own directory."],
        sections)


def compare_table(summary: Mapping[str, Any]) -> str:
    """:func:`ranked_rows` as a markdown table."""
    return ranked_rows(summary).markdown()
