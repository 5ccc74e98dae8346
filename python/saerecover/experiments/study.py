"""A study: the runs of one command (one run, or a sweep's or TPP's members) cut into units that an
executor runs anywhere, and the driver that plans, watches, resumes and merges them.

A unit is one shard ``i/n`` of one run's examples (``recover(..., shard=(i, n))``), written as an
ordinary run directory (the atomic, resumable contract of :mod:`saerecover.runs`), so a unit
whose worker is lost resumes from its records. A run cut into one unit writes its own directory;
a run cut into ``n > 1`` units is merged into it (:func:`~saerecover.experiments.merge.merge_runs`)
once every unit has finished. The driver keeps, next to the output ``OUT``::

    OUT.study/
      status.json                      the study's state, readable while it runs
      <run>/shard-<i>-of-<n>/          the run directory of each unit of a run cut in n > 1
      .lock                            held by the one driver running the study

A rerun of the same command (same ``OUT``) skips finished units and runs, resumes the others
and keeps each run's unit count, whatever ``units`` now says. A shared-delta run (one delta
optimised on all examples) is always one unit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import torch

from saerecover.experiments.merge import merge_runs
from saerecover.experiments.pipeline import Flips, RunPlan, RunResult, recover
from saerecover.progress import progress_bar
from saerecover.report.run import write_report
from saerecover.runs import (
    CONFIG_FILE,
    RECORDS_FILE,
    SUMMARY_FILE,
    VOLATILE_KEYS,
    RunDirectoryError,
    atomic_write_json,
    config_hash,
    open_run,
    run_in_use,
)

__all__ = ["STATUS_FILE", "STUDY_SUFFIX", "Study", "StudyError", "Unit", "run_unit", "study_dir"]

#: The study directory is ``OUT`` + this suffix, beside ``OUT``.
STUDY_SUFFIX = ".study"
STATUS_FILE = "status.json"
_LOCK = ".lock"
#: How long a unit may stay locked by a writer that is not ours (a worker of a killed driver that
#: has not died yet, a lost node still writing) before the study gives up, in seconds.
LOCK_WAIT_S = 300.0
#: Seconds between two writes of status.json (and two polls of the units' records).
STATUS_EVERY_S = 0.5
#: How long the driver waits to see a finished unit's summary.json (a shared file system may show
#: a file written on another node a little later), in seconds.
VISIBLE_WAIT_S = 30.0
_MERGED_FROM = "merged_from"


class StudyError(RunDirectoryError):
    """The study cannot go on: a unit failed for good, or OUT / the study directory is not this
    study's."""


def study_dir(out: str | os.PathLike[str]) -> Path:
    """The study directory of the output ``out``: ``OUT.study`` beside it."""
    out = Path(out)
    return out.with_name(out.name + STUDY_SUFFIX)


@dataclass(frozen=True)
class Unit:
    """One shard ``index/count`` of run ``run`` (a key of the world shipped to the workers),
    written to ``path``; ``total`` records when finished (examples x modes)."""

    run: str
    index: int
    count: int
    path: Path
    total: int
    report: bool = False

    @property
    def name(self) -> str:
        return f"{self.run}/shard-{self.index}-of-{self.count}" if self.count > 1 else self.run

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.index, self.count) if self.count > 1 else None


def run_unit(world: Mapping[str, Any], unit: Unit) -> dict[str, Any]:
    """Run ``unit`` in this process: ``recover`` on its shard, with the model, clamp, task and
    keywords the world holds for its run. What an executor's worker calls."""
    model, clamp, task, options = world[unit.run]
    t0 = time.perf_counter()
    recover(model, clamp, task, out=unit.path, shard=unit.shard, report=unit.report, progress=False, **options)
    return {"seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid()}


@dataclass
class _Run:
    """A run of the study: its plan, its key among the world's runs, and (after
    :meth:`Study.run`) its result."""

    key: str
    model: Any
    clamp: Any
    task: Any
    plan: RunPlan
    count: int = 0
    finished: bool = False  # OUT already holds the finished run
    result: RunResult | None = None
    units: list[Unit] = field(default_factory=list)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _one_line(err: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _stored_config(path: Path) -> dict[str, Any] | None:
    """config.json of the run directory ``path`` (None when there is none)."""
    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StudyError(f"cannot read {file}: {err}") from err


def _same_config(stored: Mapping[str, Any], expected: Mapping[str, Any], *, merged: bool = False) -> bool:
    plain = {k: v for k, v in stored.items() if k not in VOLATILE_KEYS and not (merged and k == _MERGED_FROM)}
    return config_hash(plain) == config_hash(expected)


def _is_finished(path: Path) -> bool:
    """A run directory whose summary is written, unlocked, with as many records as it counts."""
    if not (path / SUMMARY_FILE).is_file() or run_in_use(path) is not None:
        return False
    run = open_run(path)
    try:
        n = run.read_summary().get("n_records")
    except RunDirectoryError:
        return False
    return not isinstance(n, int) or n == len(run.records())


def _count_records(path: Path) -> int:
    try:
        return (path / RECORDS_FILE).read_bytes().count(b"\n")
    except OSError:
        return 0


def _discard(path: Path) -> None:
    """Empty ``path`` when it is a run directory (--overwrite); refuse anything else."""
    if not path.exists():
        return
    if not (path / CONFIG_FILE).is_file():
        if any(p for p in path.iterdir() if not p.name.startswith(".")):
            raise StudyError(f"{path} is not empty but holds no {CONFIG_FILE}: it is not a saerecover run "
                             "directory; choose a new --out (--overwrite only empties run directories)")
        return
    pid = run_in_use(path)
    if pid is not None:
        raise StudyError(f"{path} is in use by another process (pid {pid}); wait for it to finish")
    for p in path.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def flips_from_records(example_ids: Sequence[str], records: Sequence[Mapping[str, Any]]) -> Flips:
    """The base and defended behavior scores of ``example_ids`` (in this order) as the records
    of a run hold them (any mode: every mode's record carries both; null is NaN)."""
    scores: dict[str, tuple[float, float]] = {}
    for r in records:
        if r["example_id"] not in scores:
            base, defended = r.get("base_score"), r.get("defended_score")
            scores[r["example_id"]] = (math.nan if base is None else float(base),
                                       math.nan if defended is None else float(defended))
    missing = [e for e in example_ids if e not in scores]
    if missing:
        raise StudyError(f"the run's records lack example(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return Flips(base=torch.tensor([scores[e][0] for e in example_ids]),
                 defended=torch.tensor([scores[e][1] for e in example_ids]))


class Study:
    """The runs of one command, cut into units that ``executor`` runs; the driver's side.

    ``executor`` (a :class:`saerecover.experiments.executor.Executor`): where units run.
    ``root``: the study directory (:func:`study_dir` of the command's OUT). Register each run with
    ``recover(..., executor=study)`` (which checks its options and returns a handle), then call
    :meth:`run` with the handles: it runs every unit of every run, merges, and returns the
    :class:`~saerecover.experiments.pipeline.RunResult` of each handle.
    """

    def __init__(self, executor: Any, root: str | os.PathLike[str], *, progress: bool = True) -> None:
        self.executor = executor
        self.root = Path(root)
        self.progress = progress
        self._runs: list[_Run] = []
        self._lock_fd: int | None = None

    # ---- registering runs

    def recover(self, model: Any, clamp: Any, task: Any, plan: RunPlan) -> _Run:
        """Register the run ``plan`` (what ``recover(..., executor=study)`` hands over); returns
        its handle."""
        if any(r.plan.out.resolve() == plan.out.resolve() for r in self._runs):
            raise StudyError(f"two runs of the study write {plan.out}")
        key = plan.out.name
        if any(r.key == key for r in self._runs):
            key = f"{key}-{len(self._runs)}"
        run = _Run(key=key, model=model, clamp=clamp, task=task, plan=plan)
        self._runs.append(run)
        return run

    # ---- running

    def run(self, handles: Mapping[Any, _Run] | None = None) -> dict[Any, RunResult]:
        """Run every registered run; the result of each of ``handles`` (key -> handle)."""
        t0 = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        status: _Status | None = None  # none when every run finished earlier: status.json stays as it was
        try:
            pending = self._check_runs()
            if pending:
                status = _Status(self.root / STATUS_FILE, progress=self.progress)
                cuda = any(getattr(getattr(r.model, "device", None), "type", None) == "cuda" for r in pending)
                with self.executor.session(cuda=cuda) as session:
                    units = self._plan(pending, session.units)
                    status.start(self._runs, units, session.describe())
                    todo = [u for u in units if not status.done(u)]
                    if self.progress:
                        print(f"study {self.root}: {len(todo)} of {len(units)} units to run "
                              f"({session.describe()['kind']}); progress in {STATUS_FILE}", file=sys.stderr)
                    if todo:
                        world = {r.key: (r.model, r.clamp, r.task, r.plan.options) for r in pending}
                        session.run(world, run_unit, todo, status)
                status.state("merging")
            t_merge = time.perf_counter()
            for r in self._runs:
                if not r.finished:
                    self._finish(r)
            wall = time.perf_counter() - t0
            for r in self._runs:
                r.result = self._result(r, wall)
            if status is not None:
                status.info["merge_seconds"] = round(time.perf_counter() - t_merge, 3)
                status.state("done")
        except BaseException as err:
            if status is not None:
                status.state("failed", error=_one_line(err))
            raise
        finally:
            if status is not None:
                status.close()
            self._release_lock()
        return {k: h.result for k, h in (handles or {}).items()}  # type: ignore[misc]

    def _check_runs(self) -> list[_Run]:
        """The runs to do: OUT not yet holding the finished run (checked to be of this config).
        Empties OUT and the units of runs asked to overwrite. A run's unit count is kept from
        disk: 1 when OUT holds an unfinished run to resume, else that of its unit directories."""
        for r in self._runs:
            if r.plan.overwrite:
                _discard(r.plan.out)
                shutil.rmtree(self.root / r.key, ignore_errors=True)
        pending = []
        for r in self._runs:
            stored = _stored_config(r.plan.out)
            if stored is not None:
                if not _same_config(stored, r.plan.config, merged=_MERGED_FROM in stored):
                    raise StudyError(f"{r.plan.out} holds a run with another config; choose a new --out, or "
                                     "pass --overwrite to discard the old run")
                if _is_finished(r.plan.out):
                    r.finished = True
                    continue
                r.count = 1  # an unfinished run there (of one unit, or of a one-process run): resume it
            else:
                r.count = self._count_on_disk(r)
            pending.append(r)
        return pending

    def _plan(self, pending: Sequence[_Run], units: int) -> list[Unit]:
        """The units of the runs to do: a run's count from disk, else ``units`` shared among
        them (at most a run's examples)."""
        per_run = max(1, math.ceil(units / max(1, len(pending))))
        out: list[Unit] = []
        for r in pending:
            n = len(r.plan.example_ids)
            shared = bool(getattr(r.plan.options.get("config"), "shared_delta", False))
            r.count = r.count or (1 if shared else min(per_run, n))
            for i in range(r.count):
                path = r.plan.out if r.count == 1 else self.root / r.key / f"shard-{i}-of-{r.count}"
                total = len(range(i, n, r.count)) * len(r.plan.modes)
                unit = Unit(run=r.key, index=i, count=r.count, path=path, total=total,
                            report=r.plan.report and r.count == 1)
                self._check_unit(r, unit)
                r.units.append(unit)
                out.append(unit)
        return out

    def _count_on_disk(self, r: _Run) -> int:
        """The unit count of ``r``'s unit directories from an earlier driver (0: none)."""
        folder = self.root / r.key
        counts = {int(p.name.rsplit("-of-", 1)[1]) for p in folder.glob("shard-*-of-*")
                  if p.name.rsplit("-of-", 1)[1].isdigit()} if folder.is_dir() else set()
        if len(counts) > 1:
            raise StudyError(f"{folder} holds units of different counts ({sorted(counts)}); pass --overwrite")
        return counts.pop() if counts else 0

    def _check_unit(self, r: _Run, unit: Unit) -> None:
        if unit.count == 1:
            return
        stored = _stored_config(unit.path)
        expected = {**r.plan.config, "shard": {"index": unit.index, "count": unit.count}}
        if stored is not None and not _same_config(stored, expected):
            raise StudyError(f"{unit.path} holds a unit of another config; pass --overwrite to discard the study")

    def _finish(self, r: _Run) -> None:
        """Merge ``r``'s units into its OUT; add the task's summary fields; write its report."""
        if r.count == 1:
            return  # the unit wrote OUT itself, summary and report included
        merge_runs(r.plan.out, [u.path for u in r.units], report=False)
        extra = r.plan.options.get("summarize_extra")
        if extra is not None:
            run = open_run(r.plan.out)
            summary = run.read_summary()
            extra(summary, run.records())
            atomic_write_json(r.plan.out / SUMMARY_FILE, summary)
        if r.plan.report:
            write_report(r.plan.out)

    def _result(self, r: _Run, seconds: float) -> RunResult:
        run = open_run(r.plan.out)
        records = run.records()
        return RunResult(summary=run.read_summary(), records=records, path=r.plan.out,
                         flips=flips_from_records(r.plan.example_ids, records), seconds=seconds)

    # ---- the driver's lock

    def _acquire_lock(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StudyError(f"the study {self.root} is being run by another driver (pid {holder}); wait for it "
                             "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


class _Status:
    """The study's state as units start, finish and are retried: ``status.json`` (rewritten at
    most every :data:`STATUS_EVERY_S`) and one progress bar over the records of every unit.
    The events executors report (:class:`saerecover.experiments.executor.Events`)."""

    def __init__(self, path: Path, *, progress: bool) -> None:
        self.path = path
        self.show = progress
        self.units: dict[str, dict[str, Any]] = {}
        self.by_name: dict[str, Unit] = {}
        self.info: dict[str, Any] = {"state": "planning", "started": _now(), "driver_pid": os.getpid()}
        self.bar: Any = None
        self._written = 0.0
        self._locked_since: dict[str, float] = {}

    def start(self, runs: Sequence[_Run], units: Sequence[Unit], executor: Mapping[str, Any]) -> None:
        self.info.update(state="running", executor=dict(executor),
                         runs=[{"out": str(r.plan.out), "units": r.count, "finished": r.finished} for r in runs])
        for u in units:
            done = u.count > 1 and (u.path / CONFIG_FILE).is_file() and _is_finished(u.path)
            self.by_name[u.name] = u
            self.units[u.name] = {"path": str(u.path), "state": "done" if done else "pending",
                                  "records": u.total if done else _count_records(u.path), "total": u.total,
                                  "attempts": 0, "earlier": done}
        total = sum(u.total for u in units)
        self.bar = progress_bar(total, "study", enabled=self.show and bool(units), unit="record")
        self.tick(force=True)

    def done(self, unit: Unit) -> bool:
        return self.units[unit.name]["state"] == "done"

    # ---- events from the executor

    def ready(self, unit: Unit) -> bool:
        """Whether ``unit`` may start now: no other process holds its run directory. Raises
        StudyError once one has held it for :data:`LOCK_WAIT_S`."""
        pid = run_in_use(unit.path) if unit.path.is_dir() else None
        if pid is None:
            self._locked_since.pop(unit.name, None)
            return True
        since = self._locked_since.setdefault(unit.name, time.monotonic())
        self.units[unit.name].update(state="waiting", waiting_for_pid=pid)
        if time.monotonic() - since > LOCK_WAIT_S:
            raise StudyError(f"{unit.path} has been held by another process (pid {pid}) for {LOCK_WAIT_S:.0f} s; "
                             "stop it, or wait and rerun")
        return False

    def dispatched(self, unit: Unit, worker: str | None = None) -> None:
        u = self.units[unit.name]
        u.pop("waiting_for_pid", None)
        u.update(state="running", attempts=u["attempts"] + 1, started=_now(), worker=worker)

    def retrying(self, unit: Unit, reason: str) -> None:
        u = self.units[unit.name]
        u.update(state="pending", last_error=reason)
        u.setdefault("lost", []).append({"at": _now(), "error": reason})

    def finished(self, unit: Unit, info: Mapping[str, Any]) -> None:
        """``unit`` finished where it ran; its run directory must be visible here (StudyError
        otherwise: the worker wrote to a disk the driver does not see)."""
        deadline = time.monotonic() + VISIBLE_WAIT_S
        while not (unit.path / SUMMARY_FILE).is_file():
            if time.monotonic() > deadline:
                raise StudyError(f"unit {unit.name} finished on host {info.get('host', '?')} but its run directory "
                                 f"{unit.path} is not visible to the driver: --out must be on a file system that "
                                 "every node of the cluster shares (docs/clusters.md)")
            time.sleep(0.5)
        self.units[unit.name].update(state="done", records=unit.total, finished=_now(), **dict(info))
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        """Count the running units' records; update the bar and status.json (not more often than
        every STATUS_EVERY_S unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._written < STATUS_EVERY_S:
            return
        self._written = now
        for name, u in self.units.items():
            if u["state"] in ("running", "pending", "waiting"):
                u["records"] = _count_records(self.by_name[name].path)
        self._write()

    def state(self, state: str, error: str | None = None) -> None:
        self.info["state"] = state
        if error is not None:
            self.info["error"] = error
        self._write()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _write(self) -> None:
        done = sum(u["records"] for u in self.units.values())
        total = sum(u["total"] for u in self.units.values())
        states = [u["state"] for u in self.units.values()]
        counts = {s: states.count(s) for s in ("pending", "waiting", "running", "done")}
        if self.bar is not None:
            self.bar.n = min(done, total)
            self.bar.set_postfix_str(f"units {counts['done']}/{len(states)} done, {counts['running']} running",
                                     refresh=False)
            self.bar.refresh()
        atomic_write_json(self.path, {**self.info, "updated": _now(),
                                      "records": {"done": done, "total": total},
                                      "units_by_state": counts, "units": self.units})
