"""Files that survive a crash: atomic writes (temp file, fsync, rename, fsync of the directory)
and the JSON normalisation every file of a run directory goes through.

Everything a run writes stays inside its directory: no file or directory of it is opened
through a symbolic link (:func:`find_link` refuses a run directory that holds one; files are
opened with ``O_NOFOLLOW`` and directories under ``root`` are checked one component at a time),
and new files get the permissions of an ordinary file (``0o666`` less the umask, as ``open``
gives), the temp files of atomic writes included. A write that fails (a full disk) names the
file it was writing.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.runs.errors import RunDirectoryError

#: Flags that refuse to open the last component of a path when it is a symbolic link (ELOOP).
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: Permissions asked for new files; the process umask is applied by the kernel, as for ``open``.
FILE_MODE = 0o666


def os_error(err: OSError, path: str | os.PathLike[str], action: str = "write") -> OSError:
    """``err`` with the file named (``[Errno 28] No space left on device: cannot write PATH``);
    an error that already names a file is returned unchanged."""
    if err.filename is not None:
        return err
    reason = err.strerror or str(err) or type(err).__name__
    text = f"{reason}: cannot {action} {os.fspath(path)}"
    return type(err)(err.errno, text) if err.errno is not None else type(err)(text)


def write_all(fd: int, data: bytes, path: str | os.PathLike[str]) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked); an
    OSError (ENOSPC, EIO, ...) names ``path``."""
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            if written <= 0:  # pragma: no cover - a regular file never writes 0 bytes of a non-empty buffer
                raise OSError(errno.EIO, "short write")
            view = view[written:]
    except OSError as err:
        raise os_error(err, path) from err


def fsync_fd(fd: int, path: str | os.PathLike[str]) -> None:
    """``os.fsync(fd)``; an OSError (a full disk reports ENOSPC here too) names ``path``."""
    try:
        os.fsync(fd)
    except OSError as err:
        raise os_error(err, path, "sync") from err


def link_error(path: Path, root: Path | None = None) -> RunDirectoryError:
    """The one-line refusal of a symbolic link inside a run directory."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    where = f" in {root}" if root is not None else ""
    shown = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
    return RunDirectoryError(
        f"{shown}{where} is a symbolic link (to {target}); a run directory holds only regular files and "
        "directories, so that nothing outside it is written: replace the link with a copy, or choose a new --out"
    )


def find_link(root: str | os.PathLike[str]) -> Path | None:
    """The first symbolic link inside ``root`` (``root`` itself may be one), walking without
    following links; None when there is none or ``root`` does not exist."""
    stack = [Path(root)]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_symlink():
                return Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
    return None


def check_no_link(root: str | os.PathLike[str]) -> None:
    """Refuse ``root`` when a symbolic link is inside it (see :func:`find_link`)."""
    link = find_link(root)
    if link is not None:
        raise link_error(link, Path(root))


def safe_parent(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> Path:
    """Create ``path``'s parent directories; with ``root``, every component from ``root`` down to
    ``path`` must be a real directory (or, the last, a missing or regular file), never a link."""
    path = Path(path)
    if root is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    root = Path(root)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise RunDirectoryError(f"{path} is not inside {root}") from None
    here = root
    for i, part in enumerate(parts):
        here = here / part
        last = i == len(parts) - 1
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            if last:
                break
            try:
                os.mkdir(here)
            except FileExistsError:
                pass
            st = os.lstat(here)
        if stat.S_ISLNK(st.st_mode):
            raise link_error(here, root)
        if not last and not stat.S_ISDIR(st.st_mode):
            raise RunDirectoryError(f"{here} is not a directory; cannot write {path}")
    return path


def open_regular(path: str | os.PathLike[str], flags: int, root: str | os.PathLike[str] | None = None) -> int:
    """``os.open(path, flags | O_NOFOLLOW)`` (created with ordinary-file permissions when
    ``flags`` has O_CREAT) for a file a run writes in place (records.jsonl, .lock): refused when
    it is a link, not a regular file, or (opened for writing) a hard link of another file
    (writing it would change that file too)."""
    path = Path(path)
    try:
        fd = os.open(path, flags | NOFOLLOW | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    except OSError as err:
        if err.errno == errno.ELOOP or os.path.islink(path):
            raise link_error(path, Path(root) if root is not None else None) from None
        raise os_error(err, path, "open") from err
    st = os.fstat(fd)
    writes = flags & (os.O_WRONLY | os.O_RDWR)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RunDirectoryError(f"{path} is not a regular file; choose a new --out")
    if writes and st.st_nlink > 1:
        os.close(fd)
        raise RunDirectoryError(f"{path} is a file with {st.st_nlink} hard links; a run writes it in place, which "
                                "would change the other link(s) too: replace it with a copy, or choose a new --out")
    return fd


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


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temp file beside ``path`` (``.NAME.RANDOM.tmp``), created exclusively and never
    through a link, with ordinary-file permissions."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         FILE_MODE)
        except FileExistsError:
            continue
        except OSError as err:
            raise os_error(err, tmp, "create") from err
        return fd, tmp
    raise FileExistsError(f"cannot create a temp file beside {path}")  # pragma: no cover


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *,
                       root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one, never a
    partial one: temp file in the same directory, fsync, ``os.replace``, fsync of the directory.
    ``root``: the run directory ``path`` is in; no component below it may be a link. The new
    file has ordinary-file permissions (0o666 less the umask). An OSError names ``path``.
    """
    path = safe_parent(path, root)
    fd, tmp = _create_temp(path)
    try:
        try:
            write_all(fd, data, path)
            fsync_fd(fd, path)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise os_error(err, path, "replace") from err
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, root: str | os.PathLike[str] | None = None) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), root=root)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``obj`` as JSON atomically. NaN and infinity are refused (JSON has neither)."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    except ValueError as e:
        raise RunDirectoryError(f"cannot write {Path(path).name}: {e} (use null, not NaN)") from e
    return atomic_write_text(path, text + "\n", root=root)


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
