"""Recovery benchmark: what a recovery step costs at real shapes, per projection mode.

Builds a real architecture from its config with random weights (no download), a random SAE of
the real width at a realistic layer, a clamp of tens of features that fire at a realistic
rate and IOI-length prompts (``saerecover.bench.recovery.shapes``); then, per mode (none,
encoder, sketch, jacobian), times a batched recovery step split into forward, backward, J's
construction, projection and optimizer, its peak memory, and the same recovery one example
at a time (``saerecover.bench.recovery.run``). Wired into the CLI as ``saerecover bench
recovery`` via ``add_arguments`` and ``run_from_args``. docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_arguments", "config_from_args", "main", "run_from_args"]

_SHAPES = ("toy", "pythia-70m", "gpt2-small", "gemma-2-2b")
_MODES = ("none", "encoder", "sketch", "jacobian")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the recovery benchmark's options to ``parser``."""
    parser.add_argument("--shape", choices=_SHAPES, default="gpt2-small", help="model + SAE shape (default gpt2-small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", help="model weights: float32, bfloat16, float16 (default float32)")
    parser.add_argument("--modes", default=",".join(_MODES), help=f"comma-separated (default {','.join(_MODES)})")
    parser.add_argument("--n", type=int, help="prompts in the batch (default: the shape's, 16 for gpt2-small)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument("--single", type=int, help="examples also run one at a time (default min(n, 4); 0: none)")
    parser.add_argument("--features", type=int, default=32, help="clamped features (default 32)")
    parser.add_argument("--feature-rate", type=float, default=0.1,
                        help="the clamped features fire on about this fraction of rows (default 0.1)")
    parser.add_argument("--positions", default="prompt", choices=("prompt", "answer", "all"),
                        help="rows delta acts on (default prompt: every prompt row)")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="the toy shape, 4 prompts, 1 timed step (seconds)")
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~saerecover.bench.recovery.run.BenchConfig` of parsed arguments."""
    from saerecover.bench.recovery.run import BenchConfig

    modes = tuple(m.strip() for m in str(args.modes).split(",") if m.strip())
    cfg = BenchConfig(shape=args.shape, device=args.device, dtype=args.dtype, modes=modes, n=args.n,
                      steps=args.steps, warmup=args.warmup, single=args.single, features=args.features,
                      feature_rate=args.feature_rate, positions=args.positions, threads=args.threads)
    if args.quick:
        cfg.shape, cfg.n, cfg.steps, cfg.single = "toy", args.n or 4, 1, 2 if args.single is None else args.single
        cfg.features = min(cfg.features, 16)
    cfg.validate()
    return cfg


def run_from_args(args: argparse.Namespace) -> int:
    """Run, print the table, write --json; exit status 0."""
    from saerecover.bench.recovery.run import format_table, run, write_json

    cfg = config_from_args(args)
    result = run(cfg)
    print(format_table(result))
    if args.json:
        write_json(result, args.json, cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m saerecover.bench.recovery``)."""
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
