"""Executors: where the units of a study run (:mod:`saerecover.experiments.study`).

An executor opens a :class:`Session` (connects, sizes its workers) and runs ``work(world, unit)``
for every unit, where ``world`` (the models, clamps, tasks and options of the study's runs) is
built once per worker, not once per unit, and reports to the study's :class:`Events`. Pass one
to ``recover(..., executor=...)``, the sweeps or the TPP and unlearning runners:

- :class:`LocalExecutor`: every unit in this process, one after the other (the study protocol
  without a cluster: units, resume, merge);
- :class:`saerecover.experiments.ray_executor.RayExecutor`: units on the workers (actors) of a
  local Ray instance or a cluster, retried when a worker is lost.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from saerecover.experiments.pipeline import RunPlan, RunResult
from saerecover.experiments.study import Study, Unit, study_dir

__all__ = ["Events", "Executor", "LocalExecutor", "Session", "check_count"]

Work = Callable[[Mapping[str, Any], Unit], Mapping[str, Any]]


class Events(Protocol):
    """What a session reports while it runs units (the study keeps status.json from it)."""

    def ready(self, unit: Unit) -> bool:
        """Whether ``unit`` may start now (no other process writes its directory)."""
        ...

    def dispatched(self, unit: Unit, worker: str | None = None) -> None: ...

    def retrying(self, unit: Unit, reason: str) -> None:
        """``unit`` lost its worker and goes back to the queue; it resumes from its records."""
        ...

    def finished(self, unit: Unit, info: Mapping[str, Any]) -> None: ...

    def tick(self) -> None:
        """Called often while units run: progress and status.json."""
        ...


class Session(Protocol):
    """An executor connected and sized: ``units`` is the default number of units of a study."""

    units: int

    def describe(self) -> dict[str, Any]:
        """What status.json shows of the executor (kind, address, workers, resources)."""
        ...

    def run(self, world: Mapping[str, Any], work: Work, units: Sequence[Unit], events: Events) -> None:
        """Run ``work(world, unit)`` for every unit; returns when all have finished, raises when
        one fails for good."""
        ...


def check_count(value: Any, what: str, *, minimum: float = 1, integer: bool = True) -> Any:
    """``value`` (None allowed) as an integer (or a number) >= ``minimum``; ValueError naming ``what``."""
    if value is None:
        return None
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= minimum or value == float("inf"):
        raise ValueError(f"{what} must be {'an integer' if integer else 'a number'} >= {minimum:g}, got {value!r}")
    return value


class Executor:
    """Base of the executors: ``recover(..., executor=ex)`` runs one run as a study."""

    def session(self, *, cuda: bool = False) -> contextlib.AbstractContextManager[Session]:
        """Connect and size the workers (``cuda``: the study's model is on CUDA)."""
        raise NotImplementedError

    def recover(self, model: Any, clamp: Any, task: Any, plan: RunPlan) -> RunResult:
        """Run the checked ``recover`` call ``plan`` as a study of one run, in ``plan.out``."""
        study = Study(self, study_dir(plan.out), progress=plan.progress)
        handle = study.recover(model, clamp, task, plan)
        return study.run({0: handle})[0]


class LocalExecutor(Executor):
    """Every unit in this process, one after the other, the world used as it is.

    units: how many units a study makes (shards of the examples, shared among its runs); default 1.
    """

    def __init__(self, units: int | None = None) -> None:
        self.units = check_count(units, "units") or 1

    @contextlib.contextmanager
    def session(self, *, cuda: bool = False) -> Iterator[Session]:
        yield _LocalSession(self.units)


class _LocalSession:
    def __init__(self, units: int) -> None:
        self.units = units

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "workers": 1}

    def run(self, world: Mapping[str, Any], work: Work, units: Sequence[Unit], events: Events) -> None:
        queue = list(units)
        while queue:
            unit = next((u for u in queue if events.ready(u)), None)
            if unit is None:
                events.tick()
                time.sleep(0.5)
                continue
            queue.remove(unit)
            events.dispatched(unit, worker="local")
            events.finished(unit, work(world, unit))
