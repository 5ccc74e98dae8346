#!/usr/bin/env python3
"""Per-step cost of the exact Jacobian projection against the randomized sketch.

On the toy world's refusal setting (features by contrast at two sites, the mean-activation
clamp, delta on every prompt row of the first site), one recovery step is timed from the same
forward pass in each mode:

- common: forward with clamp + delta, loss, gradient (what every mode pays);
- jacobian: the exact J as the engine builds it (``projection.packed_jacobians`` with
  ``row_local``: the first site's rows from one VJP per feature through the encoder alone, the
  later site's from one VJP per non-zero defended coordinate, packed across examples, batched
  with ``is_grads_batched``) and the null-space solve per example
  (``linalg.jacobian_null_project``, the Rust core on CPU);
- vjp: the same J with every row from a VJP through the model (the route before the first
  site's rows came from the encoder); ``--shared`` also times the unpacked variant (one VJP per
  coordinate of Phi, shared by all examples);
- sketch: VJPs of a drift probe + ``--probes`` random probes, Gram-Schmidt, projection.

Prints the median ms per step of the VJPs, of the solve and of the whole step, and the ratios.

    python benches/bench_jacobian.py [--n 8] [--repeats 7] [--probes 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

try:
    import saerecover  # noqa: F401
except ImportError:  # run from a source tree without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch
from saerecover import linalg, toy
from saerecover.core.defended import DefendedModel
from saerecover.core.projection import (
    batched_vjp_jacobian,
    defended_feature_parts,
    defended_features,
    example_jacobians,
    flatten_example,
    packed_jacobians,
    project_out_basis,
    sketch_basis,
)
from saerecover.core.projection.sketch import random_probes
from saerecover.core.recovery import RECTIFIED_ARCHITECTURES
from saerecover.experiments.pipeline import find_flips
from saerecover.experiments.refusal import DEFAULT_TOY_SITES, toy_setting


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="examples in the batch (valid flips first, then others)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--probes", type=int, default=4, help="random probes of the sketch")
    p.add_argument("--top-k", type=int, default=16, help="clamped features per site")
    p.add_argument("--sites", default=",".join(DEFAULT_TOY_SITES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--shared", action="store_true", help="also time one VJP per Phi coordinate shared by all examples")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    world = toy.load(device=args.device)
    setting = toy_setting(world, n=max(args.n, 24), sites=args.sites.split(","), top_k=args.top_k)
    task, clamp = setting.task, setting.clamp
    dm = DefendedModel(world.model, clamp)
    ex = task.examples()
    valid = torch.nonzero(find_flips(dm, task, ex).valid).flatten().tolist()
    order = valid + [i for i in range(len(ex)) if i not in valid]
    ex = ex.select(order[: args.n]).to(world.model.device)
    dev = world.model.device
    n, seq = ex.input_ids.shape
    site_order = {s: i for i, s in enumerate(world.model.site_names())}
    sites = [clamp.site_clamps[0].site.hook_name]
    phi_sites = sorted((sc.site.hook_name for sc in clamp.site_clamps), key=site_order.__getitem__)
    mask = ex.position_mask("prompt")
    pos = torch.arange(seq, device=dev).expand(n, seq)
    first = torch.where(mask, pos, seq).min(dim=1).values
    phi_mask = ex.attention_mask.bool() & (pos >= first.unsqueeze(1))
    coords = torch.nonzero(torch.cat([phi_mask.any(0).repeat_interleave(clamp.at(s).features.numel())
                                      for s in phi_sites])).flatten()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        phi_ref = defended_features(clamp, dm.forward(ex, track=tuple(phi_sites)).sites, phi_sites, phi_mask)
    deltas = {s: (0.01 * torch.randn(n, seq, world.model.d_model, generator=gen)).to(dev).mul_(mask.unsqueeze(-1))
              .requires_grad_(True) for s in sites}

    rectified = [clamp.at(s).site.architecture in RECTIFIED_ARCHITECTURES for s in phi_sites]
    sizes: dict[str, list[int]] = {}

    def step(mode: str) -> tuple[float, float, float]:
        _sync(dev)
        t0 = time.perf_counter()
        out = dm.forward(ex, deltas, track=tuple(phi_sites))
        loss = task.loss(out.logits, ex).sum()
        parts = defended_feature_parts(clamp, out.sites, phi_sites, phi_mask)
        phi = torch.cat(parts, dim=1)
        grads = dict(zip(sites, torch.autograd.grad(loss, list(deltas.values()), retain_graph=True)))
        _sync(dev)
        t1 = time.perf_counter()
        if mode == "sketch":
            probes = random_probes(phi_mask, [clamp.at(s).features.numel() for s in phi_sites], list(ex.ids), seed=0,
                                   step=0, probes=args.probes)
            bases = sketch_basis(phi, phi_ref, deltas, mask, probes=probes, drift_probe=True)
            t2 = time.perf_counter()
            for b in range(n):
                project_out_basis(flatten_example(grads, b, mask), bases[b])
        else:
            if mode == "jacobian":
                jacs = packed_jacobians(parts, deltas, mask, rectified, phi_mask=phi_mask,
                                        row_local=[s == sites[0] for s in phi_sites])
            elif mode == "vjp":
                jacs = packed_jacobians(parts, deltas, mask, rectified, phi_mask=phi_mask)
            else:  # "shared": one VJP per coordinate of Phi, the same coordinate for every example
                jacs = example_jacobians(batched_vjp_jacobian(phi, deltas, coords), mask)
            sizes[mode] = [int(j.shape[0]) for j in jacs]
            _sync(dev)
            t2 = time.perf_counter()
            for b in range(n):
                linalg.jacobian_null_project(jacs[b], flatten_example(grads, b, mask))
        _sync(dev)
        t3 = time.perf_counter()
        return (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t3 - t0) * 1e3

    rows = {}
    for mode in ("jacobian", "vjp", "sketch") + (("shared",) if args.shared else ()):
        step(mode)  # warm-up
        times = [step(mode) for _ in range(args.repeats)]
        rows[mode] = {"vjp_ms": statistics.median(t[0] for t in times),
                      "solve_ms": statistics.median(t[1] for t in times),
                      "projection_ms": statistics.median(t[0] + t[1] for t in times),
                      "step_ms": statistics.median(t[2] for t in times)}
        if mode in sizes:
            rows[mode]["jacobian_rows_mean"] = sum(sizes[mode]) / len(sizes[mode])
    m = int(coords.numel())
    rows_per_ex = int(mask.sum(1).float().mean())
    info = {"examples": n, "seq": seq, "prompt_rows_mean": rows_per_ex, "d_model": world.model.d_model,
            "phi_coordinates": m, "delta_dim_mean": rows_per_ex * world.model.d_model, "probes": args.probes,
            "device": str(dev), "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
            "sites": phi_sites, "valid_in_batch": min(len(valid), n)}
    print(f"toy refusal setting: {n} examples x {seq} tokens, Phi has {m} coordinates "
          f"({len(phi_sites)} sites x {args.top_k} features x rows), delta {rows_per_ex} rows x "
          f"{world.model.d_model}; {dev}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'mode':9} {'J rows/example':>14} {'VJPs ms':>9} {'solve ms':>9} {'projection ms':>14} "
          f"{'whole step ms':>14}")
    for mode, r in rows.items():
        jr = f"{r['jacobian_rows_mean']:.0f}" if "jacobian_rows_mean" in r else f"{args.probes + 1} probes"
        print(f"{mode:9} {jr:>14} {r['vjp_ms']:9.1f} {r['solve_ms']:9.1f} {r['projection_ms']:14.1f} "
              f"{r['step_ms']:14.1f}")
    ratio_proj = rows["jacobian"]["projection_ms"] / rows["sketch"]["projection_ms"]
    ratio_step = rows["jacobian"]["step_ms"] / rows["sketch"]["step_ms"]
    print(f"ratio jacobian / sketch: projection {ratio_proj:.1f}x, whole step {ratio_step:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "modes": rows, "ratio_projection": ratio_proj,
                                               "ratio_step": ratio_step}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
