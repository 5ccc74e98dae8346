"""Per-example recovery metrics (PAPER_NOTES, "Metrics"), computed on what was applied.

All metrics are taken over the optimized rows of one example at the delta site:
z_def = E_S(h_def), z_rec = E_S(h_rec) with h_rec the residual the model actually saw.

Attention sinks: in real models the residual at the first position can be 100x the median row
norm (SmolLM2-135M: ~23,600 against ~175). No relative metric lets such a row set its scale:
- ``relative_delta_norm`` divides by sqrt(R) x the median row norm of h_def over the R optimized
  rows (:func:`row_scale`, the scale relative budgets use), which is ||h_def||_F when every row
  has the same norm;
- ``relative_drift`` and ``floor_violation`` are taken over the non-sink rows only: a sink row
  is one whose ||h_def|| exceeds ``SINK_NORM_RATIO`` x that median (:func:`sink_rows`). The
  absolute ``activation_drift`` and ``decode_drift`` keep every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saerecover.core.sites import Site

EPS = 1e-8
#: ||z_def|| at or below this makes the relative metrics undefined (NaN, stored as null): a
#: clamp to a value <= 0 leaves E(h_def) = 0 on the clamped features, and dividing by EPS there
#: would report 1e7-sized "relative drifts" that mean nothing. Summaries count them apart.
UNDEFINED_BELOW = 1e-6
#: A row whose defended residual norm exceeds this many times the median row norm of the
#: example's optimized rows is an attention-sink row (left out of the relative drifts).
SINK_NORM_RATIO = 10.0


@dataclass
class SiteFeatures:
    """The clamped features at the optimized rows of one example: (rows, |S|) float32."""

    z_def: torch.Tensor
    z_rec: torch.Tensor


def clamped_features(site: Site, features: torch.Tensor, h_def: torch.Tensor, h_rec: torch.Tensor) -> SiteFeatures:
    """E_S of the defended and recovered residual rows (rows, d_model) -> (rows, |S|)."""
    idx = features.to(h_def.device)
    with torch.no_grad():
        z_def = site.encode(h_def)[..., idx]
        z_rec = site.encode(h_rec)[..., idx]
    return SiteFeatures(z_def=z_def.float(), z_rec=z_rec.float())


def row_scale(rows: torch.Tensor) -> torch.Tensor:
    """sqrt(R) x the median L2 norm of ``rows`` (R, d) (the lower median for even R), float32."""
    norms = rows.float().norm(dim=-1).flatten()
    return norms.median() * norms.numel() ** 0.5 if norms.numel() else norms.new_zeros(())


def sink_rows(h_def_rows: torch.Tensor, ratio: float = SINK_NORM_RATIO) -> torch.Tensor:
    """(R,) bool: the rows whose norm exceeds ``ratio`` x the median row norm (attention sinks)."""
    norms = h_def_rows.float().reshape(-1, h_def_rows.shape[-1]).norm(dim=-1)
    if norms.numel() == 0:
        return norms.bool()
    return norms > ratio * norms.median()


def residual_scales(states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per example, the scale relative budgets are measured against: sqrt(R) x the median row norm
    of the defended residual over its R optimized rows (``mask`` (n, seq)) at every delta site
    (``states``: each (n, seq, d)), (n,) float32 on the states' device.

    This is ||h_def||_F over those rows when every row has the same norm (and the row's norm for
    one row), but a few attention-sink rows (a real model's first position can be 100x the median
    norm) do not inflate it: a budget relative to the Frobenius norm would grow with them.
    """
    out = []
    for i in range(mask.shape[0]):
        out.append(row_scale(torch.cat([h[i][mask[i]] for h in states])))
    return torch.stack(out) if out else mask.new_zeros(0, dtype=torch.float32)


def c1_residual(a: torch.Tensor, delta_rows: torch.Tensor) -> float:
    """C1 check: max over rows of ||A_S^T delta|| / (||A_S||_2 ||delta|| + eps), float64.

    a: (d_model, |S|) encoder columns as seen from the residual; delta_rows: (rows, d_model).
    """
    if a.numel() == 0 or delta_rows.numel() == 0:
        return 0.0
    a64 = a.detach().to("cpu", torch.float64)
    d64 = delta_rows.detach().to("cpu", torch.float64)
    spectral = torch.linalg.matrix_norm(a64, ord=2)
    num = (d64 @ a64).norm(dim=-1)
    den = spectral * d64.norm(dim=-1) + EPS
    return float((num / den).max())


def example_metrics(
    *,
    site: Site,
    features: torch.Tensor,
    feats: SiteFeatures,
    delta_rows: torch.Tensor,
    h_def_rows: torch.Tensor,
    a: torch.Tensor,
    recovered: bool,
    eta: float = 0.0,
) -> dict[str, float | bool]:
    """Every per-example metric of PAPER_NOTES plus ``c1_residual``.

    A (row, feature) pair is eligible when the clamp silenced it (z_def <= eta) and reactivated
    when it is eligible and z_rec > eta (the reference code's ``eligible`` / ``reactivated``).
    reactivated_fraction: reactivated / all (row, feature) pairs.
    reactivated_fraction_eligible: reactivated / eligible pairs (0 when none is eligible); its mean
    over the valid examples is the paper's "reactivated-feature fraction" (0.016 on IOI).
    zero_reactivation: recovered and no pair reactivated, i.e. max_i z_i(h_rec) <= eta over the
    eligible pairs only (PAPER_NOTES' "max over S" read as the reference code counts it: a feature
    the clamp left above eta does not count against it).
    """
    with torch.no_grad():
        return _example_metrics(site, features, feats, delta_rows, h_def_rows, a, recovered, eta)


def _example_metrics(site, features, feats, delta_rows, h_def_rows, a, recovered, eta):
    dz = feats.z_rec - feats.z_def
    activation_drift = float(dz.norm())
    decode_drift = float(site.decode_features(dz, features.to(dz.device)).norm())
    rows = ~sink_rows(h_def_rows).to(dz.device)  # (rows,): the relative drifts leave sink rows out
    def_norm = float(feats.z_def[rows].norm())
    relative_drift_num = float(dz[rows].norm())
    floor = float(torch.clamp(feats.z_def[rows] - feats.z_rec[rows], min=0).norm())
    silenced = feats.z_def <= eta
    reactivated = silenced & (feats.z_rec > eta)
    n_pairs = feats.z_def.numel()
    n_eligible = int(silenced.sum())
    delta_norm = float(delta_rows.float().norm())
    return {
        "activation_drift": activation_drift,
        "decode_drift": decode_drift,
        "relative_drift": _relative(relative_drift_num, def_norm),
        "floor_violation": _relative(floor, def_norm),
        "reactivated_fraction": float(reactivated.sum()) / n_pairs if n_pairs else 0.0,
        "reactivated_fraction_eligible": float(reactivated.sum()) / max(n_eligible, 1),
        "zero_reactivation": bool(recovered and not bool(reactivated.any())),
        "delta_norm": delta_norm,
        "relative_delta_norm": delta_norm / (float(row_scale(h_def_rows)) + EPS),
        "c1_residual": c1_residual(a, delta_rows),
    }


def _relative(value: float, def_norm: float) -> float:
    """``value / (||z_def|| + EPS)`` (PAPER_NOTES), NaN where ||z_def|| <= UNDEFINED_BELOW."""
    return value / (def_norm + EPS) if def_norm > UNDEFINED_BELOW else math.nan
