"""Timing: adaptive repetitions within a time budget, implementations interleaved so that drift
in the machine's speed hits them alike, and the GEMM peak the results are compared with."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from saerecover.bench.projection.options import SLOW_CALL_S, Config


def time_calls(fn: Callable[[], Any], budget: float, min_repeats: int, max_repeats: int) -> list[float]:
    """Wall-clock seconds of repeated calls: at least `min_repeats`, then until `budget` is spent."""
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if len(times) >= max_repeats:
                break
            if len(times) >= min_repeats and t1 - start >= budget:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def time_interleaved(impls: list[Any], first_call: dict[str, float], cfg: "Config") -> dict[str, list[float]]:
    """Per-call seconds of each implementation, timed in `cfg.rounds` interleaved rounds.

    Each round gives every implementation `budget / rounds` seconds (order reversed every other
    round), so that a burst of load from elsewhere, or a library's threads still spinning, hits
    all implementations alike rather than one. Before each block: `cfg.settle` seconds of sleep
    and, for calls under 10 ms, one untimed call. An implementation whose calls take longer than
    a round's share stops once it has `min_repeats` calls. A call of a second or more is its own
    warm-up: its verification call counts as the first sample.
    """
    rounds = max(1, cfg.rounds)
    share = cfg.budget / rounds
    per_round_max = max(1, math.ceil(cfg.max_repeats / rounds))
    samples = {impl.name: ([first_call[impl.name]] if first_call[impl.name] >= SLOW_CALL_S else []) for impl in impls}
    for rnd in range(rounds):
        order = impls if rnd % 2 == 0 else impls[::-1]
        for impl in order:
            got = samples[impl.name]
            left = rounds - rnd
            need = max(0, math.ceil((cfg.min_repeats - len(got)) / left))
            slow = first_call[impl.name] >= share
            room = min(per_round_max, cfg.max_repeats - len(got))
            if (slow and need == 0) or room <= 0:
                continue
            if cfg.settle > 0:
                time.sleep(cfg.settle)  # let the previous library's spinning worker threads park
            if first_call[impl.name] < 0.01:
                impl.call()
            got += time_calls(impl.call, share, min(max(need, 1), room), room)
    return samples


def measure_peak(size: int, budget: float) -> dict[str, Any]:
    """Best GEMM rate (GFLOP/s) of NumPy and torch at float32 and float64 for a square `size` GEMM."""
    import torch

    rng = np.random.default_rng(12345)
    out: dict[str, Any] = {"size": size}
    flops = 2.0 * size**3
    for dtype in ("float32", "float64"):
        a = rng.standard_normal((size, size)).astype(dtype)
        b = rng.standard_normal((size, size)).astype(dtype)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        a @ b, ta @ tb  # warm up
        t_np = min(time_calls(lambda: a @ b, budget, 3, 50))
        t_torch = min(time_calls(lambda: ta @ tb, budget, 3, 50))
        rates = {"numpy": flops / t_np / 1e9, "torch": flops / t_torch / 1e9}
        out[dtype] = {**rates, "best": max(rates.values())}
    return out
