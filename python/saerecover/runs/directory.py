"""The run directory: the unit of reproducibility of a recovery run (DESIGN.md, "Runs are data").

Layout of ``out/``::

    config.json                           resolved config + versions, created, config_hash
    records.jsonl                         one JSON object per (example_id, mode), appended + fsynced
    tensors/<mode>/<example_id>.safetensors   per-example tensors (delta, h_def, ...), atomic
    summary.json                          aggregate statistics (see saerecover.stats.summarize)
    report.md, plots/*.png                written by saerecover.report
    .lock                                 held (flock) by the one process writing the run

A writer (:class:`RunDirectory`) holds an exclusive lock, resumes a run whose config hash matches,
and repairs a records file whose last line was cut short by a crash. A reader (:func:`open_run`)
takes no lock and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saerecover import __version__
from saerecover.runs.errors import RunDirectoryError
from saerecover.runs.files import (
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    check_no_link,
    fsync_dir,
    fsync_fd,
    open_regular,
    to_jsonable,
    write_all,
)
from saerecover.runs.records import parse_records

try:  # POSIX only; elsewhere the directory is not locked (a warning says so)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch

__all__ = [
    "RUN_SCHEMA",
    "VOLATILE_KEYS",
    "RunDirectory",
    "RunDirectoryError",
    "check_resumable",
    "config_diff",
    "config_hash",
    "open_run",
    "validate_name",
]

#: Version of the on-disk layout. A run written under another schema is refused, not guessed at.
RUN_SCHEMA = 1

#: Keys the run directory adds to config.json; they are excluded from ``config_hash``.
VOLATILE_KEYS = frozenset(
    {"run_schema", "saerecover_version", "versions", "created", "config_hash", "resumed"}
)

CONFIG_FILE = "config.json"
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
TENSORS_DIR = "tensors"
LOCK_FILE = ".lock"
TENSOR_SUFFIX = ".safetensors"

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_NAME_LEN = 200  # leaves room for ".safetensors" and temp-file decorations under NAME_MAX
_TMP_RE = re.compile(r"^\..+\.tmp$")



# --------------------------------------------------------------------------------------------
# JSON normalisation, names, config hash



def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``config`` without volatile keys."""
    plain = to_jsonable(
        {k: v for k, v in config.items() if k not in VOLATILE_KEYS}, "config", nonfinite=None
    )
    return hashlib.sha256(canonical_json(plain).encode("utf-8")).hexdigest()


def validate_name(name: Any, what: str) -> str:
    """Check that an example id or mode can be used as a file name inside the run directory:
    only ``[A-Za-z0-9._-]``, not ``.``/``..`` or containing ``..``, at most 200 characters."""
    if not isinstance(name, str):
        raise RunDirectoryError(f"{what} must be a str, got {type(name).__name__} {name!r}")
    if (
        not name
        or len(name) > _MAX_NAME_LEN
        or not _NAME_RE.match(name)
        or ".." in name
        or name.startswith(".")
    ):
        raise RunDirectoryError(
            f"{what} {name!r} cannot be used as a file name: use 1-{_MAX_NAME_LEN} characters from "
            "[A-Za-z0-9._-], not starting with '.' and without '..'"
        )
    return name


def _library_versions() -> dict[str, str | None]:
    """Versions of the libraries that decide a run's numbers, from package metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for key, dist in [
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("sae_lens", "sae-lens"),
        ("transformer_lens", "transformer-lens"),
        ("numpy", "numpy"),
        ("safetensors", "safetensors"),
    ]:
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    out["python"] = platform.python_version()
    return out


def _saerecover_version() -> str:
    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Marks a key present on one side of a :func:`config_diff` only.
ABSENT = object()


def config_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Where two configs differ, down to the leaves: ``(dotted key, old value, new value)``, with
    :data:`ABSENT` for a key on one side only. Dicts are compared key by key, lists of equal
    length item by item (``clamp[0].features``), anything else as a whole."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            out += config_diff(old.get(k, ABSENT), new.get(k, ABSENT), key)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in config_diff(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [(prefix, old, new)]


#: Differences a refusal lists one by one (the rest are counted).
MAX_LISTED_DIFFERENCES = 12


def describe_diff(diff: list[tuple[str, Any, Any]], old_name: str, new_name: str) -> str:
    """One line per difference, ``  recovery.steps: run has 20, new config has 22``."""
    def show(v: Any) -> str:
        return "(absent)" if v is ABSENT else _short(v)

    lines = [f"  {key}: {old_name} has {show(a)}, {new_name} has {show(b)}"
             for key, a, b in diff[:MAX_LISTED_DIFFERENCES]]
    if len(diff) > MAX_LISTED_DIFFERENCES:
        lines.append(f"  ... and {len(diff) - MAX_LISTED_DIFFERENCES} more")
    return "\n".join(lines)



def config_mismatch(path: Path, diff: list[tuple[str, Any, Any]]) -> RunDirectoryError:
    """The refusal to resume ``path`` with another config: every differing key with both values."""
    keys = [k for k, _, _ in diff]
    what = "a run of another task" if any(k == "task" or k.startswith("task.") for k in keys) \
        else "a run with another config"
    shown = ", ".join(keys[:MAX_LISTED_DIFFERENCES]) + (", ..." if len(keys) > MAX_LISTED_DIFFERENCES else "")
    return RunDirectoryError(
        f"{path} holds {what}; differing key(s): {shown}\n"
        + describe_diff(diff, "run", "new config")
        + "\nchoose a new --out, or pass --overwrite to discard the old run"
    )


def expected_diff(stored: Any, expected: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """:func:`config_diff` limited to what ``expected`` names: dict keys of ``expected`` only
    (a value :data:`ABSENT` there means "must not be in the run's config")."""
    if isinstance(expected, Mapping) and isinstance(stored, Mapping):
        out = []
        for k, v in expected.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out += expected_diff(stored.get(k, ABSENT), v, key)
        return out
    return [] if stored == expected else [(prefix, stored, expected)]


def check_resumable(path: str | os.PathLike[str], expected: Mapping[str, Any]) -> None:
    """Refuse, before any long work, to resume the run at ``path`` with a config that differs
    from its config.json at a key of ``expected`` (the options known before the model loads);
    the same RunDirectoryError as opening it would give. Nothing to check (no run there, or a
    config.json that opening explains better) passes."""
    cfg_path = Path(path) / CONFIG_FILE
    try:
        stored = json.loads(_read_regular(cfg_path, Path(path)))
    except (OSError, RunDirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(stored, dict):
        return
    diff = expected_diff({k: v for k, v in stored.items() if k not in VOLATILE_KEYS}, expected)
    if diff:
        raise config_mismatch(Path(path), diff)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"the number {value!r}" if isinstance(value, (int, float)) else type(value).__name__)


def check_summary(summary: Any, path: Path) -> dict[str, Any]:
    """``summary`` if it has the shape of a run's summary.json (an object whose ``modes``, when
    present, maps each mode to an object); else a RunDirectoryError saying what is wrong."""
    hint = "; rerun the run (it resumes and rewrites the summary) or restore the file"
    if not isinstance(summary, dict):
        raise RunDirectoryError(f"{path} is not a run summary: it holds {_json_type(summary)}, not an object{hint}")
    modes = summary.get("modes")
    if modes is not None and not isinstance(modes, dict):
        raise RunDirectoryError(f"{path} is not a run summary: \"modes\" is {_json_type(modes)}, not an object "
                                f"of modes{hint}")
    for name, m in (modes or {}).items():
        if m is not None and not isinstance(m, dict):
            raise RunDirectoryError(f"{path} is not a run summary: mode {name!r} is {_json_type(m)}, not an "
                                    f"object{hint}")
    return summary


def _damaged(path: Path, err: Exception) -> RunDirectoryError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RunDirectoryError(f"cannot read {path}: {reason} (a damaged or cut-short safetensors file)")


def _read_regular(path: Path, root: Path) -> bytes:
    """The bytes of a file of the run, opened without following a link."""
    fd = open_regular(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), root)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# the run directory


class RunDirectory:
    """A run directory opened for writing (or, via :func:`open_run`, for reading).

    ``RunDirectory(path, config=cfg)`` creates ``path`` if needed, takes an exclusive lock on it,
    writes ``config.json`` for a new run, or resumes an existing run whose config hash matches.
    ``overwrite=True`` empties an existing *run* directory first (never a directory that is not a
    run). Use as a context manager or call :meth:`close` to release the lock.
    """

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any]

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config: Mapping[str, Any],
        resume: bool = True,
        overwrite: bool = False,
        _readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._records_fd: int | None = None
        self._readonly = _readonly
        self._done: set[tuple[str, str]] = set()
        self.resumed = False
        if _readonly:
            self._open_readonly()
            return
        if not isinstance(config, Mapping):
            raise RunDirectoryError(f"config must be a dict, got {type(config).__name__}")
        clash = sorted(VOLATILE_KEYS & set(config))
        if clash:
            raise RunDirectoryError(
                f"config uses reserved key(s) {clash}: the run directory adds these itself"
            )
        new_config = to_jsonable(dict(config), "config", nonfinite=None)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirectoryError(f"{self.path} exists and is not a directory") from None
        if not self.path.is_dir():
            raise RunDirectoryError(f"{self.path} exists and is not a directory")
        check_no_link(self.path)  # before anything is written: nothing may go through a link
        self._acquire_lock()
        try:
            self._open_for_writing(new_config, resume=resume, overwrite=overwrite)
        except BaseException:
            self.close()
            raise

    # ---- opening

    def _acquire_lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        fd = open_regular(lock_path, os.O_RDWR | os.O_CREAT, self.path)
        if fcntl is None:  # pragma: no cover - Windows
            warnings.warn("file locking is unavailable on this platform; run directory not locked")
            self._lock_fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            try:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(fd)
            raise RunDirectoryError(
                f"run directory {self.path} is in use by another process (pid {holder}); "
                "wait for it to finish, or choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            write_all(fd, f"{os.getpid()}\n".encode("ascii"), lock_path)
            fsync_fd(fd, lock_path)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _content_names(self) -> list[str]:
        """Entries of the directory other than hidden ones (the lock, temp files)."""
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))

    def _remove_stale_tmp(self) -> None:
        """Delete temp files left by an atomic write that a crash interrupted (we hold the lock)."""
        dirs = [self.path]
        tdir = self.path / TENSORS_DIR
        if tdir.is_dir():
            dirs += [d for d in tdir.iterdir() if d.is_dir()]
        for d in dirs:
            for p in d.iterdir():
                if _TMP_RE.match(p.name) and p.is_file():
                    try:
                        p.unlink()
                    except OSError:
                        pass

    def _empty_run_dir(self) -> None:
        for p in self.path.iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def _open_for_writing(self, new_config: dict, *, resume: bool, overwrite: bool) -> None:
        cfg_path = self.path / CONFIG_FILE
        if cfg_path.exists():
            if overwrite:
                self._read_config_file(check_schema=False)  # refuse to empty a non-run directory
                self._empty_run_dir()
            else:
                stored = self._read_config_file()
                self._check_resume(stored, new_config, resume=resume)
                self.resumed = True
        else:
            others = self._content_names()
            if others:
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise RunDirectoryError(
                    f"{self.path} is not empty ({shown}) but holds no {CONFIG_FILE}: it is not a "
                    "saerecover run directory; choose a new --out (--overwrite only empties run "
                    "directories)"
                )
        self._remove_stale_tmp()
        self._load_records(repair=True)  # before touching config.json: a damaged file stops here
        h = config_hash(new_config)
        if self.resumed:
            self.meta = {k: v for k, v in stored.items() if k in VOLATILE_KEYS}
            version = _saerecover_version()
            if self.meta.get("saerecover_version") != version:
                warnings.warn(
                    f"resuming {self.path} written by saerecover "
                    f"{self.meta.get('saerecover_version')} with saerecover {version}",
                    stacklevel=3,
                )
            resumed = list(self.meta.get("resumed") or [])
            resumed.append({"at": _now(), "saerecover_version": version, "pid": os.getpid()})
            self.meta["resumed"] = resumed
        else:
            self.meta = {
                "run_schema": RUN_SCHEMA,
                "saerecover_version": _saerecover_version(),
                "versions": _library_versions(),
                "created": _now(),
                "config_hash": h,
            }
        self.config = new_config
        atomic_write_json(cfg_path, {**new_config, **self.meta}, root=self.path)
        rec_path = self.path / RECORDS_FILE
        existed = os.path.lexists(rec_path)
        self._records_fd = open_regular(rec_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.path)
        if not existed:
            fsync_dir(self.path)

    def _open_readonly(self) -> None:
        if not self.path.is_dir():
            raise RunDirectoryError(f"{self.path} is not a directory")
        check_no_link(self.path)
        if not (self.path / CONFIG_FILE).exists():
            members = sorted(p.name for p in self.path.iterdir() if (p / CONFIG_FILE).is_file())
            hint = (f"; it holds run directories ({', '.join(members[:6])}{', ...' if len(members) > 6 else ''}): "
                    "give one of them" if members else "")
            raise RunDirectoryError(f"{self.path} is not a saerecover run directory (no {CONFIG_FILE}){hint}")
        stored = self._read_config_file()
        self.config = {k: v for k, v in stored.items() if k not in VOLATILE_KEYS}
        self.meta = {k: v for k, v in stored.items() if k in VOLATILE_KEYS}
        self._load_records(repair=False)

    def _read_config_file(self, *, check_schema: bool = True) -> dict[str, Any]:
        cfg_path = self.path / CONFIG_FILE
        try:
            stored = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunDirectoryError(f"cannot read {cfg_path}: {e}") from e
        if not isinstance(stored, dict) or "config_hash" not in stored:
            raise RunDirectoryError(
                f"{cfg_path} is not a saerecover run config (no config_hash); choose a new --out"
            )
        schema = stored.get("run_schema")
        if check_schema and schema != RUN_SCHEMA:
            raise RunDirectoryError(
                f"{self.path} uses run-directory schema {schema!r}; this saerecover "
                f"({_saerecover_version()}) reads schema {RUN_SCHEMA}; choose a new --out"
            )
        return stored

    def _check_resume(self, stored: dict, new_config: dict, *, resume: bool) -> None:
        old_config = {k: v for k, v in stored.items() if k not in VOLATILE_KEYS}
        if config_hash(old_config) != stored["config_hash"]:
            raise RunDirectoryError(
                f"{self.path / CONFIG_FILE} was edited after the run started (its config_hash "
                "does not match its contents); refusing to resume: choose a new --out or "
                "pass --overwrite"
            )
        diff = config_diff(old_config, new_config)
        if diff:
            raise config_mismatch(self.path, diff)
        if not resume:
            raise RunDirectoryError(
                f"{self.path} already holds a run of this config and resume is off; "
                "resume it, choose a new --out, or pass --overwrite"
            )

    def _load_records(self, *, repair: bool) -> list[dict]:
        rec_path = self.path / RECORDS_FILE
        if not os.path.lexists(rec_path):
            self._done = set()
            return []
        data = _read_regular(rec_path, self.path)
        records, good_end, dropped = parse_records(data, rec_path)
        missing_newline = good_end > 0 and data[good_end - 1 : good_end] != b"\n"
        if repair and (good_end < len(data) or missing_newline):
            fd = open_regular(rec_path, os.O_RDWR, self.path)  # keep the good prefix, drop the damaged tail
            try:
                os.ftruncate(fd, good_end)
                if missing_newline:
                    os.lseek(fd, good_end, os.SEEK_SET)
                    write_all(fd, b"\n", rec_path)
                fsync_fd(fd, rec_path)
            finally:
                os.close(fd)
            if dropped is not None:
                warnings.warn(
                    f"{rec_path}: dropped a truncated/corrupt last {dropped}; that example will "
                    "be run again",
                    stacklevel=4,
                )
        self._done = {(r["example_id"], r["mode"]) for r in records}
        return records

    # ---- records

    def done(self) -> set[tuple[str, str]]:
        """The ``(example_id, mode)`` pairs already recorded."""
        return set(self._done)

    def records(self) -> list[dict]:
        """All records, read from the file (a cut-short last line is left out)."""
        return self._load_records(repair=False)

    def append_record(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line, then flush and fsync.

        ``record`` needs ``example_id`` and ``mode`` (valid file names); any other keys are kept.
        NaN/infinity values are written as null and their keys listed under ``"nonfinite"``.
        A second record for the same ``(example_id, mode)`` is refused.
        """
        self._check_writable()
        if not isinstance(record, Mapping):
            raise RunDirectoryError(f"a record must be a dict, got {type(record).__name__}")
        for key in ("example_id", "mode"):
            if key not in record:
                raise RunDirectoryError(f"record has no {key!r}: {_short(dict(record), 200)}")
        eid = validate_name(record["example_id"], "example_id")
        mode = validate_name(record["mode"], "mode")
        if (eid, mode) in self._done:
            raise RunDirectoryError(
                f"{self.path / RECORDS_FILE} already has a record for (example_id={eid!r}, "
                f"mode={mode!r}); skip pairs in done()"
            )
        nonfinite: list[str] = []
        plain = to_jsonable(dict(record), "", nonfinite=nonfinite)
        if nonfinite:
            plain["nonfinite"] = sorted(set(plain.get("nonfinite") or []) | set(nonfinite))
        line = json.dumps(plain, ensure_ascii=False, allow_nan=False) + "\n"
        assert self._records_fd is not None
        rec_path = self.path / RECORDS_FILE
        write_all(self._records_fd, line.encode("utf-8"), rec_path)
        fsync_fd(self._records_fd, rec_path)
        self._done.add((eid, mode))

    # ---- tensors

    def tensor_path(self, mode: str, example_id: str) -> Path:
        """``tensors/<mode>/<example_id>.safetensors`` (names validated)."""
        mode = validate_name(mode, "mode")
        example_id = validate_name(example_id, "example_id")
        return self.path / TENSORS_DIR / mode / f"{example_id}{TENSOR_SUFFIX}"

    def save_tensors(
        self,
        mode: str,
        example_id: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write one example's tensors (copied to CPU, contiguous) as safetensors, atomically.

        ``metadata`` values that are not strings are stored as their JSON text. ``example_id``,
        ``mode`` and ``saerecover_version`` are added to the metadata. Overwrites a file left by
        an earlier attempt whose record was never appended.
        """
        import torch
        from safetensors.torch import save

        self._check_writable()
        path = self.tensor_path(mode, example_id)
        if not isinstance(tensors, Mapping) or not tensors:
            raise RunDirectoryError(
                f"tensors for ({example_id!r}, {mode!r}) must be a non-empty dict of name -> tensor"
            )
        plain: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise RunDirectoryError(
                    f"tensor name {name!r} for ({example_id!r}, {mode!r}) is not a str"
                )
            if not isinstance(t, torch.Tensor):
                raise RunDirectoryError(
                    f"tensor {name!r} for ({example_id!r}, {mode!r}) is a {type(t).__name__}, "
                    "not a torch.Tensor"
                )
            if t.layout != torch.strided:
                raise RunDirectoryError(
                    f"tensor {name!r} for ({example_id!r}, {mode!r}) has layout {t.layout}; "
                    "only dense tensors can be saved"
                )
            plain[name] = t.detach().to("cpu", copy=True).contiguous()
        meta: dict[str, str] = {}
        for k, v in (metadata or {}).items():
            if not isinstance(k, str):
                raise RunDirectoryError(f"metadata key {k!r} is not a str")
            meta[k] = v if isinstance(v, str) else json.dumps(to_jsonable(v, k, nonfinite=None))
        meta.update(
            example_id=example_id, mode=mode, saerecover_version=_saerecover_version()
        )
        try:
            data = save(plain, metadata=meta)
        except Exception as e:  # safetensors reports which tensor
            raise RunDirectoryError(
                f"cannot serialize tensors for ({example_id!r}, {mode!r}): {e}"
            ) from e
        return atomic_write_bytes(path, data, root=self.path)

    def _existing_tensor_path(self, mode: str, example_id: str) -> Path:
        path = self.tensor_path(mode, example_id)
        if not path.is_file():
            raise RunDirectoryError(
                f"no tensors for (example_id={example_id!r}, mode={mode!r}): {path}"
            )
        return path

    def load_tensors(self, mode: str, example_id: str) -> dict[str, torch.Tensor]:
        """Load one example's tensors on CPU (safetensors: no pickle, no code execution)."""
        from safetensors.torch import load_file

        path = self._existing_tensor_path(mode, example_id)
        try:
            return load_file(path)
        except Exception as e:  # safetensors' own error type: a cut-short or damaged file
            raise _damaged(path, e) from e

    def tensor_metadata(self, mode: str, example_id: str) -> dict[str, str]:
        """The string metadata stored with one example's tensors."""
        from safetensors import safe_open

        path = self._existing_tensor_path(mode, example_id)
        try:
            with safe_open(path, framework="pt") as f:
                return dict(f.metadata() or {})
        except Exception as e:
            raise _damaged(path, e) from e

    # ---- summary

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically (no NaN allowed)."""
        self._check_writable()
        plain = to_jsonable(dict(summary), "summary", nonfinite=None)
        atomic_write_json(self.path / SUMMARY_FILE, plain, root=self.path)

    def read_summary(self) -> dict[str, Any]:
        path = self.path / SUMMARY_FILE
        if not path.exists():
            raise RunDirectoryError(f"{path} does not exist yet (the run has not been summarized)")
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunDirectoryError(f"cannot read {path}: {e}") from e
        return check_summary(summary, path)

    # ---- lifetime

    @property
    def readonly(self) -> bool:
        return self._readonly

    def _check_writable(self) -> None:
        if self._readonly:
            raise RunDirectoryError(f"{self.path} was opened read-only (open_run)")
        if self._lock_fd is None:
            raise RunDirectoryError(f"{self.path} is closed")

    def close(self) -> None:
        """Close the records file and release the lock. Safe to call twice."""
        rfd, self._records_fd = self._records_fd, None
        if rfd is not None:
            os.close(rfd)
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:  # pragma: no cover
                    pass
            os.close(fd)

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        if self._readonly:
            state = "read-only"
        else:
            state = "open" if self._lock_fd is not None else "closed"
        return f"RunDirectory({str(self.path)!r}, {state}, {len(self._done)} records)"


def open_run(path: str | os.PathLike[str]) -> RunDirectory:
    """Open an existing run directory read-only: no lock, no repair, write methods refuse.

    Raises RunDirectoryError if ``path`` is not a run directory.
    """
    return RunDirectory(path, config={}, _readonly=True)


def run_in_use(path: str | os.PathLike[str]) -> str | None:
    """The pid (as text, or ``"unknown"``) of a process holding ``path``'s run lock, else None.

    Probes the lock a :class:`~saerecover.runs.RunDirectory` writer holds, with a shared
    non-blocking ``flock`` that is released at once; never creates the lock file.
    """
    lock = Path(path) / LOCK_FILE
    if fcntl is None or not lock.is_file():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            try:
                return os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            except OSError:
                return "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
