"""The refusal section of a run report: non-refusal and base-like rates with Wilson intervals,
the defended-feature drift Phi with a bootstrap interval."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saerecover.report.document import Section, Table
from saerecover.report.format import NA, mean_ci, num, rate_with_ci


def refusal_rows(summary: Mapping[str, Any]) -> Table:
    """The refusal metrics of a summary, one row per mode (see
    :func:`saerecover.experiments.refusal.refusal_summary`)."""
    rows = []
    for mode, m in (summary.get("modes") or {}).items():
        m = m or {}
        rows.append([
            str(mode), f"{m.get('non_refusal', NA)}/{m.get('n_valid', NA)}",
            rate_with_ci(m, "non_refusal_rate"), rate_with_ci(m, "base_like_rate"),
            rate_with_ci(m, "base_like_strict_rate"), rate_with_ci(m, "reference_non_refusal_rate"),
            rate_with_ci(m, "reference_base_like_rate"), mean_ci(m, "phi_relative_drift"),
            num(m.get("phi_floor_violation_mean")), num(m.get("relative_delta_norm_mean")),
            num(m.get("relative_delta_norm_phi_mean")), num(m.get("c1_residual_max")),
            num(m.get("jacobian_step_residual_max")),
        ])
    return Table(["mode", "non-refusal / valid", "non-refusal rate [95% CI]", "base-like rate [95% CI]",
                  "strict base-like rate [95% CI]", "reference non-refusal [95% CI]",
                  "reference base-like [95% CI]", "phi relative drift [95% CI]", "phi floor violation",
                  "delta / h_def", "delta / Phi_def", "C1 max", "J step ratio max"], rows)


def refusal_table(summary: Mapping[str, Any]) -> str:
    """:func:`refusal_rows` as a markdown table."""
    return refusal_rows(summary).markdown()


def refusal_section(summary: Mapping[str, Any]) -> Section | None:
    """The report's "Refusal" section, for a summary that carries the refusal metrics."""
    if "refusal_metrics" not in summary:
        return None
    return Section("Refusal", [
        "Over valid flips (base answered without refusal or safety cue, clamped model refuses). "
        "Non-refusal: the response generated with the clamp and delta active is answered by the "
        "task's judge. Base-like: close to the unclamped base response (lenient / strict). "
        "Reference non-refusal / base-like: the paper's code's judge (no refusal_sae phrase anywhere; its "
        "base-like rule). Phi drift: relative change of every clamped feature at every clamped site. "
        "delta / h_def and delta / Phi_def: the delta's norm against the defended residual and against the "
        "defended features (the paper's relative delta norm).",
        refusal_rows(summary)])
