"""Where a recovery step's time goes, and the memory it peaks at.

:class:`StageClock` wraps, for the duration of a ``with`` block, the functions that make up a
step (the defended forward pass, J's construction, the projection mode's two calls, the
optimizer's step) with timers; the engine's ``on_step`` callback marks the end of each step,
and the backward pass is what is left of the step (the loss gradient, and the little glue).
:class:`PeakMemory` samples the process's resident set (CPU) or reads CUDA's peak.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

#: The stages of a step, in the order the table prints them.
STAGES = ("forward", "backward", "jacobian", "projection", "optimizer")


class StageClock:
    """Per-step seconds by stage while active; ``steps`` holds one dict per completed step
    (plus ``total``), the first ``skip`` steps left out (warm-up)."""

    def __init__(self, device: torch.device, skip: int = 1) -> None:
        from saerecover.core.defended import DefendedModel
        from saerecover.core.projection import PROJECTIONS, ProjectionMode, jacobian, position_blocks, sketch

        self.device = device
        self.skip = skip
        self.steps: list[dict[str, float]] = []
        self._acc = dict.fromkeys(("forward", "jacobian", "mode", "optimizer"), 0.0)
        self._running: set[str] = set()
        self._mark = 0.0
        self._seen = 0
        targets: list[tuple[Any, str, str]] = [(DefendedModel, "forward", "forward"),
                                               (torch.optim.Adam, "step", "optimizer"),
                                               (torch.optim.SGD, "step", "optimizer"),
                                               (jacobian, "packed_jacobians", "jacobian"),
                                               (jacobian, "same_site_gradients", "jacobian"),
                                               (position_blocks.PositionBlocks, "__init__", "jacobian"),
                                               (sketch, "sketch_basis", "jacobian")]
        for cls in dict.fromkeys([ProjectionMode, *PROJECTIONS.values()]):
            targets += [(cls, name, "mode") for name in ("project_gradient", "take_step") if name in cls.__dict__]
        self._targets = targets
        self._saved: list[tuple[Any, str, Any]] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _wrap(self, fn: Callable, stage: str) -> Callable:
        clock = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if stage in clock._running:  # a call inside a timed call of the same stage counts once
                return fn(*args, **kwargs)
            clock._sync()
            clock._running.add(stage)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock._sync()
                clock._acc[stage] += time.perf_counter() - start
                clock._running.discard(stage)

        return timed

    def __enter__(self) -> "StageClock":
        for owner, name, stage in self._targets:
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._wrap(original, stage))
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def start(self) -> None:
        """Begin the next recovery run: the time until its first step's end is not a step."""
        self._sync()
        self._mark = time.perf_counter()
        self._seen = 0
        self._acc = dict.fromkeys(self._acc, 0.0)

    def on_step(self, *_: Any) -> None:
        """The engine's ``on_step``: one step has ended."""
        self._sync()
        now = time.perf_counter()
        total = now - self._mark
        acc = self._acc
        if self._seen >= self.skip:
            mode_only = acc["mode"] - acc["jacobian"]
            self.steps.append({"total": total, "forward": acc["forward"], "jacobian": acc["jacobian"],
                               "projection": mode_only, "optimizer": acc["optimizer"],
                               "backward": total - acc["forward"] - acc["mode"] - acc["optimizer"]})
        self._seen += 1
        self._acc = dict.fromkeys(acc, 0.0)
        self._mark = time.perf_counter()

    def mean(self) -> dict[str, float]:
        """Mean seconds per step by stage (and ``total``) over the recorded steps."""
        if not self.steps:
            return {}
        return {k: sum(s[k] for s in self.steps) / len(self.steps) for k in self.steps[0]}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory inside a ``with`` block: CUDA's max allocated, or on CPU the resident set
    sampled every ``interval`` seconds (``peak`` in bytes; ``base`` the resident set at the
    start, e.g. the model's weights)."""

    def __init__(self, device: torch.device, interval: float = 0.01) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
