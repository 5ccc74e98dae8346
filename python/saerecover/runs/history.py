"""The optimisation history of one example: what each step of its delta search measured (loss,
score, delta norm, defended-feature drift, ...), stored beside its other tensors.

Each history field becomes one 1-D float32 tensor ``history.<field>`` (one value per step taken)
in ``tensors/<mode>/<example_id>.safetensors``: a file written atomically with the example's
record, so that resume, shards and merge keep histories without anything of their own, and
records.jsonl stays one short line per example. A field an entry lacks is NaN there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from saerecover.runs.errors import RunDirectoryError

if TYPE_CHECKING:
    import torch

    from saerecover.runs.directory import RunDirectory

__all__ = ["HISTORY_PREFIX", "history_tensors", "read_histories"]

#: Tensor-name prefix of the history fields in an example's safetensors file.
HISTORY_PREFIX = "history."


def history_tensors(history: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``{"history.<field>": (steps,) float32}`` of a list of per-step entries (empty for none);
    fields in the order they first appear, NaN where an entry lacks one."""
    import torch

    fields: list[str] = []
    for entry in history:
        fields += [k for k in entry if k not in fields]
    return {HISTORY_PREFIX + k: torch.tensor([_number(e.get(k)) for e in history], dtype=torch.float32)
            for k in fields}


def _number(x: Any) -> float:
    if isinstance(x, bool):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def read_histories(run: RunDirectory, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """The saved history of each ``(example_id, mode)`` in ``keys`` that has one: field -> one
    value per step (NaN kept). Reads only the history tensors of each file; a missing file or a
    file without history is left out."""
    from safetensors import safe_open

    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for eid, mode in keys:
        try:
            path = run.tensor_path(mode, eid)
        except RunDirectoryError:
            continue
        if not path.is_file():
            continue
        with safe_open(str(path), framework="pt") as f:
            names = [k for k in f.keys() if k.startswith(HISTORY_PREFIX)]
            if names:
                out[(eid, mode)] = {k[len(HISTORY_PREFIX):]: f.get_tensor(k).double().tolist() for k in names}
    return out
