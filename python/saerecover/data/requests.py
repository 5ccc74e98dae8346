"""Requests for the refusal setting: from CSV (AdvBench ``goal``, HarmBench ``Behavior``),
JSON/JSONL/TXT files, ``hf:ORG/NAME`` on the hub, or the toy corpus; and their hashes (a run
stores a request's sha256, never its text)."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saerecover.data import toy_corpus as corpus


def toy_requests(n: int, *, harmful: bool, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` distinct toy-corpus requests (harmful: danger level >= the threshold)."""
    rng = random.Random(f"refusal-{seed}-{int(harmful)}")
    seen = set(exclude)
    out: list[str] = []
    for _ in range(200 * n):
        r = corpus.request_example(rng, harmful=harmful).request
        if r not in seen:
            seen.add(r)
            out.append(r)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct {'harmful' if harmful else 'harmless'} toy requests")


#: Columns looked for, in order, when ``load_requests`` is given no column: AdvBench
#: (harmful_behaviors.csv: goal,target), HarmBench (Behavior, ...), and common names.
REQUEST_COLUMNS = ("goal", "behavior", "Behavior", "prompt", "request", "instruction", "query", "text")


def load_requests(source: str | Path, *, column: str | None = None, limit: int | None = None,
                  split: str = "train") -> list[str]:
    """Requests from a local file or the Hugging Face hub.

    source: a ``.csv`` (AdvBench ``goal`` / HarmBench ``Behavior`` columns), ``.json`` (a list
    of strings or of objects), ``.jsonl`` (one object or string per line) or ``.txt`` (one
    request per line) file; or ``hf:ORG/NAME`` for ``datasets.load_dataset(ORG/NAME,
    split=split)`` (needs the ``datasets`` package and network access). column: the field
    holding the request (default: the first of :data:`REQUEST_COLUMNS` present). Empty
    requests are dropped; ``limit`` keeps the first ``limit``.
    """
    text = str(source)
    if text.startswith("hf:"):
        try:
            import datasets
        except ImportError as err:
            raise ImportError(f"{text}: loading from the hub needs the 'datasets' package") from err
        rows: list[Any] = list(datasets.load_dataset(text[3:], split=split))
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"requests file {path} does not exist (give a .csv, .json, .jsonl or .txt "
                                    "file, or hf:ORG/NAME)")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, Mapping):  # {"data": [...]} or {"requests": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise ValueError(f"{path}: expected a JSON list, or an object holding one list")
                data = lists[0]
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of requests")
            rows = data
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".txt":
            rows = [line for line in path.read_text(encoding="utf-8").splitlines()]
        else:
            raise ValueError(f"requests file {path}: unknown format {suffix!r}; use .csv, .json, .jsonl or .txt")
    out: list[str] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            value = row
        elif isinstance(row, Mapping):
            key = column
            if key is None:
                key = next((c for c in REQUEST_COLUMNS if c in row), None)
                if key is None:
                    raise ValueError(f"{text}: row {i} has none of the columns {list(REQUEST_COLUMNS)}; "
                                     f"pass column= (it has {sorted(row)[:8]})")
            if key not in row:
                raise ValueError(f"{text}: row {i} has no column {key!r} (it has {sorted(row)[:8]})")
            value = row[key]
        else:
            raise ValueError(f"{text}: row {i} is a {type(row).__name__}, not a string or an object")
        value = str(value or "").strip()
        if value:
            out.append(value)
    if limit is not None:
        out = out[: int(limit)]
    if not out:
        raise ValueError(f"{text}: no requests found")
    return out


def requests_hash(requests: Sequence[str]) -> str:
    h = hashlib.sha256()
    for r in requests:
        h.update(r.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def request_hash(request: str) -> str:
    """sha256 (hex) of one request's UTF-8 text: what a run stores instead of the text."""
    return hashlib.sha256(request.encode("utf-8")).hexdigest()


def source_requests(source: Mapping[str, Any] | None) -> list[str]:
    """The requests a run's ``config["task"]["source"]`` points to: a file (:func:`load_requests`)
    or the toy world's harmless corpus requests (:func:`toy_requests`)."""
    kind = (source or {}).get("kind")
    if kind == "file":
        return load_requests(source["path"], column=source.get("column"), limit=source.get("limit"))
    if kind == "toy":
        return toy_requests(int(source["n"]), harmful=False, seed=int(source["seed"]))
    raise ValueError("the run does not record where its requests came from (config task.source); "
                     "pass the requests (attribute_run(..., requests=[...]) or --requests FILE)")
