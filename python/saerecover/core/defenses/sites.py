"""Site clamps of the defenses: :class:`~saerecover.core.clamp.SiteClamp` with another
``defend(h)``, so that the defended model, every projection mode and every metric use them as
they use the clamp (the clamped features S and their values stay what the task chose)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from saerecover.core.clamp import SiteClamp
from saerecover.core.defenses.base import ablate, orthonormal_basis
from saerecover.core.sites import at_least_f32


def derive(sc: SiteClamp, cls: type, **extra: Any) -> SiteClamp:
    """A site clamp of type ``cls`` with ``sc``'s site, features, mode, value and where."""
    base = {f.name: getattr(sc, f.name) for f in fields(SiteClamp)}
    return cls(**base, **extra)


def decoder_basis(sc: SiteClamp) -> torch.Tensor:
    """An orthonormal basis (k, d_model) of the clamped features' decoder directions W_dec[S]."""
    w = sc.site.sae.W_dec[sc.features.to(sc.site.sae.W_dec.device)]
    return orthonormal_basis(w.detach())


def basis_digest(basis: torch.Tensor) -> str:
    """A short, stable name of a basis for a run's config (rounded to 1e-5, sha256)."""
    data = np.round(basis.detach().double().cpu().numpy(), 5) + 0.0  # + 0.0: -0.0 and 0.0 alike
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def sae_error(sc: SiteClamp, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z = E(h), the SAE error h - D(E(h))), float32 or better."""
    z = sc.site.encode(h)
    return z, at_least_f32(h) - sc.site.decode(z)


@dataclass(frozen=True, eq=False)
class ErrorMeanSiteClamp(SiteClamp):
    """h_def = D(clamp_S(E(h))) + e_mean: the SAE error replaced by its mean ``error_mean``
    (d_model,) over a reference set, so nothing outside the SAE's features reaches the model."""

    error_mean: torch.Tensor | None = None

    def defend(self, h: torch.Tensor) -> torch.Tensor:
        z = self.site.encode(h)
        out = self.site.decode(self.apply(z)) + self.error_mean.to(device=h.device, dtype=at_least_f32(h).dtype)
        return out.to(h.dtype)

    def describe(self) -> dict:
        return {**super().describe(), "defense": "error-mean",
                "error_mean_digest": basis_digest(self.error_mean.reshape(1, -1))}


@dataclass(frozen=True, eq=False)
class ErrorProjSiteClamp(SiteClamp):
    """h_def = D(clamp_S(E(h))) + (I - P_S)(h - D(E(h))): the SAE error kept but for its part
    along the clamped features' decoder directions (``basis``, orthonormal rows)."""

    basis: torch.Tensor | None = None

    def defend(self, h: torch.Tensor) -> torch.Tensor:
        z, err = sae_error(self, h)
        return (self.site.decode(self.apply(z)) + ablate(err, self.basis)).to(h.dtype)

    def describe(self) -> dict:
        return {**super().describe(), "defense": "error-proj", "basis_rank": int(self.basis.shape[0])}


@dataclass(frozen=True, eq=False)
class DirAblateSiteClamp(SiteClamp):
    """h_def = h - P_S h: directional ablation of the clamped features' decoder directions
    (``basis``, orthonormal rows) from the residual; the SAE is not run."""

    basis: torch.Tensor | None = None

    def defend(self, h: torch.Tensor) -> torch.Tensor:
        return ablate(h, self.basis).to(h.dtype)

    def describe(self) -> dict:
        return {**super().describe(), "defense": "dir-ablate", "basis_rank": int(self.basis.shape[0])}


@dataclass(frozen=True, eq=False)
class HardenedSiteClamp(SiteClamp):
    """h_def = (I - P_U)(clamp(h)): the clamp, then the ablation of a subspace U (``basis``,
    orthonormal rows) grown from earlier rounds' recovered deltas."""

    basis: torch.Tensor | None = None
    round: int = 0

    def defend(self, h: torch.Tensor) -> torch.Tensor:
        return ablate(SiteClamp.defend(self, h), self.basis).to(h.dtype)

    def describe(self) -> dict:
        return {**super().describe(), "defense": "hardened", "round": self.round,
                "basis_rank": int(self.basis.shape[0]), "basis_digest": basis_digest(self.basis)}
