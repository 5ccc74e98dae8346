"""The ``saerecover`` command: the parser tree (one module per command family adds its parsers,
each leaf with its ``handler``) and :func:`main`, which parses, dispatches and turns a user error
into one ``saerecover: error: ...`` line with exit status 2."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

from saerecover import __version__
from saerecover.cli.attribute import add_attribute_parser
from saerecover.cli.bench import add_bench_parser
from saerecover.cli.compare import add_compare_parser
from saerecover.cli.ioi import add_demo_parser, add_ioi_parser
from saerecover.cli.model_tools import add_convert_parser, add_train_sae_parser
from saerecover.cli.parsing import CLIError, OneLineParser, one_line
from saerecover.cli.refusal import add_refusal_parser
from saerecover.cli.runs import add_analyze_parser, add_merge_parser, add_report_parser
from saerecover.cli.sweep import add_sweep_parser
from saerecover.cli.tpp import add_tpp_parser
from saerecover.cli.unlearning import add_unlearning_parser
from saerecover.runs.errors import RunDirectoryError
from saerecover.runs.interrupt import interrupt_message, terminate_as_interrupt

__all__ = ["USER_ERRORS", "build_parser", "main"]

#: What a handler raises for a user error (bad option, missing file, bad run directory): one line.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, MemoryError, RunDirectoryError)


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_PYTHON_FORMAT = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None):  # noqa: ANN001, ANN202
    """Our own warnings (a UserWarning raised in saerecover's code) as one ``saerecover: warning:``
    line, like the errors; anything else in Python's usual format."""
    if issubclass(category, UserWarning) and str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
        return f"saerecover: warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


def build_parser() -> argparse.ArgumentParser:
    """The whole parser tree; cheap (no torch, no model code)."""
    parser = OneLineParser(prog="saerecover",
                           description="Stress-test SAE feature clamps by post-intervention recovery.")
    parser.add_argument("--version", action="version", version=f"saerecover {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    run = sub.add_parser("run", help="recover a clamped behavior and write a run directory")
    tasks = run.add_subparsers(dest="task", required=True, metavar="TASK", parser_class=OneLineParser)
    for add in (add_ioi_parser, add_tpp_parser, add_unlearning_parser, add_refusal_parser):
        add(tasks)
    for add in (add_report_parser, add_sweep_parser, add_compare_parser, add_attribute_parser, add_analyze_parser,
                add_merge_parser,
                add_bench_parser, add_convert_parser, add_train_sae_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``saerecover ARGV``; the exit status (argparse errors exit 2 themselves). SIGINT and
    SIGTERM end a command with one line and status 130 / 143; a run stops once the batch in
    flight is written and the line says how to resume it (saerecover.runs.interrupt)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    previous = terminate_as_interrupt()
    warnings.formatwarning = _format_warning
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as err:
        print(f"saerecover: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"saerecover: {interrupt_message(err)}", file=sys.stderr)
        return 128 + int(getattr(err, "signum", signal.SIGINT))
    finally:
        warnings.formatwarning = _PYTHON_FORMAT
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
