"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's time limit).

While a :class:`StopOnSignal` block runs in the main thread, the first SIGINT or SIGTERM only
asks for a stop: the work calls :meth:`StopOnSignal.check` between batches, after a batch's
records are written, and that raises :class:`Interrupted`. A second signal raises at once (the
batch in flight is lost; records.jsonl is appended a line at a time, so nothing is damaged). The
command line turns :class:`Interrupted` into one line saying how to resume, and exit status
128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["Interrupted", "StopOnSignal", "interrupt_message", "terminate_as_interrupt"]

#: The signals that stop a run.
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


class Interrupted(KeyboardInterrupt):
    """A run stopped by signal ``signum``; ``path``: its run directory (None: nothing was
    written), ``records``: how many records it holds."""

    def __init__(self, signum: int, path: str | os.PathLike[str] | None = None, records: int | None = None) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.path = Path(path) if path is not None else None
        self.records = records

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it."""
        return 128 + self.signum

    def __str__(self) -> str:
        return interrupt_message(self)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover
        return f"signal {signum}"


def interrupt_message(err: BaseException) -> str:
    """One line: which signal stopped the command and, for a run, what was kept and how to resume."""
    signum = getattr(err, "signum", signal.SIGINT)
    text = f"interrupted by {_name(signum)}"
    path = getattr(err, "path", None)
    if path is not None:
        kept = getattr(err, "records", None)
        held = f"{kept} record(s)" if kept is not None else "its records"
        text += (f"; {path} keeps {held} of the examples finished so far: run the same command again (same --out) "
                 "to resume where it stopped")
    return text


class StopOnSignal:
    """A context manager: SIGINT and SIGTERM ask for a stop instead of stopping at once (main
    thread only; elsewhere it does nothing). ``signum`` is the signal received, or None."""

    def __init__(self, *, notice: bool = True) -> None:
        self.signum: int | None = None
        self.notice = notice
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        if self.notice:
            sys.stderr.write(f"\nsaerecover: {_name(signum)} received: stopping once the current batch is written "
                             "(send it again to stop now)\n")
            sys.stderr.flush()

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop was asked for."""
        if self.signum is not None:
            raise Interrupted(self.signum)


def terminate_as_interrupt() -> Any:
    """Make SIGTERM raise :class:`Interrupted` (as SIGINT raises KeyboardInterrupt) in the main
    thread; returns the previous handler (None when it could not be set)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return None

    def handle(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, handle)
