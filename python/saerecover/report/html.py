"""report.html: one self-contained file (figures embedded as data URIs, the style sheet and the
small sorting / filtering script inline, nothing fetched from the network), rendered by Jinja2
from the templates shipped in ``saerecover/report/templates``.

The templates receive the report's parts (:mod:`saerecover.report.document`) and plain values;
every cell is escaped by Jinja's autoescaping.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from saerecover.report.document import Features, Figure, Page, Table
from saerecover.report.format import num
from saerecover.runs import atomic_write_text

__all__ = ["HTML_FILE", "data_uri", "render", "render_page", "write_page"]

HTML_FILE = "report.html"


#: Shown size of an embedded figure relative to its pixels (figures are saved at 120 dpi; 0.75
#: shows them at 90 px per inch, so that two one-panel figures fit side by side).
FIGURE_SCALE = 0.75


@dataclass(frozen=True)
class Image:
    """An embedded PNG: its data URI and the width (CSS px) it is shown at."""

    src: str
    width: int


def data_uri(path: str | Path) -> Image | None:
    """A PNG file as a ``data:image/png;base64,...`` URI with its display width (None when the
    file is missing or not a PNG)."""
    p = Path(path)
    if not p.is_file():
        return None
    data = p.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return None
    width = int.from_bytes(data[16:20], "big")  # the IHDR chunk's width
    return Image("data:image/png;base64," + base64.b64encode(data).decode("ascii"), round(width * FIGURE_SCALE))


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("saerecover.report", "templates"),
                      autoescape=select_autoescape(("html", "j2"), default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = num
    env.tests["features"] = lambda x: isinstance(x, Features)
    env.tests["table"] = lambda x: isinstance(x, Table)
    env.tests["figure"] = lambda x: isinstance(x, Figure)
    return env


def render(template: str, **context: Any) -> str:
    """Render one of the shipped templates (``run.html.j2``, ``page.html.j2``)."""
    return _environment().get_template(template).render(**context)


def render_page(page: Page, root: str | Path) -> str:
    """The HTML of a :class:`Page` whose figures lie under ``root`` (a sweep's or TPP
    collection's report)."""
    root = Path(root)
    images = {f.path: data_uri(root / f.path) for f in page.figures()}
    return render("page.html.j2", title=page.title, page=page, images=images)


def write_page(page: Page, root: str | Path) -> Path:
    """Write ``root/report.html`` of ``page``; its path."""
    return atomic_write_text(Path(root) / HTML_FILE, render_page(page, root))
