"""Join the run directories of a sharded run (``saerecover run ... --shard i/n``) into one.

Each shard's config.json equals the others' apart from ``"shard": {"index": i, "count": n}``.
The merged directory holds the shared config (no ``shard`` key, plus ``merged_from``), every
record and tensor file of every shard, and a summary and report recomputed from the records,
exactly as if the run had not been split.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from saerecover.report.run import write_report
from saerecover.runs import (
    LOCK_FILE,
    RECORDS_FILE,
    SUMMARY_FILE,
    RunDirectory,
    RunDirectoryError,
    atomic_write_bytes,
    open_run,
)
from saerecover.runs.directory import MAX_LISTED_DIFFERENCES, config_diff, describe_diff, run_in_use
from saerecover.runs.stats import summarize

__all__ = ["MergeError", "merge_runs", "run_in_use"]

SHARD_KEY = "shard"

#: summary.json keys that :func:`saerecover.stats.summarize` computes itself from the records.
_COMPUTED_SUMMARY_KEYS = frozenset({"task", "n_examples", "n_valid", "n_records", "modes", "intervals"})


class MergeError(RunDirectoryError):
    """The inputs cannot be merged: not shards of one finished run, or OUT is not free."""



def _shard_of(run: RunDirectory) -> tuple[int, int]:
    shard = run.config.get(SHARD_KEY)
    if not isinstance(shard, Mapping) or not {"index", "count"} <= set(shard):
        raise MergeError(
            f"{run.path} is not a shard: its config.json has no "
            f'"{SHARD_KEY}": {{"index": i, "count": n}} (written by `saerecover run --shard i/n`)'
        )
    index, count = shard["index"], shard["count"]
    if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise MergeError(f"{run.path}: invalid shard {dict(shard)} (need 0 <= index < count)")
    return index, count


def _check_finished(run: RunDirectory, records: list[dict]) -> dict[str, Any]:
    """The shard's summary; refuses a shard still being written or never summarized."""
    pid = run_in_use(run.path)
    if pid is not None:
        raise MergeError(f"{run.path} is still being written (locked by pid {pid}); wait for it to finish")
    if not (run.path / SUMMARY_FILE).is_file():
        raise MergeError(
            f"{run.path} is not a finished run: it has no {SUMMARY_FILE} (interrupted? resume it "
            "with the same `saerecover run ... --shard i/n --out DIR` first)"
        )
    summary = run.read_summary()
    n = summary.get("n_records")
    if isinstance(n, int) and n != len(records):
        raise MergeError(
            f"{run.path}: {SUMMARY_FILE} counts {n} records but {RECORDS_FILE} holds {len(records)}; "
            "the run was changed after it finished: resume it to re-summarize"
        )
    return summary


def _needs_tensors(rec: Mapping[str, Any]) -> bool:
    """Records of evaluated examples (valid, not failed, with an outcome) come with tensors."""
    return rec.get("valid") is True and rec.get("failed") is not True and rec.get("recovered") is not None


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise MergeError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            raise MergeError(f"{out} exists and is not empty; merge into a new directory")


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new directory ``parent/prefix<random>`` with ordinary permissions (0o777 less the
    umask, where ``tempfile.mkdtemp`` would make it private)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # pragma: no cover - 2**32 names
            continue


def _merged_summary(records: list[dict], shards: list[tuple[int, RunDirectory, dict]],
                    config: Mapping[str, Any]) -> dict[str, Any]:
    summaries = [s for _, _, s in shards]
    tasks = {s.get("task") for s in summaries}
    if len(tasks) != 1:
        raise MergeError(f"the shards' summaries name different tasks: {sorted(map(str, tasks))}")
    extra: dict[str, Any] = {}
    counts = [s.get("n_examples") for s in summaries]
    if all(isinstance(c, int) for c in counts):
        extra["n_examples"] = sum(counts)  # shard i ran examples i, i+n, ...: disjoint parts
    seconds = [s.get("seconds") for s in summaries]
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in seconds):
        extra["seconds"] = float(sum(seconds))  # total compute time, not wall time
    keys = set().union(*(set(s) for s in summaries)) - _COMPUTED_SUMMARY_KEYS - set(extra)
    for key in sorted(keys):
        values = [s.get(key) for s in summaries]
        if all(v == values[0] for v in values):
            extra[key] = values[0]
        else:
            warnings.warn(f"summary key {key!r} differs between shards; left out of the merged summary",
                          stacklevel=3)
    extra["merged_shards"] = len(shards)
    modes = config.get("modes")
    return summarize(records, task=str(summaries[0].get("task")),
                     modes=modes if isinstance(modes, list) else None, extra=extra)


def merge_runs(out: str | os.PathLike[str], run_dirs: Sequence[str | os.PathLike[str]], *,
               report: bool = True) -> Path:
    """Merge the shard run directories ``run_dirs`` into a new run directory ``out``.

    Checks that every input is a finished shard (summary.json written, not locked) of the same
    config apart from ``"shard"``, that the shard indices are distinct and complete (0..n-1)
    and that no (example_id, mode) appears twice. Writes into a temporary sibling of ``out``
    and renames it at the end, so a failed merge leaves nothing behind. ``out`` must not exist
    or be empty. Returns ``out``.
    """
    out = Path(out)
    if not run_dirs:
        raise MergeError("nothing to merge: give the shard run directories")
    paths = [Path(p) for p in run_dirs]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        dup = sorted({str(p) for p in paths if resolved.count(p.resolve()) > 1})
        raise MergeError(f"the same run directory is given twice: {', '.join(dup)}")
    if out.resolve() in resolved:
        raise MergeError(f"OUT {out} is one of the inputs")
    inside = [p for p, r in zip(paths, resolved) if out.resolve().is_relative_to(r)]
    if inside:
        raise MergeError(f"OUT {out} is inside the input {inside[0]}; merging would write into a shard: "
                         "choose an OUT outside every input")
    _prepare_out(out)

    shards: list[tuple[int, RunDirectory, dict]] = []
    shard_records: dict[int, list[dict]] = {}
    base_config: dict[str, Any] | None = None
    base_path: Path | None = None
    count: int | None = None
    by_index: dict[int, Path] = {}
    for p in paths:
        run = open_run(p)
        index, n = _shard_of(run)
        config = {k: v for k, v in run.config.items() if k != SHARD_KEY}
        if base_config is None:
            base_config, base_path, count = config, run.path, n
        else:
            if n != count:
                raise MergeError(f"{run.path} is shard {index}/{n} but {base_path} is one of {count} shards")
            diff = config_diff(base_config, config)
            if diff:
                raise MergeError(
                    f"{run.path} and {base_path} are not shards of one run; differing config key(s): "
                    f"{', '.join(k for k, _, _ in diff[:MAX_LISTED_DIFFERENCES])}\n" + describe_diff(diff, str(base_path), str(run.path))
                )
        if index in by_index:
            raise MergeError(f"shard {index}/{n} is given twice: {by_index[index]} and {run.path}")
        by_index[index] = run.path
        records = run.records()
        summary = _check_finished(run, records)
        shards.append((index, run, summary))
        shard_records[index] = records
    assert base_config is not None and count is not None
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise MergeError(
            f"incomplete shard set: {len(by_index)} of {count} shards given; missing shard(s) "
            + ", ".join(f"{i}/{count}" for i in missing)
        )
    shards.sort(key=lambda s: s[0])

    # every record once, grouped by mode (in the config's order) as an unsharded run writes them
    owner: dict[tuple[str, str], int] = {}
    for index, run, _ in shards:
        for rec in shard_records[index]:
            key = (rec["example_id"], rec["mode"])
            if key in owner:
                raise MergeError(
                    f"(example_id={key[0]!r}, mode={key[1]!r}) is in shard {owner[key]} "
                    f"({by_index[owner[key]]}) and in shard {index} ({run.path})"
                )
            owner[key] = index
            if _needs_tensors(rec) and not run.tensor_path(rec["mode"], rec["example_id"]).is_file():
                raise MergeError(f"{run.path}: no tensors for the evaluated record "
                                 f"(example_id={key[0]!r}, mode={key[1]!r})")
    modes = base_config.get("modes")
    order = {m: i for i, m in enumerate(modes)} if isinstance(modes, list) else {}
    merged: list[tuple[dict, RunDirectory]] = [
        (rec, run) for index, run, _ in shards for rec in shard_records[index]
    ]
    merged.sort(key=lambda rr: order.get(rr[0]["mode"], len(order)))  # stable: shard order kept

    config = dict(base_config)
    config["merged_from"] = [
        {"path": str(run.path.resolve()), "shard": index, "config_hash": run.meta.get("config_hash"),
         "created": run.meta.get("created")}
        for index, run, _ in shards
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(out.parent, f".{out.name}.merging-")
    try:
        with RunDirectory(tmp, config=config) as dst:
            for rec, src in merged:
                if src.tensor_path(rec["mode"], rec["example_id"]).is_file():
                    data = src.tensor_path(rec["mode"], rec["example_id"]).read_bytes()
                    atomic_write_bytes(dst.tensor_path(rec["mode"], rec["example_id"]), data, root=dst.path)
                dst.append_record(rec)
            dst.write_summary(_merged_summary([r for r, _ in merged], shards, config))
        (tmp / LOCK_FILE).unlink(missing_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above); a directory filled meanwhile makes this fail
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if report:
        write_report(out)
    return out
