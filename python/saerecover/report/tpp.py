"""The TPP collection's report: per target class and pooled, the collection columns, and the
probe accuracies."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.report.document import Page, Section, Table
from saerecover.report.format import mode_cells, mode_header, num


def tpp_rows(summary: Mapping[str, Any]) -> Table:
    """Per class and mode, then pooled: valid flips, recovery [Wilson], drift, reactivation,
    zero-reactivation recovery [Wilson]."""
    rows = []
    for c, info in (summary.get("per_class") or {}).items():
        for m, s in (info.get("modes") or {}).items():
            rows.append([str(c), m, *mode_cells(s)])
    for m, s in (summary.get("modes") or {}).items():
        rows.append(["all (pooled)", m, *mode_cells(s)])
    return Table(["class", "mode", *mode_header()], rows)


def tpp_table(summary: Mapping[str, Any]) -> str:
    """:func:`tpp_rows` as a markdown table."""
    return tpp_rows(summary).markdown()


def tpp_report(root: Path, summary: Mapping[str, Any]) -> Page:
    """The report of a TPP collection (per class, pooled, and the probes)."""

    probe_rows = [[c, num(summary["probes"]["train_accuracy"].get(c)),
                   num(summary["probes"]["test_accuracy"].get(c)),
                   num(info.get("clean_positive_rate")), num(info.get("ablated_positive_rate")),
                   str(len(info.get("latents") or [])), info.get("run_dir") or ""]
                  for c, info in summary["per_class"].items()]
    return Page(f"saerecover TPP: {summary['hook_name']}, top-{summary['top_n']} latents zero-ablated", [
        f"Data: {summary['data'].get('source')}; classes {', '.join(summary['classes'])}. "
        f"{summary['n_examples']} target-class test texts, {summary['n_valid']} valid flips "
        "(clean probe positive, ablated not)."], [
        Section("Probes and the clamp", [Table(["class", "probe train acc", "probe test acc", "clean positive rate",
                                                "ablated positive rate", "latents", "run directory"], probe_rows)]),
        Section("Recovery", [
            tpp_rows(summary),
            "Rates are over valid flips with Wilson 95% intervals; drifts are means over valid examples. "
            "Zero-reactivation recovery: recovered with no ablated latent above eta."]),
    ])
