"""The command line's error contract: every user error, from argparse or from a command, is one
``saerecover: error: ...`` line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["CLIError", "OneLineParser", "OptionError", "one_line"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class OptionError(ValueError):
    """A bad option value (from a flag or a config file): printed as one line, exit status 2."""


def one_line(err: object) -> str:
    """An error message on one line (multi-line details joined with '; ')."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


_NEGATIVE_VALUE = re.compile(r"^-\.?\d[\d.,eE+-]*$")


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one line, ``saerecover: error: ...``, and exit status 2
    (subparsers made by ``add_subparsers`` inherit the class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A value that starts with a minus and a digit is a value (``--features -1,2``,
        # ``--budgets -1,2``), not an unknown option: argparse alone takes only "-1" or "-.5".
        self._negative_number_matcher = _NEGATIVE_VALUE

    #: Report unknown arguments here (``saerecover: error: bench: unrecognized arguments: ...``)
    #: rather than leave them to the top-level parser: for a sub-command whose flags are another
    #: module's own (bench).
    own_unknown_args = False

    def error(self, message: str) -> None:  # type: ignore[override]
        where = f"{self.prog.split(' ', 1)[1]}: " if " " in self.prog else ""
        sys.stderr.write(f"saerecover: error: {where}{one_line(message)} (see {self.prog} --help)\n")
        raise SystemExit(2)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.own_unknown_args:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras
