"""The parts a report is made of, once for both of its files: a table, a figure, a section, a
page. report.md renders them as markdown (:meth:`Page.markdown`); report.html renders the same
objects through its Jinja templates (:mod:`saerecover.report.html`), so that both files show the
same numbers.

A table cell is a string, or :class:`Features` (feature indices of one SAE, linked to their
Neuronpedia pages in the HTML report when the SAE has a Neuronpedia id).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from saerecover.report.format import markdown_table

__all__ = ["Features", "Figure", "Page", "Section", "Table", "neuronpedia_url"]

#: A feature's page on Neuronpedia: ``{id}`` is the SAE's Neuronpedia id (``MODEL/SAE_ID`` as
#: sae_lens' pretrained_saes.yaml gives it, e.g. ``gpt2-small/4-res-jb``), ``{index}`` the feature.
NEURONPEDIA_URL = "https://www.neuronpedia.org/{id}/{index}"


def neuronpedia_url(neuronpedia_id: str | None, index: int) -> str | None:
    """The Neuronpedia page of feature ``index`` of the SAE ``neuronpedia_id``; None without an id."""
    if not neuronpedia_id:
        return None
    return NEURONPEDIA_URL.format(id=str(neuronpedia_id).strip("/"), index=int(index))


@dataclass(frozen=True)
class Features:
    """Feature indices of one SAE (a table cell); ``values``: a number shown beside each (e.g.
    ||dz_j||); ``neuronpedia_id``: the SAE's Neuronpedia id, when it has one."""

    indices: Sequence[int]
    neuronpedia_id: str | None = None
    values: Sequence[float] | None = None

    def items(self) -> list[tuple[int, float | None, str | None]]:
        """(index, value or None, Neuronpedia URL or None) of each feature, in order."""
        values = list(self.values) if self.values is not None else [None] * len(self.indices)
        return [(int(i), v, neuronpedia_url(self.neuronpedia_id, i)) for i, v in zip(self.indices, values)]

    def __str__(self) -> str:
        return ", ".join(str(int(i)) for i in self.indices) if self.indices else "none"


@dataclass
class Table:
    """A table: ``header`` and ``rows`` of cells (strings or :class:`Features`)."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]

    def markdown(self) -> str:
        return markdown_table(self.header, [[str(c) for c in row] for row in self.rows])


@dataclass
class Figure:
    """A PNG under the report's directory (``path`` relative to it) and its caption."""

    path: str
    caption: str = ""

    @property
    def alt(self) -> str:
        return self.path.rsplit("/", 1)[-1].removesuffix(".png").replace("_", " ")

    def markdown(self) -> str:
        return f"![{self.alt}]({self.path})" + (f"\n\n*{self.caption}*" if self.caption else "")


#: What a section holds, in order: paragraphs (plain text), tables and figures.
Block = str | Table | Figure


@dataclass
class Section:
    """A titled part of a report: paragraphs, tables and figures in order."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2

    def markdown_lines(self) -> list[str]:
        return ["#" * self.level + " " + self.title, ""] + _markdown_blocks(self.blocks)


def _markdown_blocks(blocks: Sequence[Block]) -> list[str]:
    out: list[str] = []
    for b in blocks:
        out += [b if isinstance(b, str) else b.markdown(), ""]
    return out


@dataclass
class Page:
    """A whole report (e.g. a sweep's): a title, blocks under it, then sections."""

    title: str
    intro: list[Block] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"# {self.title}", ""] + _markdown_blocks(self.intro)
        for s in self.sections:
            out += s.markdown_lines()
        return "\n".join(out)

    def figures(self) -> list[Figure]:
        blocks = [*self.intro, *(b for s in self.sections for b in s.blocks)]
        return [b for b in blocks if isinstance(b, Figure)]
