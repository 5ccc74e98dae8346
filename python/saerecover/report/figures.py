"""Figures for reports: a matplotlib Figure on an Agg canvas (pyplot's global state is never
touched), saved atomically as PNG; matplotlib is imported only when a figure is made."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saerecover.runs import atomic_write_bytes


def figure(width: float = 6.4, height: float = 4.4):
    """A matplotlib Figure on an Agg canvas (pyplot's global state is never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def finite(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def error_bar(center: float, ci: Any) -> tuple[float, float]:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or None in ci:
        return (0.0, 0.0)
    return (max(0.0, center - float(ci[0])), max(0.0, float(ci[1]) - center))
