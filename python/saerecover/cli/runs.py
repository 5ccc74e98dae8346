"""The commands on finished run directories: ``saerecover report`` (regenerate report.html, report.md and
plots of a run, sweep or TPP collection), ``analyze`` (recompute every metric from the saved
tensors) and ``merge`` (join the shards of a run).

Exit status: analyze 0 when every recomputed metric matches the run within tolerance, 1 when
one does not (or a needed tensor is missing), 2 on a usage error; report and merge 0 or 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from saerecover.cli import options
from saerecover.cli.output import print_report_paths

__all__ = ["add_analyze_parser", "add_merge_parser", "add_report_parser", "cmd_analyze", "cmd_merge", "cmd_report"]

MAX_LISTED = 10


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report RUN_DIR`` to ``subparsers``."""
    p = subparsers.add_parser("report",
                              help="regenerate report.html, report.md and plots of a run, sweep or TPP collection")
    p.add_argument("run_dir")
    p.set_defaults(handler=cmd_report)
    return p


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``analyze RUN_DIR [--sae SRC] [--json PATH] ...`` to ``subparsers``."""
    a = options.ANALYZE
    p = subparsers.add_parser(
        "analyze",
        help="recompute a run's metrics from its saved tensors (no model) and decompose each delta",
        description="Recompute every per-example metric of a run directory from the saved tensors "
                    "(the SAE only; the model is never loaded), compare with the recorded values, "
                    "and report the recovery-path decomposition of each delta. Writes "
                    "RUN_DIR/analysis.json. Exit status 1 if a metric differs beyond tolerance.",
    )
    p.add_argument("run_dir", help="run directory (config.json, records.jsonl, tensors/)")
    p.add_argument("--sae", help="SAE of the delta site: local directory or RELEASE/ID "
                                 "(default: the 'sae' source in config.json)")
    p.add_argument("--json", metavar="PATH", help="also write the analysis to PATH")
    p.add_argument("--no-save", action="store_true", help="do not write RUN_DIR/analysis.json")
    p.add_argument("--atol", type=float, default=a["atol"],
                   help="tolerance: a value matches if |diff| <= atol or |diff|/max(|a|,|b|) <= rtol "
                        "(default 1e-5)")
    p.add_argument("--rtol", type=float, default=a["rtol"], help="relative tolerance (default: --atol)")
    p.add_argument("--top-k", type=int, default=a["top_k"],
                   help=f"non-clamped features in the top-k components (default {a['top_k']})")
    p.add_argument("--device", default=a["device"], help=f"device for the SAE (default {a['device']})")
    p.set_defaults(handler=cmd_analyze)
    return p


def add_merge_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``merge OUT RUN_DIR...`` to ``subparsers``."""
    p = subparsers.add_parser(
        "merge",
        help="merge the run directories of a sharded run (--shard i/n) into one",
        description="Merge the finished shards of one run (saerecover run ... --shard i/n) into a "
                    "new run directory OUT: records, tensors, summary and report.",
    )
    p.add_argument("out", help="the merged run directory (must not exist or be empty)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="shard run directories, all n of them")
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    p.set_defaults(handler=cmd_merge)
    return p


def _error(msg: Any) -> int:
    print(f"saerecover: error: {msg}", file=sys.stderr)
    return 2


def _fmt(x: Any) -> str:
    """Enough digits to see a difference of 1e-6 relative."""
    if isinstance(x, bool) or x is None:
        return str(x)
    return f"{float(x):.9g}"


def cmd_report(args: argparse.Namespace) -> int:
    """``saerecover report RUN_DIR``: rewrite the report of a run, or the combined report of a
    sweep or TPP directory; print its table."""
    from saerecover.report.collections import rewrite_report
    from saerecover.report.run import summary_table, write_report
    from saerecover.runs import open_run
    from saerecover.runs.collection import read_summary

    if read_summary(args.run_dir) is not None:  # a sweep or TPP directory: its combined report
        path, table = rewrite_report(args.run_dir)
        print(table)
        print()
        print_report_paths(path.parent)
        return 0
    run = open_run(args.run_dir)
    path = write_report(run.path)
    print(summary_table(run.read_summary()))
    print()
    print_report_paths(path.parent)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """``saerecover analyze RUN_DIR``: recompute, compare, print; exit 0, 1 (mismatch) or 2."""
    from saerecover.experiments.analysis import ANALYSIS_FILE, analyze_run
    from saerecover.runs import RunDirectoryError
    from saerecover.runs.directory import run_in_use

    run_dir = Path(args.run_dir)
    save = not getattr(args, "no_save", False)
    try:
        pid = run_in_use(run_dir) if run_dir.is_dir() else None
        if pid is not None and save:
            if not args.json:
                return _error(f"{run_dir} is being written by a running process (pid {pid}); "
                              f"not writing {ANALYSIS_FILE} into it: pass --json PATH (and --no-save) "
                              "to analyze the records so far")
            print(f"note: {run_dir} is still being written (pid {pid}); writing only {args.json}")
            save = False
        result = analyze_run(run_dir, sae=args.sae, device=args.device, atol=args.atol, rtol=args.rtol,
                             top_k=args.top_k)
        written = []
        if save:
            written.append(result.write())
        if args.json:
            written.append(result.write(args.json))
    except (RunDirectoryError, ValueError, TypeError, FileNotFoundError, OSError) as err:
        return _error(err)

    site = result.site
    print(f"analysis of {result.run_dir}: site {site['hook_name']} ({site['sae']}; "
          f"{site['n_features']} clamped features; centring {site['center_input']['value']}, "
          f"from {site['center_input']['from']})")
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} valid example(s) without an outcome (failed)")
    for path in written:
        print(f"wrote {path}")
    if result.ok:
        n = sum(len(ex["checks"]) for ex in result.examples)
        print(f"OK: {n} recomputed values over {result.n_examples} example(s) match within "
              f"atol={result.atol:g} / rtol={result.rtol:g}")
        return 0
    for problem in result.problems[:MAX_LISTED]:
        print(f"PROBLEM: {problem}")
    bad = result.mismatches
    for m in bad[:MAX_LISTED]:
        values = "" if m["recorded"] is None and m["recomputed"] is None else \
            f": recorded {_fmt(m['recorded'])}, recomputed {_fmt(m['recomputed'])}"
        print(f"MISMATCH: {m['name']} of example {m['example_id']!r} (mode {m['mode']}){values} "
              f"(abs diff {m['abs']:.3g}, rel {m['rel']:.3g})")
    if len(bad) > MAX_LISTED:
        print(f"... and {len(bad) - MAX_LISTED} more mismatches (see the JSON)")
    names = sorted({m["name"] for m in bad})
    print(f"FAILED: {len(bad)} mismatch(es) in {', '.join(names) or 'none'}; "
          f"{len(result.problems)} problem(s)")
    return 1


def cmd_merge(args: argparse.Namespace) -> int:
    """``saerecover merge OUT RUN_DIR...``: merge the shards; print the merged summary; exit 0 or 2."""
    from saerecover.experiments.merge import merge_runs
    from saerecover.report.run import summary_table
    from saerecover.runs import RunDirectoryError, open_run

    try:
        out = merge_runs(args.out, args.run_dirs, report=not getattr(args, "no_report", False))
        run = open_run(out)
        summary = run.read_summary()
    except (RunDirectoryError, ValueError, OSError) as err:
        return _error(err)
    print(summary_table(summary))
    print(f"\nmerged {len(args.run_dirs)} shard(s), {summary.get('n_records')} records -> {out}")
    if not getattr(args, "no_report", False):
        print_report_paths(out)
    return 0
