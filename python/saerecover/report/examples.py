"""The per-example table of report.html: one row per valid example and mode, with what decides
and measures its recovery, and the non-clamped features that carry it (recorded by the run as
``top_features``: ``[[feature, ||dz_j||], ...]`` at the delta site, largest first)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saerecover.report.document import Features
from saerecover.report.figures import finite
from saerecover.report.format import NA, num

__all__ = ["EXAMPLE_COLUMNS", "Cell", "example_table"]


@dataclass(frozen=True)
class Cell:
    """A cell of the example table: its text, its sort value (None: sort by the text) and a
    CSS class."""

    text: str
    value: Any = None
    cls: str = ""


#: (key, title) of the table's columns, in order; a key names the record field shown.
EXAMPLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("example_id", "example"),
    ("mode", "mode"),
    ("recovered", "recovered"),
    ("recovered_score", "score"),
    ("relative_drift", "relative drift"),
    ("phi_relative_drift", "Phi drift"),
    ("delta_norm", "delta norm"),
    ("steps", "steps"),
    ("checkpoint_step", "checkpoint step"),
    ("top_features", "top non-clamped features (||dz||)"),
)


def _status(r: Mapping[str, Any]) -> str:
    if r.get("failed") is True:
        return "failed"
    if r.get("recovered") is None:
        return "pending"
    return "yes" if r.get("recovered") is True else "no"


def _number(r: Mapping[str, Any], key: str) -> Cell:
    v = finite(r.get(key))
    return Cell(num(v) if v is not None else NA, v)


def _features(r: Mapping[str, Any], neuronpedia_id: str | None) -> Features | Cell:
    top = r.get("top_features")
    if not isinstance(top, list):
        return Cell("unavailable", None, "muted")
    pairs = [p for p in top if isinstance(p, (list, tuple)) and len(p) == 2]
    return Features([int(p[0]) for p in pairs], neuronpedia_id, [float(p[1]) for p in pairs])


def example_table(records: Sequence[Mapping[str, Any]], neuronpedia_id: str | None = None) -> dict[str, Any]:
    """``{"columns": [(key, title)], "rows": [{"mode", "recovered", "cells"}], "modes": [...],
    "features_recorded": bool}`` over the valid examples of ``records`` (a row's ``recovered``
    is yes, no, failed or pending; ``cells`` follow :data:`EXAMPLE_COLUMNS`)."""
    rows = []
    for r in records:
        if r.get("valid") is not True:
            continue
        status = _status(r)
        ckpt = r.get("checkpoint_step")
        cells: list[Any] = [
            Cell(str(r.get("example_id", "?"))), Cell(str(r.get("mode", "?"))),
            Cell(status, None, status),
            _number(r, "recovered_score"), _number(r, "relative_drift"), _number(r, "phi_relative_drift"),
            _number(r, "delta_norm"),
            Cell(str(r["steps"]) if isinstance(r.get("steps"), int) else NA, r.get("steps")),
            Cell(str(ckpt) if isinstance(ckpt, int) else "last", ckpt if isinstance(ckpt, int) else None),
            _features(r, neuronpedia_id),
        ]
        rows.append({"mode": str(r.get("mode", "?")), "recovered": status, "cells": cells})
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    return {"columns": list(EXAMPLE_COLUMNS), "rows": rows, "modes": modes,
            "features_recorded": any(isinstance(r.get("top_features"), list) for r in records)}
