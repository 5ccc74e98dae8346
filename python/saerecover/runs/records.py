"""records.jsonl: one JSON object per (example_id, mode), appended as each example finishes.

Parsing tolerates exactly what a crash can leave (a cut-short last line) and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saerecover.runs.errors import RunDirectoryError

if TYPE_CHECKING:
    from saerecover.core.recovery import ExampleOutcome


def parse_records(data: bytes, path: Path) -> tuple[list[dict], int, str | None]:
    """Parse records.jsonl bytes.

    Returns ``(records, good_end, dropped)``: the records, the byte offset where the good prefix
    ends, and a description of a dropped corrupt tail (or None). Only the last non-blank line may
    be corrupt (a crash mid-append); a corrupt line followed by good lines is an error naming its
    line number. A whole last record that only lacks its newline is kept. Blank lines are
    skipped. A repeated ``(example_id, mode)`` pair is an error.
    """
    records: list[dict] = []
    seen: dict[tuple[str, str], int] = {}
    pos = 0
    good_end = 0
    lineno = 0
    bad: tuple[int, int, str] | None = None  # (line number, offset, reason)
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        raw = data[pos:end]
        lineno += 1
        body = raw.strip(b" \t\r\n\x00")
        if body:
            reason = None
            rec = None
            if bad is not None:  # a non-blank line after a corrupt one: corruption in the middle
                bl, _, why = bad
                raise RunDirectoryError(
                    f"{path}: line {bl} is corrupt ({why}) but later lines are not; "
                    "the file was damaged in the middle: restore it or start a new run"
                )
            # A last line without its newline is kept only if it is a whole JSON object (a
            # proper prefix of an object never parses).
            try:
                rec = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                reason = f"not valid JSON: {e}"
            else:
                if not isinstance(rec, dict):
                    reason = "not a JSON object"
                elif not isinstance(rec.get("example_id"), str) or not isinstance(
                    rec.get("mode"), str
                ):
                    reason = "missing example_id/mode"
            if reason is not None:
                bad = (lineno, pos, reason)
            else:
                assert rec is not None
                key = (rec["example_id"], rec["mode"])
                if key in seen:
                    raise RunDirectoryError(
                        f"{path}: line {lineno} repeats (example_id={key[0]!r}, mode={key[1]!r}) "
                        f"from line {seen[key]}"
                    )
                seen[key] = lineno
                records.append(rec)
                good_end = end
        pos = end
    dropped = None
    if bad is not None:
        dropped = f"line {bad[0]} ({bad[2]}; {n - bad[1]} bytes)"
    return records, good_end, dropped


#: Version of one record's layout (``schema`` in every line).
RECORD_SCHEMA = 1


def make_record(example_id: str, mode: str, *, valid: bool, base_score: float, defended_score: float,
                outcome: ExampleOutcome | None = None, error: str | None = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One line of records.jsonl: the example's flip scores, and, once it was recovered in
    ``mode``, the outcome's score, steps and metrics (``recovered`` is None until then).
    ``error``: why the example failed (it then counts as not recovered); ``extra``: the task's
    own per-example fields (e.g. refusal openings)."""
    rec: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "example_id": example_id,
        "mode": mode,
        "valid": bool(valid),
        "base_score": float(base_score),
        "defended_score": float(defended_score),
        "recovered": None,
        "failed": error is not None,
        "error": error,
    }
    if outcome is not None:
        rec.update({"recovered": outcome.recovered, "recovered_score": outcome.recovered_score,
                    "steps": outcome.steps})
        rec.update(outcome.metrics)
    if extra:
        rec.update(extra)
    return rec
