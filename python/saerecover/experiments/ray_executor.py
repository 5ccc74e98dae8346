"""The Ray executor: the units of a study on the workers (actors) of a local Ray instance or of
an existing cluster. Ray is an optional dependency (``pip install 'saerecover[ray]'``), imported
when a session starts.

The world (every run's model, clamp, task and options) goes into Ray's object store once; each
worker deserializes it on its first unit and keeps it, so the model and SAEs load once per
worker, not once per unit. A worker lost mid-unit (killed, out of memory, its node gone) is
restarted by Ray and the unit goes back to the queue: it resumes from the records its run
directory already holds. A unit that raises fails the study with that error.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from saerecover.experiments.executor import Events, Executor, Session, Work, check_count
from saerecover.experiments.study import StudyError, Unit

__all__ = ["RAY_EXTRA", "RayExecutor", "RayMissingError", "check_address", "import_ray"]

#: How to install what this module needs.
RAY_EXTRA = "pip install 'saerecover[ray]'"
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d+$")
#: How long a study waits for a lost worker to come back (Ray restarts it) when no other worker is
#: left, in seconds.
WORKER_WAIT_S = 600.0


class RayMissingError(ImportError):
    """Ray is not installed."""


def import_ray() -> Any:
    """The ``ray`` module, or RayMissingError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise RayMissingError(f"running on Ray needs the optional dependency ray: {RAY_EXTRA}") from None
    return ray


def check_address(address: str | None) -> str | None:
    """A Ray address: None or "local" (a local instance started here, None), "auto" (the cluster
    this machine belongs to), ``ray://HOST:PORT`` (Ray Client) or ``HOST:PORT`` (a cluster's GCS)."""
    if address is None or address == "local":
        return None
    if not isinstance(address, str) or not (address == "auto" or address.startswith("ray://")
                                            or _HOST_PORT.match(address)):
        raise ValueError(f"Ray address {address!r}: give nothing (a local instance), 'auto', "
                         "'ray://HOST:PORT' or 'HOST:PORT'")
    return address


class RayExecutor(Executor):
    """Run a study's units on Ray.

    address: None for a local instance (started here and stopped at the end), "auto", or the
    cluster's ``ray://HOST:PORT`` / ``HOST:PORT``; when this process is already connected
    (``ray.init`` was called), that connection is used as it is. workers: how many actors
    (default: as many as the cluster's GPUs, or CPUs, fit). units: how many units a study makes
    (default: one per worker). gpus_per_worker: default 1 when the study's model is on CUDA, else
    0 (CPU workers). cpus_per_worker: default 1. max_retries: how often one unit may lose its
    worker before the study gives up. init: more keywords for ``ray.init`` (local instance:
    ``num_cpus``, ``object_store_memory``, ...).
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None, units: int | None = None,
                 gpus_per_worker: float | None = None, cpus_per_worker: float | None = None, max_retries: int = 3,
                 init: Mapping[str, Any] | None = None) -> None:
        self.address = check_address(address)
        self.workers = check_count(workers, "workers")
        self.units = check_count(units, "units")
        self.gpus_per_worker = check_count(gpus_per_worker, "gpus_per_worker", minimum=0, integer=False)
        self.cpus_per_worker = check_count(cpus_per_worker, "cpus_per_worker", minimum=0, integer=False)
        self.max_retries = check_count(max_retries, "max_retries", minimum=0)
        self.init = dict(init or {})
        self._actors: list[Any] = []  # kept between sessions while this process stays connected
        self._actor_resources: tuple[float, float] | None = None
        import_ray()  # missing: fail now, before anything loads

    @contextlib.contextmanager
    def session(self, *, cuda: bool = False) -> Iterator[Session]:
        ray = import_ray()
        own = not ray.is_initialized()
        if own:
            # the workers' output stays in Ray's logs: warnings reach the run's summary.json, errors the driver
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.WARNING, **self.init}
            if self.address is not None:
                kwargs["address"] = self.address
            ray.init(**kwargs)
        try:
            yield _RaySession(ray, self, cuda=cuda, local=own and self.address is None)
        finally:
            if own:
                self._actors = []
                ray.shutdown()

    def actors(self, n: int, *, cpus: float, gpus: float) -> list[Any]:
        """``n`` workers of these resources: the ones kept from an earlier session of this
        process (their modules already imported), and new ones."""
        ray = import_ray()
        if self._actor_resources != (cpus, gpus):
            self.close()
            self._actor_resources = (cpus, gpus)
        actor = ray.remote(_Worker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=0)
        while len(self._actors) < n:
            self._actors.append(actor.remote())
        return self._actors[:n]

    def close(self) -> None:
        """Stop the workers kept between sessions (they also stop with this process)."""
        actors, self._actors = self._actors, []
        if actors:
            ray = import_ray()
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)


class _Worker:
    """A Ray actor: deserializes the world on its first unit, then runs units."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._world: Any = None

    def ping(self) -> int:
        return os.getpid()

    def run(self, box: list[Any], work: Work, unit: Unit) -> Mapping[str, Any]:
        """``work(world, unit)``; what it returns, plus ``world_load_seconds`` on the unit that
        brought the world (models, SAEs) into this worker (null on the others)."""
        ref = box[0]  # in a list: Ray passes the reference, not the value, so it loads once here
        load_seconds = None
        if self._key != ref.hex():
            import ray

            t0 = time.perf_counter()
            self._world, self._key = ray.get(ref), ref.hex()
            load_seconds = round(time.perf_counter() - t0, 3)
        return {**work(self._world, unit), "world_load_seconds": load_seconds}


class _RaySession:
    def __init__(self, ray: Any, ex: RayExecutor, *, cuda: bool, local: bool) -> None:
        self.ray = ray
        self.ex = ex
        self.resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        self.gpus = ex.gpus_per_worker if ex.gpus_per_worker is not None else (1 if cuda else 0)
        self.cpus = ex.cpus_per_worker if ex.cpus_per_worker is not None else 1
        kind, need = ("GPU", self.gpus) if self.gpus > 0 else ("CPU", self.cpus)
        fit = int(self.resources.get(kind, 0) // need) if need > 0 else 0
        self.workers = ex.workers or max(1, fit)
        if self.workers > fit:
            msg = (f"{self.workers} Ray worker(s) of {need:g} {kind} need {self.workers * need:g} {kind}s; the "
                   f"cluster has {self.resources.get(kind, 0):g}")
            if local and fit == 0:
                raise ValueError(msg + (": pass --gpus-per-worker 0 for CPU workers" if kind == "GPU" else ""))
            warnings.warn(msg + ": some workers wait until the cluster has room", stacklevel=2)
        self.units = ex.units or self.workers

    def describe(self) -> dict[str, Any]:
        return {"kind": "ray", "address": self.ex.address or "local", "workers": self.workers,
                "gpus_per_worker": self.gpus, "cpus_per_worker": self.cpus, "cluster": self.resources}

    def run(self, world: Mapping[str, Any], work: Work, units: Sequence[Unit], events: Events) -> None:
        """Hand each idle worker the next unit that is ready. A unit whose worker is lost goes back
        to the front of the queue; the worker gets no unit until it answers a ping (Ray restarts
        it; a call while it restarts fails at once)."""
        ray = self.ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)
        box = [ray.put(world)]
        actors = self.ex.actors(min(self.workers, len(units)), cpus=self.cpus, gpus=self.gpus)
        idle = list(range(len(actors)))
        queue = collections.deque(units)
        inflight: dict[Any, tuple[Unit, int]] = {}
        pings: dict[Any, int] = {}  # workers that lost a unit, until they answer
        asleep: dict[int, float] = {}  # workers still restarting: ping again at this time
        losses: collections.Counter[str] = collections.Counter()
        no_worker_since: float | None = None
        try:
            while queue or inflight:
                now = time.monotonic()
                for k in [k for k, at in asleep.items() if at <= now]:
                    del asleep[k]
                    pings[actors[k].ping.remote()] = k
                for _ in range(len(queue)):
                    if not idle:
                        break
                    unit = queue.popleft()
                    if not events.ready(unit):
                        queue.append(unit)
                        continue
                    k = idle.pop(0)
                    inflight[actors[k].run.remote(box, work, unit)] = (unit, k)
                    events.dispatched(unit, worker=f"ray-worker-{k}")
                no_worker_since = None if idle or inflight else (no_worker_since or now)
                if no_worker_since is not None and now - no_worker_since > WORKER_WAIT_S:
                    raise StudyError(f"no Ray worker has come back for {WORKER_WAIT_S:.0f} s after losing its unit")
                waiting = [*inflight, *pings]
                if not waiting:  # units wait for a lock, or workers for their restart
                    events.tick()
                    time.sleep(0.5)
                    continue
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
                for ref in ready:
                    if ref in pings:
                        k = pings.pop(ref)
                        try:
                            ray.get(ref)
                            idle.append(k)
                        except lost:
                            asleep[k] = time.monotonic() + 1.0
                        continue
                    unit, k = inflight.pop(ref)
                    try:
                        info = ray.get(ref)
                    except lost as err:
                        losses[unit.name] += 1
                        reason = _first_line(err)
                        if losses[unit.name] > self.ex.max_retries:
                            raise StudyError(f"unit {unit.name} lost its worker {losses[unit.name]} times; "
                                             f"giving up ({reason})") from err
                        events.retrying(unit, reason)
                        queue.appendleft(unit)
                        pings[actors[k].ping.remote()] = k
                        continue
                    except ray.exceptions.RayTaskError as err:
                        cause = getattr(err, "cause", None)
                        if isinstance(cause, Exception):
                            raise cause from err
                        raise
                    idle.append(k)
                    events.finished(unit, info)
                events.tick()
        except BaseException:
            self.ex.close()  # units still running on them stop with them
            raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__
