"""Headless Chromium for the report tests: load a page as a person's browser would, dump the DOM
after its scripts ran, take a screenshot, and collect what the page wrote to the console.

Chromium comes from the Debian package (scripts/test.sh installs it when absent); nothing here
downloads a browser. Without one the tests skip with a message, except under CI (``CI`` set),
where a missing browser fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
#: Flags for a root user in a container without a display or a session bus.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", "--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000")
#: A console message as Chromium logs it on stderr: ``...:INFO:CONSOLE:LINE] "TEXT", source: URL (LINE)``
#: (older versions: ``CONSOLE(LINE)]``); uncaught exceptions come this way too.
CONSOLE = re.compile(r':CONSOLE(?::\d+|\(\d+\))\] "(?P<text>.*)", source: ')


def chromium() -> str:
    """The Chromium executable, or skip (fail under CI) with the reason."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    msg = ("headless Chromium not found (looked for " + ", ".join(NAMES) + "); install the Debian package: "
           "apt-get install chromium (scripts/test.sh does this when it can)")
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@dataclass
class Page:
    dom: str
    console: list[str]


def _run(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "saerecover-chromium-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home)}  # a profile outside the user's own
    return subprocess.run([chromium(), *FLAGS, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def load(html: Path, fragment: str = "") -> Page:
    """The DOM of ``html`` (opened as file://...#fragment) after its scripts ran, and the console."""
    url = html.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    res = _run(["--dump-dom", url])
    assert res.returncode == 0, f"chromium failed ({res.returncode}): {res.stderr[-2000:]}"
    return Page(dom=res.stdout, console=[m.group("text") for m in CONSOLE.finditer(res.stderr)])


def screenshot(html: Path, png: Path, *, width: int = 1280, height: int = 2400) -> Path:
    """A PNG screenshot of ``html`` at ``width`` x ``height`` CSS pixels."""
    res = _run([f"--screenshot={png}", f"--window-size={width},{height}", html.resolve().as_uri()])
    assert res.returncode == 0 and png.is_file(), f"chromium screenshot failed: {res.stderr[-2000:]}"
    return png


def ink(png: Path, box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> float:
    """The share of pixels that are not (near) white in ``box`` (fractions left, top, right,
    bottom) of a screenshot: 0 for a blank page."""
    from matplotlib.image import imread

    img = imread(str(png))[..., :3]
    h, w = img.shape[:2]
    x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)
    part = img[y0:y1, x0:x1]
    return float((part.min(axis=-1) < 0.9).mean()) if part.size else 0.0


def check_report_page(html: Path, png: Path) -> Page:
    """What a person sees in a run's report.html, checked: the page loads without a console
    error or script error, its script ran, the summary and per-example tables and every figure
    are there and the figures decode, and a screenshot (stored at ``png``) is not blank."""
    page = load(html)
    assert page.console == [], f"the page wrote to the console (it never should): {page.console}"
    assert 'data-ready="yes"' in page.dom, "the page's script did not finish (or reported errors)"
    assert re.search(r'<div id="js-errors" hidden', page.dom), "the page shows script errors"
    assert '<table class="report-table sortable" id="summary">' in page.dom
    assert '<table class="report-table sortable" id="examples">' in page.dom
    n_img = len(re.findall(r"<img ", page.dom))
    assert n_img >= 2 and f'data-images="{n_img}/{n_img}"' in page.dom, "a figure did not decode"
    assert not re.search(r'(src|href)="(https?:)?//(?!www\.neuronpedia\.org/)', page.dom), "the page fetches"
    screenshot(html, png)
    assert ink(png) > 0.02, f"the screenshot {png} is (nearly) blank"
    return page
