"""A collection: one directory holding several related run directories (one per target class,
per budget, per feature-set size) and a combined ``summary.json`` + ``report.md`` + plots.

    OUT/
      <member>/            an ordinary run directory (config.json, records.jsonl, summary.json, ...)
      summary.json         the combined numbers (``"collection"`` names the kind)
      report.md            tables of the combined numbers
      plots/*.png

Each member resumes on its own (same config, same directory), so re-running a collection
command finishes what an interrupted one left.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.runs.errors import RunDirectoryError
from saerecover.runs.files import atomic_write_json, atomic_write_text, check_no_link

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def member_name(prefix: str, value: Any) -> str:
    """A file-safe member directory name: ``budget-2.5``, ``k-16``, ``class-sports``."""
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    text = _UNSAFE.sub("_", text).strip("._") or "x"
    return f"{prefix}-{text}"


def prepare(out: str | Path) -> Path:
    """Create OUT (or accept an existing collection / empty directory); refuse a file or a run
    directory, which a collection must not be written over."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"{path} is a file; give a new or existing collection directory")
    if (path / "config.json").exists():
        raise RunDirectoryError(f"{path} is a single run directory (it has config.json); "
                                "a collection (one run per class / budget / K) needs its own --out")
    path.mkdir(parents=True, exist_ok=True)
    check_no_link(path)
    return path


def write(out: Path, summary: Mapping[str, Any], report: str) -> None:
    """The collection's summary.json and report.md (atomic; never through a link inside OUT)."""
    check_no_link(out)
    atomic_write_json(out / SUMMARY_FILE, dict(summary), root=out)
    atomic_write_text(out / REPORT_FILE, report, root=out)


def read_summary(root: str | Path) -> dict[str, Any] | None:
    """A collection's summary, or None when ``root`` holds no collection summary."""
    path = Path(root) / SUMMARY_FILE
    if (Path(root) / "config.json").exists() or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirectoryError(f"{path} is not valid JSON: {err}") from err
    return summary if isinstance(summary, dict) and "collection" in summary else None



# ----------------------------------------------------------------------------------------------
# formatting shared by the collection reports



def mode_row(m: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON row of one mode's summary kept in a combined summary (plain numbers)."""
    keys = ("n_valid", "recovered", "recovery_rate", "recovery_rate_ci95", "n_failed",
            "zero_reactivation_recovered", "zero_reactivation_rate", "zero_reactivation_rate_ci95",
            "activation_drift_mean", "activation_drift_ci95", "relative_drift_mean", "relative_drift_ci95",
            "decode_drift_mean", "floor_violation_mean", "reactivated_fraction_mean",
            "reactivated_fraction_eligible_mean", "delta_norm_mean", "relative_delta_norm_mean", "budget_mean",
            "relative_budget_mean", "c1_residual_max", "steps_mean")
    return {**extra, **{k: m.get(k) for k in keys}}


