"""The clamp as the task built it (PAPER_NOTES, "The question": h_def = h + D(clamp_S(E(h))) -
D(E(h))), applied once before delta (``clamp``) or again after it (``clamp-reclamp``)."""

from __future__ import annotations

from typing import Any, ClassVar

from saerecover.core.clamp import Clamp
from saerecover.core.defenses.base import Defense, DefenseContext


class PlainClamp(Defense):
    """The clamp unchanged; delta is added after it."""

    name: ClassVar[str] = "clamp"
    doc: ClassVar[str] = "the clamp as given (every site); delta added after it"
    recovery: ClassVar[dict[str, Any]] = {"reclamp": False}

    def build(self, clamp: Clamp, ctx: DefenseContext) -> Clamp:
        return clamp


class Reclamp(PlainClamp):
    """The clamp, applied again to h_def + delta (RecoveryConfig.reclamp)."""

    name: ClassVar[str] = "clamp-reclamp"
    doc: ClassVar[str] = "the clamp, applied again after delta"
    recovery: ClassVar[dict[str, Any]] = {"reclamp": True}
