"""Clamps: what the defender does to a feature set at one or more sites.

A clamp replaces the selected features' activations and keeps the SAE's error term
(PAPER_NOTES, "The question"):  h_def = h + D(clamp_S(E(h))) - D(E(h)).
Nothing is detached, so gradients through a clamped site are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from saerecover.core.sites import Site, at_least_f32

ClampMode = Literal["set", "multiply", "zero"]
ClampWhere = Literal["all", "active"]
CLAMP_MODES = ("set", "multiply", "zero")
CLAMP_WHERE = ("all", "active")


@dataclass(frozen=True, eq=False)
class SiteClamp:
    """The clamp at one site: ``features`` (1-D long) set to / multiplied by ``value``."""

    site: Site
    features: torch.Tensor
    mode: ClampMode = "set"
    value: float | torch.Tensor = 0.0  # a number, or one value per feature (|S|,)
    where: ClampWhere = "all"

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """clamp_S(z): z (..., d_sae) -> a new tensor with the clamped features replaced."""
        if self.features.numel() == 0:
            return z
        idx = self.features.to(z.device)
        selected = z[..., idx]
        value = self.value.to(selected) if isinstance(self.value, torch.Tensor) else self.value
        if self.mode == "multiply":
            replacement = selected * value
        elif self.mode == "zero":
            replacement = torch.zeros_like(selected)
        else:
            replacement = torch.zeros_like(selected) + value
        if self.where == "active":
            replacement = torch.where(selected > 0, replacement, selected)
        out = z.clone()
        out[..., idx] = replacement
        return out

    def defend(self, h: torch.Tensor) -> torch.Tensor:
        """h_def = h + D(clamp(E(h))) - D(E(h)), in h's dtype, differentiable in h."""
        if self.features.numel() == 0:
            return h
        z = self.site.encode(h)
        correction = self.site.decode(self.apply(z)) - self.site.decode(z)
        return (at_least_f32(h) + correction).to(h.dtype)

    def describe(self) -> dict:
        """The site's clamp as plain JSON (a run's config); ``neuronpedia_id`` only when the
        SAE's metadata has one (reports link its features; without it the config, and so
        the config hash of runs on local SAEs, stays as it was)."""
        out = {
            "hook_name": self.site.hook_name,
            "features": [int(i) for i in self.features.tolist()],
            "mode": self.mode,
            "value": self.value.tolist() if isinstance(self.value, torch.Tensor) else float(self.value),
            "where": self.where,
            "sae": self.site.source,
            "center_input": self.site.center_input,
        }
        if self.site.neuronpedia_id is not None:
            out["neuronpedia_id"] = self.site.neuronpedia_id
        return out


class Clamp:
    """A defender's intervention over any number of sites.

    >>> clamp = Clamp({site: [3, 17, 42]}, value=-5.0, where="active")

    features: a mapping from Site to feature indices. mode: "set" (to ``value``),
    "multiply" (by ``value``) or "zero" (zero-ablation). where: "all" positions or only where
    the feature is "active" (> 0). Use :meth:`combine` for different settings per site.
    """

    def __init__(
        self,
        features: Mapping[Site, Iterable[int] | torch.Tensor] | None = None,
        *,
        value: float = 0.0,
        mode: ClampMode = "set",
        where: ClampWhere = "all",
    ) -> None:
        if mode not in CLAMP_MODES:
            raise ValueError(f"unknown clamp mode {mode!r}; valid: {', '.join(CLAMP_MODES)}")
        if where not in CLAMP_WHERE:
            raise ValueError(f"unknown clamp where {where!r}; valid: {', '.join(CLAMP_WHERE)}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"clamp value must be a number, got {value!r}") from None
        if not torch.isfinite(torch.tensor(value)):
            raise ValueError(f"clamp value must be finite, got {value}")
        if features is not None and not isinstance(features, Mapping):
            raise TypeError(f"clamp features must be a dict {{site: feature indices}}, got {type(features).__name__}")
        self.site_clamps: list[SiteClamp] = []
        for site, feats in (features or {}).items():
            if not isinstance(site, Site):
                raise TypeError(f"clamp keys must be Site objects (see saerecover.load_site), got {type(site).__name__}")
            if not isinstance(feats, torch.Tensor):
                if isinstance(feats, (str, bytes)) or not isinstance(feats, Iterable):
                    raise TypeError(f"feature indices for site {site.hook_name!r} must be a list or 1-D tensor "
                                    f"of integers, got {type(feats).__name__}")
                feats = list(feats)
            # an empty set clamps nothing (recover refuses it: nothing would be defended)
            idx = site.check_features(torch.as_tensor(feats) if len(feats) else torch.zeros(0, dtype=torch.long))
            self._add(SiteClamp(site, idx, mode, value, where))

    def _add(self, sc: SiteClamp) -> None:
        if any(existing.site.hook_name == sc.site.hook_name for existing in self.site_clamps):
            raise ValueError(f"site {sc.site.hook_name!r} is clamped twice; merge its features into one clamp")
        self.site_clamps.append(sc)

    @classmethod
    def per_feature(cls, site: Site, features, values, *, mode: ClampMode = "set", where: ClampWhere = "all") -> "Clamp":
        """A clamp at one site with one value per feature (e.g. each feature's mean activation
        on refused requests)."""
        out = cls()
        idx = site.check_features(torch.as_tensor(features, dtype=torch.long))
        vals = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if vals.numel() != idx.numel():
            raise ValueError(f"per-feature clamp at {site.hook_name!r}: {idx.numel()} features but {vals.numel()} values")
        if not torch.isfinite(vals).all():
            raise ValueError(f"per-feature clamp values at {site.hook_name!r} must be finite")
        if mode not in CLAMP_MODES or where not in CLAMP_WHERE:
            raise ValueError(f"clamp mode must be one of {CLAMP_MODES} and where one of {CLAMP_WHERE}")
        out._add(SiteClamp(site, idx, mode, vals, where))
        return out

    @classmethod
    def combine(cls, *clamps: "Clamp") -> "Clamp":
        """One clamp from several (each may use its own mode and value)."""
        out = cls()
        for c in clamps:
            for sc in c.site_clamps:
                out._add(sc)
        return out

    @property
    def sites(self) -> list[Site]:
        return [sc.site for sc in self.site_clamps]

    def at(self, hook_name: str) -> SiteClamp | None:
        for sc in self.site_clamps:
            if sc.site.hook_name == hook_name:
                return sc
        return None

    def __len__(self) -> int:
        return len(self.site_clamps)

    def describe(self) -> list[dict]:
        return [sc.describe() for sc in self.site_clamps]

    def __repr__(self) -> str:
        parts = [f"{sc.site.hook_name}: {sc.features.numel()} features {sc.mode} {sc.value} ({sc.where})"
                 for sc in self.site_clamps]
        return f"Clamp({'; '.join(parts)})"
