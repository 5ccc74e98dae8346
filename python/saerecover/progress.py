"""Progress bars for long work: one tqdm bar per stage (finding flips, each mode's recovery,
generation, attribution) on stderr, counting examples with their rate (ex/s) and an ETA.

A bar shows only when asked for (``enabled``: the commands' ``--quiet`` turns it off) and when
stderr is a terminal (tqdm's ``disable=None``), so logs and pipes stay clean.
"""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "ex") -> Any:
    """A tqdm bar over ``total`` ``unit``\\ s for the stage ``desc``; a no-op bar when not
    ``enabled``, when ``total`` is 0 or when stderr is not a terminal. Use it as a context
    manager, or ``update(n)`` then ``close()``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled and total > 0 else True,
                dynamic_ncols=True, leave=True)
