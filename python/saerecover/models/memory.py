"""Running batched work within the memory there is: an out-of-memory error (CUDA's, or the CPU
allocator's) halves the chunk and retries it, and the smaller size is kept for the chunks
after it; one item that does not fit raises MemoryError naming the stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

#: What the CPU allocator's out-of-memory RuntimeError says (c10's DefaultCPUAllocator).
CPU_OOM_TEXT = "can't allocate memory"


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError for a failed allocation."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                            and CPU_OOM_TEXT in str(err))


def oom_label(err: BaseException) -> str:
    """How an out-of-memory error is named in messages: "CUDA out of memory" or "out of memory"."""
    return "CUDA out of memory" if isinstance(err, torch.cuda.OutOfMemoryError) else "out of memory"


def free_cached_memory() -> None:
    """Hand CUDA's cached blocks back after an out-of-memory error (nothing to do on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_in_chunks(n: int, batch_size: int, run: Callable[[int, int], T], *, what: str,
                  on_halve: Callable[[int], None] | None = None,
                  name_item: Callable[[int], str] | None = None) -> list[T]:
    """``run(start, stop)`` over ``[0, n)`` in chunks of at most ``batch_size``, in order; the
    results in order. On out of memory the chunk is halved and retried, and the smaller size
    kept; a chunk of one that does not fit raises MemoryError naming ``what`` (the stage) and
    the item (``name_item(i)``, default ``"item i"``). on_halve: called with the new size at
    each halving."""
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    out: list[T] = []
    size, start = int(batch_size), 0
    while start < n:
        stop = min(start + size, n)
        try:
            out.append(run(start, stop))
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            free_cached_memory()
            if stop - start == 1:
                item = name_item(start) if name_item is not None else f"item {start}"
                raise MemoryError(f"{oom_label(err)} in {what} with a batch of 1 ({item}): "
                                  f"{first_line(err)}") from err
            size = (stop - start + 1) // 2
            if on_halve is not None:
                on_halve(size)
            continue
        start = stop
    return out
