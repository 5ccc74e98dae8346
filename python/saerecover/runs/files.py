"""Files that survive a crash: atomic writes (temp file, fsync, rename, fsync of the directory)
and the JSON normalisation every file of a run directory goes through."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.runs.errors import RunDirectoryError


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power cut (no-op if unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one, never a
    partial one: temp file in the same directory, fsync, ``os.replace``, fsync of the directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically. NaN and infinity are refused (JSON has neither)."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    except ValueError as e:
        raise RunDirectoryError(f"cannot write {Path(path).name}: {e} (use null, not NaN)") from e
    return atomic_write_text(path, text + "\n")


def to_jsonable(obj: Any, where: str, *, nonfinite: list[str] | None) -> Any:
    """Convert ``obj`` to plain JSON types. Paths become strings, NumPy/torch scalars and arrays
    become numbers/lists. Non-finite floats become None and are listed in ``nonfinite``; with
    ``nonfinite=None`` they are an error."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        if nonfinite is None:
            raise RunDirectoryError(f"{where} is {obj!r}; JSON has no NaN/infinity")
        nonfinite.append(where)
        return None
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise RunDirectoryError(f"{where} has a non-string key {k!r}")
            out[k] = to_jsonable(v, f"{where}.{k}" if where else k, nonfinite=nonfinite)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]", nonfinite=nonfinite) for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v, f"{where}[]", nonfinite=nonfinite) for v in sorted(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(obj.tolist(), where, nonfinite=nonfinite)
    if hasattr(obj, "item") and callable(obj.item):  # other numpy scalar types
        return to_jsonable(obj.item(), where, nonfinite=nonfinite)
    if type(obj).__module__.startswith("torch"):  # torch.dtype, torch.device
        return str(obj)
    raise RunDirectoryError(
        f"{where or 'value'} has type {type(obj).__name__}, which has no JSON form; "
        "convert it to a str, number, list or dict"
    )


def canonical_json(obj: Any) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
