"""Clamps with the SAE error channel constrained (PAPER_NOTES, "What the paper leaves open":
recovery on the refusal setting lives in the SAE error): the error replaced by its mean over a
reference set (``error-mean``), or projected off the clamped features' decoder directions
(``error-proj``). Both are applied again after delta."""

from __future__ import annotations

from typing import ClassVar

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.defenses.base import Defense, DefenseContext
from saerecover.core.defenses.sites import ErrorMeanSiteClamp, ErrorProjSiteClamp, decoder_basis, derive, sae_error

#: Reference rows per chunk when the mean error is measured.
CHUNK_ROWS = 4096


def mean_error(sc, rows: torch.Tensor) -> torch.Tensor:
    """The mean SAE error h - D(E(h)) over residual ``rows`` (m, d_model): (d_model,) float32."""
    total = torch.zeros(rows.shape[-1], dtype=torch.float64, device=rows.device)
    with torch.no_grad():
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            _, err = sae_error(sc, rows[start:start + CHUNK_ROWS])
            total += err.double().sum(dim=0)
    return (total / max(1, rows.shape[0])).float()


class ErrorMean(Defense):
    """The clamp with the SAE error replaced by its mean over the reference set."""

    name: ClassVar[str] = "error-mean"
    doc: ClassVar[str] = "clamp with the SAE error replaced by its mean over the reference set; re-applied after delta"

    def build(self, clamp: Clamp, ctx: DefenseContext) -> Clamp:
        out = Clamp()
        for sc in clamp.site_clamps:
            e = mean_error(sc, ctx.residuals(sc.site.hook_name))
            out._add(derive(sc, ErrorMeanSiteClamp, error_mean=e))
        return out


class ErrorProj(Defense):
    """The clamp with the SAE error projected off the clamped features' decoder directions."""

    name: ClassVar[str] = "error-proj"
    doc: ClassVar[str] = ("clamp with the SAE error projected off the clamped features' decoder directions; "
                          "re-applied after delta")

    def build(self, clamp: Clamp, ctx: DefenseContext) -> Clamp:
        out = Clamp()
        for sc in clamp.site_clamps:
            out._add(derive(sc, ErrorProjSiteClamp, basis=decoder_basis(sc)))
        return out
