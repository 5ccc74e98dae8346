"""The drift penalty on the defended features Phi and the drift-correction steps.

PAPER_NOTES, "Reference hyperparameters": lambda_act weighs a relative drift penalty of the
defended features. Two forms (``RecoveryConfig.drift_penalty``):

- ``"relative_l2"`` (ours): ||Phi - Phi_def|| / (||Phi_def|| + 1e-8) over every clamped site at
  once, not squared;
- ``"relative_mse"`` (the reference code's ``activation_drift_loss(mode="relative_mse")``): per
  clamped site, mean((z - z_def)^2) / (mean(z_def^2) + 1e-6) over that site's covered rows and
  features (the denominator is a constant), then the mean over the sites: a SQUARED relative
  drift per layer.

Drift corrections (the reference's "extra drift-correction steps"): after the optimiser's step
and C4, a few plain gradient steps on the penalty alone, unprojected, each followed by C4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from saerecover.core.config import DRIFT_PENALTIES
from saerecover.core.projection import rescale_to_budget

#: The reference's epsilon in the relative_mse denominator.
RELATIVE_MSE_EPS = 1e-6


def drift_penalty(parts: Sequence[torch.Tensor], ref_parts: Sequence[torch.Tensor], phi_mask: torch.Tensor,
                  form: str) -> torch.Tensor:
    """Per-example drift penalty (n,) of Phi per site ``parts`` against the defended ``ref_parts``
    (each (n, seq * |S_site|), zero outside ``phi_mask`` (n, seq), as
    :func:`saerecover.core.projection.defended_feature_parts` gives them), in the form ``form``
    (see the module docstring). Differentiable in ``parts``."""
    if form not in DRIFT_PENALTIES:
        raise ValueError(f"unknown drift penalty {form!r}; valid: {', '.join(DRIFT_PENALTIES)}")
    n, seq = phi_mask.shape
    if not parts:
        return phi_mask.new_zeros(n, dtype=torch.float32)
    if form == "relative_l2":
        phi, ref = torch.cat(list(parts), dim=1), torch.cat(list(ref_parts), dim=1).detach()
        return (phi - ref).norm(dim=1) / (ref.norm(dim=1) + 1e-8)
    rows = phi_mask.sum(dim=1).to(torch.float32)
    total = parts[0].new_zeros(n)
    sites = parts[0].new_zeros(n)
    for z, ref in zip(parts, ref_parts):
        ref = ref.detach()
        count = rows * (z.shape[1] // max(seq, 1))
        covered = count > 0
        mse = (z - ref).pow(2).sum(dim=1) / count.clamp_min(1)
        scale = ref.pow(2).sum(dim=1) / count.clamp_min(1) + RELATIVE_MSE_EPS
        total = total + torch.where(covered, mse / scale, torch.zeros_like(mse))
        sites = sites + covered.to(total.dtype)
    return total / sites.clamp_min(1)


def correct_drift(deltas: Mapping[str, torch.Tensor], penalty: Callable[[dict[str, torch.Tensor]], torch.Tensor], *,
                  steps: int, lr: float, mask: torch.Tensor, budgets: torch.Tensor, active: torch.Tensor) -> None:
    """The reference's drift corrections, in place on ``deltas`` ({site: (n, seq, d)}, leaf
    tensors): ``steps`` times, delta <- delta - lr * d penalty / d delta at the optimised rows
    ``mask`` (n, seq) of the ``active`` examples (n,), unprojected, then C4 by rescaling to
    ``budgets`` (n,). penalty: deltas -> per-example penalty (n,) with the graph (a forward pass
    with the clamp active)."""
    names = list(deltas)
    rows = mask.unsqueeze(-1)
    keep = active.view(-1, 1, 1)
    for _ in range(int(steps)):
        live = {s: deltas[s].detach().requires_grad_(True) for s in names}
        pen = penalty(live)
        grads = torch.autograd.grad((pen * active).sum(), [live[s] for s in names], allow_unused=True)
        with torch.no_grad():
            old = {s: deltas[s].detach().clone() for s in names}
            new = {s: torch.where(keep, old[s] - lr * (g if g is not None else torch.zeros_like(old[s])) * rows, old[s])
                   for s, g in zip(names, grads)}
            final = rescale_to_budget(old, new, budgets, active)
            for s in names:
                deltas[s].copy_(final[s])
