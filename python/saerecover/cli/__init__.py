"""The ``saerecover`` command line: parsing, option checks and one module per command family.

Parsers are cheap to build (no torch, no model code): a command's work is imported when the
command runs, so ``saerecover --help`` starts quickly.
"""

from saerecover.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
