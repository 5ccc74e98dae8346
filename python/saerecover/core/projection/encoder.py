"""``encoder``: C1, delta in the null space of A_S^T at every optimized row of every clamped delta
site (PAPER_NOTES, "Post-intervention recovery"), on the gradient and on the delta applied."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from saerecover import linalg
from saerecover.core.clamp import Clamp
from saerecover.core.projection.base import Deltas, ProjectionMode, StepContext, StepState, rescale_to_budget


class EncoderNull:
    """C1 at every clamped delta site: rows projected onto the null space of that site's A_S^T."""

    def __init__(self, clamp: Clamp, sites: list[str], rcond: float | None) -> None:
        self.projectors: dict[str, linalg.EncoderNullProjector] = {}
        for name in sites:
            sc = clamp.at(name)
            if sc is not None and sc.features.numel():
                self.projectors[name] = linalg.EncoderNullProjector(
                    sc.site.encoder_columns(sc.features), rcond=rcond)

    def __call__(self, deltas: Mapping[str, torch.Tensor], mask: torch.Tensor) -> Deltas:
        out = {}
        for name, x in deltas.items():
            y = x * mask.unsqueeze(-1)
            proj = self.projectors.get(name)
            if proj is not None:
                rows = y[mask]
                if rows.numel():
                    y = torch.zeros_like(y)
                    y[mask] = proj.apply(rows.contiguous())
            out[name] = y
        return out


class EncoderNullMode(ProjectionMode):
    """The gradient is projected (as the paper does) and so is the delta after every optimizer
    step, because Adam's per-coordinate scaling breaks orthogonality; then C4 by rescaling,
    which keeps null-space rows in the null space."""

    name = "encoder"

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        self.project = EncoderNull(ctx.clamp, ctx.sites, ctx.cfg.rcond)

    def project_gradient(self, grads: Deltas, state: StepState) -> Deltas:
        return self.project(grads, self.ctx.mask)

    def take_step(self, old: Deltas, new: Deltas, budgets: torch.Tensor, active: torch.Tensor) -> Deltas:
        return rescale_to_budget(old, self.project(new, self.ctx.mask), budgets, active)
