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
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .runs import RunDirectoryError, atomic_write_json, atomic_write_text

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
    return path


def write(out: Path, summary: Mapping[str, Any], report: str) -> None:
    atomic_write_json(out / SUMMARY_FILE, dict(summary))
    atomic_write_text(out / REPORT_FILE, report)


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


def rewrite_report(root: str | Path) -> tuple[Path, str]:
    """Regenerate a collection's report.md and plots from its summary.json (``saerecover
    report`` on a sweep or TPP directory); returns (report path, the main table)."""
    summary = read_summary(root)
    if summary is None:
        raise RunDirectoryError(f"{root} holds no collection summary.json")
    root = Path(root)
    if summary["collection"] in ("budget_sweep", "feature_sweep"):
        from .sweeps import sweep_table, write_sweep_report

        return write_sweep_report(root, summary), sweep_table(summary)
    if summary["collection"] == "tpp":
        from .tasks.tpp import _tpp_report, tpp_table

        write(root, summary, _tpp_report(summary))
        return root / REPORT_FILE, tpp_table(summary)
    raise RunDirectoryError(f"{root}: unknown collection kind {summary['collection']!r}")


# ----------------------------------------------------------------------------------------------
# formatting shared by the collection reports


def num(x: Any, digits: int = 3) -> str:
    if x is None or isinstance(x, bool):
        return "n/a"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(f):
        return "inf" if f > 0 else "n/a"
    if f == 0:
        return "0"
    if abs(f) < 1e-3 or abs(f) >= 1e5:
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}g}"


def rate_ci(rate: Any, ci: Any) -> str:
    if rate is None:
        return "n/a"
    text = f"{float(rate):.3f}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        text += f" [{float(ci[0]):.3f}, {float(ci[1]):.3f}]"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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
    ("reactivated_fraction_mean", "reactivated fraction"),
    ("zero_reactivation", "zero-reactivation rate [95% Wilson]"),
    ("delta_norm_mean", "mean delta norm"),
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


def mode_row(m: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON row of one mode's summary kept in a combined summary (plain numbers)."""
    keys = ("n_valid", "recovered", "recovery_rate", "recovery_rate_ci95", "n_failed",
            "zero_reactivation_recovered", "zero_reactivation_rate", "zero_reactivation_rate_ci95",
            "activation_drift_mean", "activation_drift_ci95", "relative_drift_mean", "relative_drift_ci95",
            "decode_drift_mean", "floor_violation_mean", "reactivated_fraction_mean",
            "delta_norm_mean", "relative_delta_norm_mean", "c1_residual_max", "steps_mean")
    return {**extra, **{k: m.get(k) for k in keys}}


def figure(width: float = 6.4, height: float = 4.4):
    """A matplotlib Figure on an Agg canvas (pyplot's global state is never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    import io

    from .runs import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}
