"""Rows from local tabular files: CSV, TSV, JSON (a list of objects) and JSONL."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local table: .csv / .tsv (header row), .jsonl (one object a line) or .json
    (a list of objects, or ``{"data": [...]}``)."""
    import csv

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i + 1} is not valid JSON: {err}") from err
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a list of objects (or {{'data': [...]}})")
        return data
    raise ValueError(f"data file {path} must end in .csv, .tsv, .jsonl or .json")
