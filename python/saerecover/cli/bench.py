"""``saerecover bench``: the benchmarks. ``bench projection`` times the Rust projections against
NumPy, torch and the paper's per-row solve; ``bench recovery`` times recovery steps per mode at
real model shapes. Plain ``saerecover bench [flags]`` is ``bench projection [flags]``. Each
sub-command's flags are its benchmark module's own."""

from __future__ import annotations

import argparse
from typing import Any

from saerecover.bench import projection, recovery

__all__ = ["add_bench_parser", "cmd_bench", "cmd_bench_recovery"]

_PROJECTION_HELP = "projection benchmark (Rust core vs NumPy vs torch vs per-row solve)"
_RECOVERY_HELP = "recovery benchmark: step cost per mode at real model shapes (random weights)"


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``projection`` and ``recovery``) to ``subparsers``; each reports its own
    unknown arguments (``bench: ...``). ``bench`` alone takes the projection benchmark's flags."""
    p = subparsers.add_parser(
        "bench", help="benchmarks: projection (default) and recovery",
        usage="saerecover bench [projection | recovery] [options]",
        description="Benchmarks. 'bench projection' (also plain 'bench [flags]') times the Rust projections "
                    "against NumPy, torch and the paper's per-row solve; 'bench recovery' times recovery steps "
                    "per projection mode at real model shapes.")
    p.own_unknown_args = True
    projection.add_arguments(p)
    p.set_defaults(handler=cmd_bench)
    kinds = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", prog=p.prog)
    proj = kinds.add_parser("projection", help=_PROJECTION_HELP,
                            description="Time the Rust projections against NumPy, torch and the paper's per-row solve.")
    proj.own_unknown_args = True
    projection.add_arguments(proj)
    proj.set_defaults(handler=cmd_bench)
    rec = kinds.add_parser("recovery", help=_RECOVERY_HELP,
                           description="Time a recovery step per projection mode (forward, backward, J, projection, "
                                       "optimizer), its peak memory, and batched vs one-at-a-time throughput, on a "
                                       "real architecture with random weights and a random SAE of the real width.")
    rec.own_unknown_args = True
    recovery.add_arguments(rec)
    rec.set_defaults(handler=cmd_bench_recovery)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    """``saerecover bench [projection]``: run the grid (or print earlier --json results); exit 0."""
    return int(projection.run_from_args(args) or 0)


def cmd_bench_recovery(args: argparse.Namespace) -> int:
    """``saerecover bench recovery``: time the modes at one shape; exit 0."""
    return int(recovery.run_from_args(args) or 0)
