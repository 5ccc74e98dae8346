"""Refusal features: harmful-vs-harmless activation contrast and the mean-activation clamp.

PAPER_NOTES, the refusal row: refusal SAE features at several layers are clamped to a
non-zero value. DESIGN's measured note on a toy Llama: multiplying the contrast features where
active induced no refusals (they were inactive on answered requests), while setting each one
to its mean activation on refused requests, at every position and layer, did. So:

- :func:`refusal_contrast`: per site, the mean activation of every feature over the prompt
  positions of refused requests and of answered requests, and their difference;
- :func:`select_refusal_features`: the top-k features by contrast per site (or a given list);
- :func:`mean_activation_clamp`: each selected feature set to its refused-request mean at every
  position of every chosen site (``Clamp.per_feature`` + ``Clamp.combine``);
- :func:`multiply_clamp`: the paper's clamp, each selected feature multiplied by a factor (3.0)
  at every position of every chosen site (:data:`CLAMPS` names both).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.selection import fewer_features_note
from saerecover.core.examples import Examples
from saerecover.core.sites import Site


@dataclass
class SiteContrast:
    """Per-feature statistics at one site, all (d_sae,) float32 on CPU.

    refused_mean / answered_mean: mean activation over the selected positions of all refused /
    answered prompts (every token counts once); contrast = refused_mean - answered_mean.
    """

    site: Site
    refused_mean: torch.Tensor
    answered_mean: torch.Tensor
    n_refused_tokens: int
    n_answered_tokens: int

    @property
    def contrast(self) -> torch.Tensor:
        return self.refused_mean - self.answered_mean


def mean_activations(model, sites: Sequence[Site], ex: Examples, *, positions: str = "prompt",
                     batch_size: int = 32) -> tuple[dict[str, torch.Tensor], int]:
    """Mean SAE activation per feature over the rows of ``ex.position_mask(positions)``
    ("prompt", "all", "answer" or "last" = the last real token), pooled over examples.
    Returns ({hook_name: (d_sae,)}, number of rows)."""
    if len(ex) == 0:
        raise ValueError("no examples to average activations over")
    names = [s.hook_name for s in sites]
    totals = {s.hook_name: torch.zeros(s.d_sae, dtype=torch.float64) for s in sites}
    rows = 0
    with torch.no_grad():
        for start in range(0, len(ex), batch_size):
            part = ex.select(list(range(start, min(start + batch_size, len(ex))))).to(model.device)
            if positions == "last":
                mask = torch.zeros_like(part.attention_mask, dtype=torch.bool)
                mask[torch.arange(len(part)), part.attention_mask.sum(1) - 1] = True
            else:
                mask = part.position_mask(positions)
            _, captured = model.forward(part.input_ids, part.attention_mask, capture=tuple(names))
            for s in sites:
                z = s.encode(captured[s.hook_name])[mask]
                totals[s.hook_name] += z.double().sum(dim=0).cpu()
            rows += int(mask.sum())
    return {k: (v / max(rows, 1)).float() for k, v in totals.items()}, rows


def refusal_contrast(model, sites: Sequence[Site], refused: Examples, answered: Examples, *,
                     positions: str = "prompt", batch_size: int = 32) -> dict[str, SiteContrast]:
    """Harmful-vs-harmless contrast at every site: mean activation on ``refused`` prompts minus
    mean activation on ``answered`` prompts (see :class:`SiteContrast`)."""
    if not sites:
        raise ValueError("give at least one site")
    for s in sites:
        if not isinstance(s, Site):
            raise TypeError(f"sites must be saerecover Site objects, got {type(s).__name__}")
        if s.hook_name not in model.site_names():
            raise ValueError(f"unknown hook name {s.hook_name!r}; valid sites: {model.site_names()}")
        s.check_model_width(model.d_model)
    r_mean, r_rows = mean_activations(model, sites, refused, positions=positions, batch_size=batch_size)
    a_mean, a_rows = mean_activations(model, sites, answered, positions=positions, batch_size=batch_size)
    return {s.hook_name: SiteContrast(s, r_mean[s.hook_name], a_mean[s.hook_name], r_rows, a_rows) for s in sites}


def select_refusal_features(contrast: Mapping[str, SiteContrast], top_k: int | Mapping[str, int] = 16, *,
                            features: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Per site, the ``top_k`` features with the largest positive contrast (sorted by index), or
    the given ``features`` for the sites it names. Returns {hook_name: (k,) long}."""
    out: dict[str, torch.Tensor] = {}
    for name, c in contrast.items():
        if features is not None and name in features:
            out[name] = c.site.check_features(torch.as_tensor(list(features[name]), dtype=torch.long))
            continue
        k = top_k[name] if isinstance(top_k, Mapping) else top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
        scores = c.contrast
        pos = torch.nonzero(scores > 0).flatten()
        if pos.numel() == 0:
            raise ValueError(f"no feature at {name!r} is more active on refused than on answered requests")
        order = torch.argsort(scores[pos], descending=True)[: int(k)]
        out[name] = pos[order].sort().values
        note = fewer_features_note(name, int(k), int(pos.numel()), "a positive refused-minus-answered contrast")
        if note is not None:
            warnings.warn(note, stacklevel=2)
    return out


def mean_activation_clamp(contrast: Mapping[str, SiteContrast], features: Mapping[str, torch.Tensor], *,
                          scale: float = 1.0, where: str = "all") -> Clamp:
    """Each selected feature set to ``scale`` x its mean activation on refused requests, at every
    position ("all") of every site in ``features`` (one ``Clamp.per_feature`` per site)."""
    parts = []
    for name, feats in features.items():
        c = contrast[name]
        idx = c.site.check_features(torch.as_tensor(feats, dtype=torch.long))
        parts.append(Clamp.per_feature(c.site, idx, c.refused_mean[idx] * float(scale), mode="set", where=where))
    if not parts:
        raise ValueError("no sites to clamp")
    return Clamp.combine(*parts)


def multiply_clamp(sites: Mapping[str, Site], features: Mapping[str, torch.Tensor], *, multiplier: float = 3.0,
                   where: str = "all") -> Clamp:
    """Each selected feature multiplied by ``multiplier`` at every position ("all") of every site
    in ``features``: the reference code's refusal clamp (``z[..., S] *= 3`` at every prompt,
    answer and generated position, the SAE error kept). sites: hook name -> Site."""
    parts = []
    for name, feats in features.items():
        if name not in sites:
            raise ValueError(f"no site for {name!r}; sites: {sorted(sites)}")
        site = sites[name]
        parts.append(Clamp({site: site.check_features(torch.as_tensor(feats, dtype=torch.long))},
                           value=float(multiplier), mode="multiply", where=where))
    if not parts:
        raise ValueError("no sites to clamp")
    return Clamp.combine(*parts)


#: The refusal clamps by name (``build_setting(clamp=...)``, ``--clamp``): "mean" (ours: each
#: feature set to its mean on refused requests) and "multiply" (the paper's: multiplied by 3).
CLAMPS = ("mean", "multiply")


def contrast_table(contrast: Mapping[str, SiteContrast], features: Mapping[str, torch.Tensor]) -> dict:
    """Plain-JSON description of the selection (for a run's config)."""
    out = {}
    for name, feats in features.items():
        c = contrast[name]
        idx = feats.long()
        out[name] = {
            "features": idx.tolist(),
            "contrast": [round(float(x), 6) for x in c.contrast[idx]],
            "refused_mean": [round(float(x), 6) for x in c.refused_mean[idx]],
            "answered_mean": [round(float(x), 6) for x in c.answered_mean[idx]],
            "n_refused_tokens": c.n_refused_tokens,
            "n_answered_tokens": c.n_answered_tokens,
        }
    return out


__all__ = ["CLAMPS", "SiteContrast", "contrast_table", "mean_activation_clamp", "mean_activations",
           "multiply_clamp", "refusal_contrast", "select_refusal_features"]
