"""Phi: the defended features as the recovery sees them, E_S of the residual leaving every
clamped site at the rows Phi covers (PAPER_NOTES, cross-layer clamps)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from saerecover.core.clamp import Clamp


def defended_feature_parts(clamp: Clamp, states: Mapping, sites: list[str], phi_mask: torch.Tensor) -> list[torch.Tensor]:
    """Phi per site: E_S of the residual leaving each clamped site in ``sites`` at the rows of
    ``phi_mask`` (n, seq), one (n, seq * |S_site|) tensor per site (row-major, feature-minor)."""
    parts = []
    for name in sites:
        sc = clamp.at(name)
        z = sc.site.encode(states[name].h_rec)[..., sc.features.to(phi_mask.device)]
        parts.append((z * phi_mask.unsqueeze(-1)).flatten(1))
    return parts


def defended_features(clamp: Clamp, states: Mapping, sites: list[str], phi_mask: torch.Tensor) -> torch.Tensor:
    """Phi: E_S of the residual leaving every clamped site in ``sites``, at the rows of
    ``phi_mask`` (n, seq), stacked to (n, m)."""
    parts = defended_feature_parts(clamp, states, sites, phi_mask)
    return torch.cat(parts, dim=1) if parts else phi_mask.new_zeros((phi_mask.shape[0], 0), dtype=torch.float32)
