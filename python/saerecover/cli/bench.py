"""``saerecover bench``: the projection benchmark (Rust core vs NumPy vs torch vs the paper's
per-row solve); its flags are saerecover.bench.projection's own."""

from __future__ import annotations

import argparse
from typing import Any

from saerecover.bench import projection

__all__ = ["add_bench_parser", "cmd_bench"]


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to ``subparsers``; it reports its own unknown arguments (``bench: ...``)."""
    p = subparsers.add_parser(
        "bench", help="projection benchmark (Rust core vs NumPy vs torch vs per-row solve)",
        description="Time the Rust projections against NumPy, torch and the paper's per-row solve.")
    p.own_unknown_args = True
    projection.add_arguments(p)
    p.set_defaults(handler=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    """``saerecover bench``: run the grid (or print earlier --json results); exit 0."""
    return int(projection.run_from_args(args) or 0)
