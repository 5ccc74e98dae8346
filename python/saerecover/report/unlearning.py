"""The unlearning run's table: per mode, the collection columns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saerecover.report.format import markdown_table, mode_cells, mode_header


def unlearning_table(info: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """Per mode: valid flips, recovery [Wilson], drift, reactivation, zero-reactivation [Wilson]."""

    rows = [[m, *mode_cells(s)] for m, s in (summary.get("modes") or {}).items()]
    return markdown_table(["mode", *mode_header()], rows)
