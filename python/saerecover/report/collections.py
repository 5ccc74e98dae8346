"""Reports of collections (a directory of related runs with one combined summary, see
:mod:`saerecover.runs.collection`). Each kind of collection registers, in
:data:`COLLECTION_REPORTS`, how its report is built (a :class:`~saerecover.report.document.Page`,
written as report.md and as the self-contained report.html) and what its main table is; adding
a kind is one entry there."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from saerecover.report.compare import compare_report, compare_table
from saerecover.report.document import Page
from saerecover.report.html import write_page
from saerecover.report.sweeps import budget_report, feature_report, sweep_table
from saerecover.report.tpp import tpp_report, tpp_table
from saerecover.runs.collection import REPORT_FILE, read_summary, write
from saerecover.runs.errors import RunDirectoryError
from saerecover.runs.files import check_no_link

T = TypeVar("T")


@dataclass(frozen=True)
class CollectionReport:
    """How one kind of collection is reported: ``render(root, summary)`` returns the report's
    page (and may write plots under ``root``); ``table(summary)`` is the table printed on the
    terminal."""

    render: Callable[[Path, Mapping[str, Any]], Page]
    table: Callable[[Mapping[str, Any]], str]


#: The collection kinds (``summary["collection"]``) and their reports.
COLLECTION_REPORTS: dict[str, CollectionReport] = {
    "budget_sweep": CollectionReport(budget_report, sweep_table),
    "feature_sweep": CollectionReport(feature_report, sweep_table),
    "tpp": CollectionReport(tpp_report, tpp_table),
    "compare": CollectionReport(compare_report, compare_table),
}


def _report_of(root: Path, summary: Mapping[str, Any]) -> CollectionReport:
    kind = summary.get("collection")
    if kind not in COLLECTION_REPORTS:
        raise RunDirectoryError(f"{root}: unknown collection kind {kind!r}; known: {', '.join(COLLECTION_REPORTS)}")
    return COLLECTION_REPORTS[kind]


def write_collection_report(root: str | Path, summary: Mapping[str, Any]) -> Path:
    """(Re)write a collection's summary.json, report.md, report.html and plots; the path of
    report.md (report.html lies beside it)."""
    root = Path(root)
    check_no_link(root)  # before the plots: nothing is written through a link
    page = _checked(root, summary, lambda: _report_of(root, summary).render(root, summary))
    write(root, summary, page.markdown())
    write_page(page, root)
    return root / REPORT_FILE


def _checked(root: Path, summary: Mapping[str, Any], make: Callable[[], T]) -> T:
    """``make()``; a summary.json that lacks what its kind's report reads (a hand-edited or
    truncated one) is a RunDirectoryError naming the file and what is missing."""
    try:
        return make()
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        what = f"it has no {err.args[0]!r}" if isinstance(err, KeyError) and err.args else \
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise RunDirectoryError(f"{Path(root) / 'summary.json'} is not a readable {summary.get('collection')} "
                                f"summary: {what}; rerun the command that wrote it (it resumes)") from err


def collection_table(summary: Mapping[str, Any]) -> str:
    """The main table of a collection's summary."""
    return _report_of(Path("."), summary).table(summary)


def rewrite_report(root: str | Path) -> tuple[Path, str]:
    """Regenerate a collection's report.md, report.html and plots from its summary.json
    (``saerecover report`` on a sweep or TPP directory); returns (report.md's path, the main
    table)."""
    summary = read_summary(root)
    if summary is None:
        raise RunDirectoryError(f"{root} holds no collection summary.json")
    path = write_collection_report(root, summary)
    return path, _checked(Path(root), summary, lambda: _report_of(Path(root), summary).table(summary))
