"""Directional ablation (the steering-style baseline): the clamped features' decoder
directions removed from the residual at every clamped site, before and after delta."""

from __future__ import annotations

from typing import ClassVar

from saerecover.core.clamp import Clamp
from saerecover.core.defenses.base import Defense, DefenseContext
from saerecover.core.defenses.sites import DirAblateSiteClamp, decoder_basis, derive


class DirAblate(Defense):
    """h_def = h - P_S h with P_S the projector onto span(W_dec[S]); re-applied after delta."""

    name: ClassVar[str] = "dir-ablate"
    doc: ClassVar[str] = "the clamped features' decoder directions ablated from the residual; re-applied after delta"

    def build(self, clamp: Clamp, ctx: DefenseContext) -> Clamp:
        out = Clamp()
        for sc in clamp.site_clamps:
            out._add(derive(sc, DirAblateSiteClamp, basis=decoder_basis(sc)))
        return out
