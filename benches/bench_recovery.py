"""Throughput of batched recovery against one example at a time, on the same examples.

Runs the toy world's IOI setting (the demo's clamp), recovers the same valid flips once as
batches and once one example per call, and prints examples/s for both, their ratio, and the
share of step time spent in the projection (Rust core) for encoder mode.

    python benches/bench_recovery.py [--n 128] [--steps 50] [--batch-size 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import saerecover.core.projection as projection
import torch
from saerecover import toy
from saerecover.core.clamp import Clamp
from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.recovery import recover_batch
from saerecover.core.selection import select_by_attribution
from saerecover.experiments.pipeline import find_flips


class ProjectionTimer:
    """Wraps EncoderNull.__call__ (the Rust projections) to add up the time spent projecting."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._orig = projection.EncoderNull.__call__

    def __enter__(self) -> "ProjectionTimer":
        timer, orig = self, self._orig

        def timed(proj, x, mask):
            t = time.perf_counter()
            out = orig(proj, x, mask)
            timer.seconds += time.perf_counter() - t
            return out

        projection.EncoderNull.__call__ = timed
        return self

    def __exit__(self, *exc) -> None:
        projection.EncoderNull.__call__ = self._orig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128, help="IOI prompts (valid flips are a subset)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-single", type=int, default=32, help="examples timed one at a time")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    world = toy.load()
    opts = toy.DEMO_OPTIONS
    site = world.site(opts["hook"])
    task = world.ioi_task(n=args.n)
    ex = task.examples()
    features = select_by_attribution(world.model, site, task, ex, top_k=opts["top_k"])
    clamp = Clamp({site: features}, value=opts["clamp_value"], where=opts["clamp_where"])
    dm = DefendedModel(world.model, clamp)
    valid = torch.nonzero(find_flips(dm, task, ex).valid).flatten().tolist()[: args.max_single]
    if not valid:
        print("no valid flips: nothing to time")
        return 1
    sub = ex.select(valid)
    cfg = RecoveryConfig(steps=args.steps, lr=opts["lr"], budget=opts["budget"], history=False)
    rows = []
    print(f"{len(valid)} valid flips, {args.steps} steps, torch threads {torch.get_num_threads()}")
    print(f"{'mode':8} {'batched ex/s':>13} {'single ex/s':>12} {'ratio':>7} {'projection share':>17}")
    for mode in ("none", "encoder"):
        with ProjectionTimer() as timer:
            t = time.perf_counter()
            for start in range(0, len(sub), args.batch_size):
                recover_batch(dm, task, sub.select(list(range(start, min(start + args.batch_size, len(sub))))),
                              mode=mode, cfg=cfg)
            batched = time.perf_counter() - t
            share = timer.seconds / batched
        t = time.perf_counter()
        for i in range(len(sub)):
            recover_batch(dm, task, sub.select([i]), mode=mode, cfg=cfg)
        single = time.perf_counter() - t
        row = {"mode": mode, "n": len(sub), "steps": args.steps, "batched_s": batched, "single_s": single,
               "batched_ex_per_s": len(sub) / batched, "single_ex_per_s": len(sub) / single,
               "ratio": single / batched, "projection_share": share}
        rows.append(row)
        print(f"{mode:8} {row['batched_ex_per_s']:13.1f} {row['single_ex_per_s']:12.1f} "
              f"{row['ratio']:6.1f}x {100 * share:16.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
