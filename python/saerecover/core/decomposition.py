"""The recovery-path decomposition of a delta (PAPER_NOTES, "Recovery-path attribution"): how
much of it the SAE explains, on clamped and non-clamped features, and what it leaves in the
SAE error. Norms only; the replays that are the evidence live in experiments.attribution."""

from __future__ import annotations

from typing import Any

import torch

from saerecover.core.metrics import EPS
from saerecover.core.sites import Site

#: The recovery-path components (PAPER_NOTES, "Recovery-path attribution"), in report order.
#: delta: the full perturbation; sae_explained: D(E(h_rec)) - D(E(h_def)); clamped /
#: nonclamped: dz on / off the clamped features, decoded; topk_nonclamped: dz of the top-k
#: non-clamped features (by ||dz_j|| over the rows), decoded; topk_knockout: delta minus
#: that; residual: delta_res = delta - sae_explained (the SAE-unexplained part).
COMPONENTS = ("delta", "sae_explained", "clamped", "nonclamped", "topk_nonclamped", "topk_knockout",
              "residual")


DEFAULT_TOP_K = 10


def _rank_nonclamped(dz: torch.Tensor, idx: torch.Tensor, top_k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(moved, top, strength): the non-clamped features that moved at all (dz != 0 on some row;
    only those are decoded, d_sae may be 10^5), the ``top_k`` of them by ||dz_j|| over the rows
    (largest first, ties by index), and those norms."""
    clamped_mask = torch.zeros(dz.shape[-1], dtype=torch.bool, device=dz.device)
    clamped_mask[idx] = True
    moved = ((dz != 0).any(dim=0) & ~clamped_mask).nonzero().flatten()
    strength = dz[:, moved].norm(dim=0)
    order = torch.argsort(strength, descending=True, stable=True)[:min(int(top_k), int(moved.numel()))]
    return moved, moved[order], strength[order]


def recovery_features(site: Site, features: torch.Tensor, h_def: torch.Tensor, delta: torch.Tensor, *,
                      top_k: int = 5) -> list[tuple[int, float]]:
    """The ``top_k`` non-clamped features that carry a recovery: ``(feature, ||dz_j||)`` with
    dz = E(h_def + delta) - E(h_def) over the rows, largest first (the features of the
    ``topk_nonclamped`` component of :func:`decompose`). h_def, delta: (rows, d_model)."""
    with torch.no_grad():
        idx, _, _, z_def, z_rec = _encoded(site, features, h_def, delta, top_k)
        _, top, strength = _rank_nonclamped(z_rec - z_def, idx, top_k)
    return [(int(j), float(v)) for j, v in zip(top.tolist(), strength.tolist())]


def _encoded(site: Site, features: torch.Tensor, h_def: torch.Tensor, delta: torch.Tensor, top_k: int
             ) -> tuple[torch.Tensor, ...]:
    """The checked inputs on the SAE's device, float32, and their codes: (feature indices,
    h_def, delta, z_def = E(h_def), z_rec = E(h_def + delta))."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    dev = site.sae.W_dec.device
    idx = site.check_features(features).to(dev)
    h_def = h_def.to(dev, torch.float32)
    delta = delta.to(dev, torch.float32)
    return idx, h_def, delta, site.encode(h_def), site.encode(h_def + delta)


def decompose(site: Site, features: torch.Tensor, h_def: torch.Tensor, delta: torch.Tensor, *,
              top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """The recovery-path decomposition of one example's delta, norms only (no replay).

    h_def, delta: (rows, d_model) at the delta site, in the model's residual coordinates (the
    site applies its own input map, e.g. centring). With dz = E(h_def + delta) - E(h_def) over
    all features, returns ``components`` (name -> (rows, d_model) float32, see
    :data:`COMPONENTS`), ``norms`` (Frobenius), ``shares`` (norm / ||delta||) and
    ``energy`` (squared share), ``dz`` (rows, d_sae), ``topk_features`` (the top-k non-clamped
    features, by the L2 norm of dz over the rows, largest first) and ``n_changed`` (how many
    non-clamped features moved at all). Identities: residual + sae_explained = delta, and
    clamped + nonclamped = sae_explained when the decoder is affine.
    """
    with torch.no_grad():
        idx, h_def, delta, z_def, z_rec = _encoded(site, features, h_def, delta, top_k)
        dz = z_rec - z_def
        explained = site.decode(z_rec) - site.decode(z_def)

        moved, top, _ = _rank_nonclamped(dz, idx, top_k)
        clamped = site.decode_features(dz[:, idx], idx)
        nonclamped = site.decode_features(dz[:, moved], moved)
        topk = site.decode_features(dz[:, top], top)

        comps = {
            "delta": delta,
            "sae_explained": explained,
            "clamped": clamped,
            "nonclamped": nonclamped,
            "topk_nonclamped": topk,
            "topk_knockout": delta - topk,
            "residual": delta - explained,
        }
        norms = {name: float(c.double().norm()) for name, c in comps.items()}
    ref = norms["delta"]
    return {
        "components": comps,
        "norms": norms,
        "shares": {name: v / (ref + EPS) for name, v in norms.items()},
        "energy": {name: (v / (ref + EPS)) ** 2 for name, v in norms.items()},
        "dz": dz,
        "topk_features": top.cpu(),
        "n_changed": int(moved.numel()),
    }
