"""``saerecover attribute RUN_DIR``: recovery-path attribution of a finished run (replay each
component of every recovered delta alone, with the clamp active, and judge it as the run did)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from saerecover.cli import options
from saerecover.cli.checks import split_list
from saerecover.cli.flags import add_flags
from saerecover.cli.output import print_report_paths
from saerecover.cli.parsing import CLIError

__all__ = ["add_attribute_parser", "cmd_attribute"]


def add_attribute_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``attribute RUN_DIR [--modes ...] [--top-k K] ...`` to ``subparsers``."""
    p = subparsers.add_parser(
        "attribute",
        help="recovery-path attribution: replay each component of every recovered delta under the clamp",
        description="Decompose every recovered delta of a finished refusal run (full delta, clamped and "
                    "non-clamped parts, top-k non-clamped, top-k knockout, SAE residual), replay each part "
                    "alone with the clamp active, and judge it as the run did. Loads the model and SAEs from "
                    "the run's config. Writes RUN_DIR/attribution.json and RUN_DIR/plots/attribution.png, and "
                    "rewrites the run's report (report.html, report.md) with the attribution.",
    )
    p.add_argument("run_dir")
    p.add_argument("--modes", help="comma-separated modes (default: every residual mode of the run)")
    p.add_argument("--top-k", type=int, default=options.ATTRIBUTE["top_k"],
                   help="non-clamped features in the top-k components")
    p.add_argument("--model", help="override the model source recorded in the run")
    p.add_argument("--requests", help="the run's requests file, when its recorded source moved (matched by sha256)")
    p.add_argument("--column", help="column of --requests holding the request")
    p.add_argument("--device")
    p.add_argument("--batch-size", type=int, default=options.ATTRIBUTE["batch_size"])
    p.add_argument("--no-plot", action="store_true")
    add_flags(p, "quiet")
    p.set_defaults(handler=cmd_attribute)
    return p


def cmd_attribute(args: argparse.Namespace) -> int:
    """``saerecover attribute RUN_DIR``: replay attribution; print the counts; exit 0."""
    from saerecover.data.requests import load_requests
    from saerecover.experiments.attribution import ATTRIBUTION_FILE, attribute_run
    from saerecover.models import load_model
    from saerecover.runs import open_run

    if args.top_k is not None and args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not Path(args.run_dir).is_dir():
        raise CLIError(f"run directory {args.run_dir} does not exist")
    open_run(args.run_dir)  # a bad run directory fails here, before any model is loaded
    model = load_model(args.model, device=args.device) if args.model else None
    requests = load_requests(args.requests, column=args.column) if getattr(args, "requests", None) else None
    result = attribute_run(args.run_dir, modes=split_list(args.modes) or None, top_k=int(args.top_k),
                           device=args.device, model=model, requests=requests, batch_size=int(args.batch_size),
                           plot=not args.no_plot, progress=not args.quiet)
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nwritten: {Path(args.run_dir) / ATTRIBUTION_FILE}")
    print_report_paths(args.run_dir)
    return 0
