"""The one number and table formatter of every report, table and command-line summary.

Numbers: 3 significant digits, scientific below 1e-3 and from 1e5 on, ``inf`` for +infinity and
``n/a`` for missing or undefined values (None, NaN). Tables: markdown pipe tables, readable as
plain text too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

NA = "n/a"


def num(x: Any, digits: int = 3) -> str:
    """Compact number: ``digits`` significant digits, scientific for very small or large
    magnitudes; ``inf`` / ``-inf`` for infinities, ``n/a`` for None, booleans, NaN and text."""
    if x is None or isinstance(x, bool):
        return NA
    try:
        f = float(x)
    except (TypeError, ValueError):
        return NA
    if math.isnan(f):
        return NA
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f == 0:
        return "0"
    if abs(f) < 1e-3 or abs(f) >= 1e5:
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}g}"


def rate(x: Any) -> str:
    """A rate in [0, 1] with three decimals (``n/a`` for None)."""
    if x is None:
        return NA
    return f"{float(x):.3f}"


def interval(ci: Any, fmt: Callable[[Any], str] = num) -> str:
    """``[lo, hi]`` of a two-element interval, each end by ``fmt``; '' when there is none."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return ""
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def rate_with_ci(m: Mapping[str, Any], key: str) -> str:
    """``m[key]`` as a rate followed by its 95% interval ``m[key + "_ci95"]``."""
    return rate_ci(m.get(key), m.get(f"{key}_ci95"))


def rate_ci(value: Any, ci: Any) -> str:
    """A rate with its interval: ``0.875 [0.690, 0.957]`` (the interval left out when unknown)."""
    if value is None:
        return NA
    text = rate(value)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        text += " " + interval(ci, rate)
    return text


def mean_ci(m: Mapping[str, Any], key: str) -> str:
    """``m[key + "_mean"]`` with its interval ``m[key + "_ci95"]``: ``0.0206 [0.0198, 0.0216]``."""
    ci = m.get(f"{key}_ci95")
    mean = num(m.get(f"{key}_mean"))
    return f"{mean} {interval(ci)}" if ci else mean


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown pipe table; cells are ``str()``-ed and their ``|`` escaped."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    widths = [max(len(row[j]) for row in cells) for j in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |",
                      *(line(r) for r in cells[1:])])


#: The per-mode columns every collection table shows (key in a mode summary -> title).
MODE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("valid", "valid flips"),
    ("recovered", "recovered"),
    ("recovery", "recovery rate [95% Wilson]"),
    ("activation_drift_mean", "activation drift"),
    ("relative_drift_mean", "relative drift"),
    ("reactivated_fraction_mean", "reactivated: of all pairs"),
    ("reactivated_fraction_eligible_mean", "reactivated: of eligible pairs"),
    ("zero_reactivation", "zero-reactivation rate [95% Wilson]"),
    ("delta_norm_mean", "mean delta norm"),
    ("relative_delta_norm_mean", "relative delta norm"),
    ("c1_residual_max", "c1 residual max"),
)


def mode_cells(m: Mapping[str, Any]) -> list[str]:
    """The :data:`MODE_COLUMNS` cells of one mode's summary (``stats.summarize`` format)."""
    out = []
    for key, _ in MODE_COLUMNS:
        if key == "valid":
            out.append(str(m.get("n_valid", "n/a")))
        elif key == "recovered":
            out.append(f"{m.get('recovered', 'n/a')}/{m.get('n_valid', 'n/a')}")
        elif key == "recovery":
            out.append(rate_ci(m.get("recovery_rate"), m.get("recovery_rate_ci95")))
        elif key == "zero_reactivation":
            out.append(rate_ci(m.get("zero_reactivation_rate"), m.get("zero_reactivation_rate_ci95")))
        else:
            out.append(num(m.get(key)))
    return out


def mode_header() -> list[str]:
    return [title for _, title in MODE_COLUMNS]
