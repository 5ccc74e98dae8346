"""What a command prints last: where its report is (report.md and the self-contained
report.html beside it)."""

from __future__ import annotations

import os

__all__ = ["print_report_paths"]


def print_report_paths(directory: str | os.PathLike[str]) -> None:
    """Print the paths of the two report files of a run or collection directory."""
    from saerecover.report.html import HTML_FILE
    from saerecover.report.run import REPORT_FILE

    root = os.fspath(directory)
    print(f"report: {os.path.join(root, HTML_FILE)}  (open in a browser)")
    print(f"        {os.path.join(root, REPORT_FILE)}")
