"""Projection benchmark: the Rust core against NumPy, torch and the paper's per-row solve.

Times, in one run and on the same inputs, the two null-space projections of PAPER_NOTES.md:

* encoder (C1): ``Y = X - (X U_r) U_r^T`` with ``U_r`` an orthonormal basis of span(A_S),
  ``A_S: (d, k)`` selected encoder columns, ``X: (n, d)`` rows. The Rust core is timed with its
  basis prebuilt (the factorization is timed separately, once per feature set);
* Jacobian: ``Y = G - G J^T (J J^T)^+ J`` for ``J: (m, n)`` and a batch ``G: (b, n)``; J changes
  every optimizer step, so every implementation is timed factorization included.

Every cell is first checked against a float64 ground truth (all implementations must agree);
then each implementation is timed with adaptive repetitions (a time budget per cell, at least
``--min-repeats`` calls, the median reported). Wired into the CLI as ``saerecover bench`` via
``add_arguments`` and ``run_from_args``; ``main(argv)`` is the stand-alone entry point.
docs/benchmarks.md explains the columns and how to read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from saerecover.bench.projection.cells import Context, encoder_cells, jacobian_cells
from saerecover.bench.projection.environment import apply_threads, collect_meta, cpu_snapshot, load_core, other_load
from saerecover.bench.projection.options import Config, add_arguments
from saerecover.bench.projection.report import format_report, summary, write_json
from saerecover.bench.projection.timing import measure_peak

# --------------------------------------------------------------------------------------------
# options



# --------------------------------------------------------------------------------------------
# environment



# --------------------------------------------------------------------------------------------
# timing



# --------------------------------------------------------------------------------------------
# implementations



# --------------------------------------------------------------------------------------------
# ground truth and flop counts



# --------------------------------------------------------------------------------------------
# running a cell



# --------------------------------------------------------------------------------------------
# reporting



# --------------------------------------------------------------------------------------------
# entry points


def run(config: Config) -> tuple[dict[str, Any], list[dict[str, Any]], Context]:
    """Run the benchmark described by `config`; returns the meta row, the rows and the context."""
    guard = apply_threads(config.threads)
    try:
        core, core_error = load_core()
        if core is None:
            print(f"note: Rust core unavailable ({core_error}); timing the alternatives only", file=sys.stderr)
        meta = collect_meta(core, core_error)
        th = meta["threads"]
        print(
            f"threads: torch {th['torch']}, rayon {th['rayon_effective']} (RAYON_NUM_THREADS="
            f"{th['RAYON_NUM_THREADS'] or 'unset'}), NumPy BLAS "
            + ",".join(str(b.get("num_threads")) for b in meta["blas"]["numpy"] if b.get("user_api") == "blas"),
            file=sys.stderr,
            flush=True,
        )
        snap = cpu_snapshot()
        peak = measure_peak(config.peak_size, budget=0.2 if config.quick else 0.5)
        meta["peak"] = peak
        meta["config"] = {
            k: v for k, v in vars(config).items() if k not in ("json_path",)
        }
        ctx = Context(config=config, core=core, peak=peak, meta=meta)
        rows: list[dict[str, Any]] = []
        if "encoder" in config.ops:
            rows += encoder_cells(ctx)
        if "jacobian" in config.ops:
            rows += jacobian_cells(ctx)
        meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        meta["other_processes_cores"] = other_load(snap, cpu_snapshot())
        # The peak again at the end, keeping the better of the two measurements: a burst of
        # load from elsewhere during one of them would understate it.
        peak_end = measure_peak(config.peak_size, budget=0.2 if config.quick else 0.5)
        for dtype in ("float32", "float64"):
            for lib in ("numpy", "torch", "best"):
                peak[dtype][lib] = max(peak[dtype][lib], peak_end[dtype][lib])
        for row in rows:
            best = peak.get(row["dtype"], {}).get("best")
            if best and row.get("gflops") is not None:
                row["frac_peak"] = row["gflops"] / best
        meta["summary"] = summary(rows, peak, config.dtype)
        meta["notes"] = ctx.notes
        meta["errors"] = ctx.errors
        return meta, rows, ctx
    finally:
        if guard is not None:
            guard.unregister()


def report_from_json(paths: Sequence[str]) -> str:
    """The table and summary of earlier runs' --json files, merged (e.g. a grid run in parts).
    The header is the first file's; notes are renumbered; a shape measured twice keeps the
    later file's rows."""
    meta: dict[str, Any] | None = None
    notes: list[str] = []
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        head, rows = data[0], data[1:]
        if meta is None:
            meta = head
        offset = len(notes)
        notes += head.get("notes", [])
        for row in rows:
            row = dict(row)
            note = row.get("note") or ""
            if note.startswith("["):
                idx, rest = note[1:].split("]", 1)
                row["note"] = f"[{int(idx) + offset}]{rest}"
            key = tuple(row.get(k) for k in ("op", "d", "k", "m", "n", "batch", "impl"))
            merged[key] = row
    if meta is None:
        raise ValueError("no JSON files given")
    rows = list(merged.values())
    cfg = meta["config"]
    config = Config(**{**cfg, "json_path": None, "grid": cfg["grid"], "ops": tuple(cfg["ops"]), "impls": tuple(cfg["impls"])})
    ctx = Context(config=config, core=None, peak=meta["peak"], notes=notes)
    sources = f"merged from {', '.join(paths)}" if len(paths) > 1 else f"from {paths[0]}"
    return f"({sources})\n" + format_report(meta, rows, ctx.config, ctx.notes)


def run_from_args(args: argparse.Namespace) -> int:
    """Run from parsed options (what `saerecover bench` calls); prints the report, writes JSON."""
    if args.report:
        print(report_from_json(args.report))
        return 0
    config = Config.from_args(args)
    t0 = time.perf_counter()
    meta, rows, ctx = run(config)
    meta["wall_s"] = time.perf_counter() - t0
    print(format_report(meta, rows, ctx.config, ctx.notes))
    print(f"\ntotal wall time {meta['wall_s']:.1f} s", flush=True)
    if config.json_path:
        write_json(config.json_path, meta, rows)
    if ctx.errors:
        print(f"{ctx.errors} cell(s) failed verification", file=sys.stderr)
        return 1
    return 0



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saerecover bench",
        description="Time the Rust projections against NumPy, torch and the paper's per-row solve.",
    )
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m saerecover.bench.projection [options]`."""
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
