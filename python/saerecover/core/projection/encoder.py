"""``encoder``: C1, delta in the null space of A_S^T at every optimized row of every clamped delta
site (PAPER_NOTES, "Post-intervention recovery"), on the gradient and on the delta applied."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from saerecover import linalg
from saerecover.core.clamp import Clamp
from saerecover.core.projection.base import Deltas, ProjectionMode, StepContext, StepState, rescale_to_budget


#: The encoder mode warns at a delta site whose null space (of the clamped features' encoder
#: columns, A_S^T) has fewer than this fraction of d_model dimensions: there C1 leaves delta
#: (almost) nowhere to go, and a recovery rate of 0 says nothing about the clamp.
MIN_ENCODER_NULL_FRACTION = 0.05


def encoder_null_space(clamp: Clamp, sites: list[str], rcond: float | None = None) -> list[dict[str, Any]]:
    """Per clamped delta site: ``{"site", "rank", "d_model", "null_dim", "warning"}``, the numerical
    rank of A_S (the Rust core's, as the projector uses it), d_model - rank, and whether
    ``null_dim < MIN_ENCODER_NULL_FRACTION * d_model`` (the encoder mode cannot move delta there)."""
    out = []
    for name in sites:
        sc = clamp.at(name)
        if sc is None or not sc.features.numel():
            continue
        proj = linalg.EncoderNullProjector(sc.site.encoder_columns(sc.features), rcond=rcond)
        null_dim = proj.d - proj.rank
        out.append({"site": name, "n_features": int(sc.features.numel()), "rank": proj.rank, "d_model": proj.d,
                    "null_dim": null_dim, "warning": null_dim < MIN_ENCODER_NULL_FRACTION * proj.d})
    return out


def encoder_null_warnings(clamp: Clamp, sites: list[str], rcond: float | None = None) -> list[dict[str, Any]]:
    """:func:`encoder_null_space`'s sites that warn, each with its ``message``; every message is
    also issued as a UserWarning."""
    found = []
    for entry in encoder_null_space(clamp, sites, rcond):
        if not entry["warning"]:
            continue
        message = (f"encoder mode at {entry['site']}: the {entry['n_features']} clamped features' encoder columns "
                   f"have rank {entry['rank']} in d_model {entry['d_model']}, leaving a null space of dimension "
                   f"{entry['null_dim']} (under {MIN_ENCODER_NULL_FRACTION:.0%} of d_model): encoder mode cannot "
                   "move delta there, so its recovery rate says nothing about the clamp")
        warnings.warn(message, UserWarning, stacklevel=2)
        found.append({"kind": "encoder_null_space", **{k: v for k, v in entry.items() if k != "warning"},
                      "message": message})
    return found


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
