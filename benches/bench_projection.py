#!/usr/bin/env python3
"""Projection benchmark: the Rust core vs NumPy, torch and the paper's per-row solve.

    python benches/bench_projection.py            # the default grid (~10-15 min on 2 cores)
    python benches/bench_projection.py --quick    # a small grid (< 1 min)
    python benches/bench_projection.py --help     # all options; docs/benchmarks.md explains the output

Same as `saerecover bench`; the code lives in saerecover.bench.projection.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from saerecover.bench.projection import main
except ImportError:  # run from a source tree without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from saerecover.bench.projection import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
