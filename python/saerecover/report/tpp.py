"""The TPP collection's report: per target class and pooled, the collection columns, and the
probe accuracies."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.report.document import Page, Section, Table
from saerecover.report.format import mode_cells, mode_header, num


def tpp_rows(summary: Mapping[str, Any]) -> Table:
    """Per class and mode, then the unweighted mean over the classes (the headline; its recovered
    and valid counts are sums, its rates means of the classes' rates, without intervals), then
    pooled over every valid example: valid flips, recovery [Wilson], drift, reactivation,
    zero-reactivation recovery [Wilson]."""
    rows = []
    for c, info in (summary.get("per_class") or {}).items():
        for m, s in (info.get("modes") or {}).items():
            rows.append([str(c), m, *mode_cells(s)])
    for m, s in (summary.get("class_mean") or {}).items():
        rows.append([f"mean of {s.get('n_classes')} classes", m, *mode_cells(s)])
    for m, s in (summary.get("modes") or {}).items():
        rows.append(["all (pooled)", m, *mode_cells(s)])
    return Table(["class", "mode", *mode_header()], rows)


def tpp_metric_rows(summary: Mapping[str, Any]) -> Table | None:
    """SAEBench's TPP metric of the clamp, per target class and their mean."""
    metric = summary.get("tpp_metric")
    if not metric:
        return None
    rows = [[c, num(v["intended"]), num(v["unintended"]), num(v["total"])]
            for c, v in (metric.get("per_class") or {}).items()]
    rows.append(["mean", num(metric.get("mean_intended")), num(metric.get("mean_unintended")), num(metric.get("mean"))])
    return Table(["target class", "its probe's accuracy drop", "other probes' mean drop", "TPP metric"], rows)


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
    metric = tpp_metric_rows(summary)
    probes = summary["probes"]
    return Page(f"saerecover TPP: {summary['hook_name']}, top-{summary['top_n']} latents zero-ablated", [
        f"Protocol: {summary.get('protocol', 'saerecover')}; probe trainer: {probes.get('trainer', 'saerecover')}"
        + (" (the epoch with the best test accuracy kept: selected on the evaluation data)"
           if probes.get("trainer") == "saebench" else "") + ".",
        f"Data: {summary['data'].get('source')}; classes {', '.join(summary['classes'])}. "
        f"{summary['n_examples']} target-class test texts, {summary['n_valid']} valid flips "
        "(clean probe positive, ablated not)."], [
        Section("Probes and the clamp", [Table(["class", "probe train acc", "probe test acc", "clean positive rate",
                                                "ablated positive rate", "latents", "run directory"], probe_rows)]),
        Section("Recovery", [
            tpp_rows(summary),
            "Rates are over valid flips with Wilson 95% intervals; drifts are means over valid examples. "
            "The mean of the classes weighs every target class alike (the paper's headline, the mean of its "
            "targets' means); pooled weighs every valid example alike. Reactivated: of all (row, latent) pairs, "
            "and of the eligible ones (the ablation put them at or below eta). Zero-reactivation recovery: "
            "recovered with no ablated latent above eta."]),
        *([Section("SAEBench's TPP metric of the clamp", [
            metric,
            "Per target class: its probe's accuracy drop when its latents are ablated, minus the mean drop of "
            "the other classes' probes; each probe's accuracy on its balanced test set, clean and ablated on "
            "the same texts."])] if metric is not None else []),
    ])
