"""What every projection mode shares: the per-batch context it is built with, the state of one
step it sees, the interface the recovery loop calls, and the flattening of an example's delta.

Deltas are dicts ``{hook_name: (n, seq, d)}``; an example's delta vector is its optimized rows of
every delta site, concatenated in site order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.config import RecoveryConfig

Deltas = dict[str, torch.Tensor]


@dataclass
class StepContext:
    """One batch's recovery as a mode sees it.

    sites: the delta sites, in model order; phi_sites: the clamped sites Phi covers (every
    clamped site at or after the first delta site); mask: (n, seq) the optimized rows;
    phi_mask: (n, seq) the rows Phi covers; rectified: per phi site, whether the encoder has
    zero derivative wherever a feature is zero (ReLU, JumpReLU, TopK), so that J's rows for
    zero coordinates are exactly zero.
    """

    clamp: Clamp
    cfg: RecoveryConfig
    sites: list[str]
    phi_sites: list[str]
    mask: torch.Tensor
    phi_mask: torch.Tensor
    rectified: list[bool]
    example_ids: list[str]


@dataclass
class StepState:
    """One optimisation step: the deltas (attached to the graph), Phi per site and stacked
    (attached; None when no mode or penalty needs it), Phi of the defended state, which
    examples are still optimized, and the residual each Phi site encodes (h_rec, detached;
    None when Phi is not needed)."""

    step: int
    deltas: Mapping[str, torch.Tensor]
    phi_parts: list[torch.Tensor] | None
    phi: torch.Tensor | None
    phi_ref: torch.Tensor
    active: torch.Tensor
    phi_inputs: Mapping[str, torch.Tensor] | None = None


class ProjectionMode:
    """A projection mode. The recovery loop, at every step: computes the loss gradient, hands it
    to :meth:`project_gradient` (the paper's projected gradient), lets the optimizer take its
    step, then hands the old and new deltas to :meth:`take_step`, which returns the deltas
    applied next (the constraint enforced on what is applied, and C4). Per-example extras go
    into each step's history (:meth:`history_fields`) and the final metrics (:meth:`metrics`).
    """

    #: the name under which :data:`saerecover.core.projection.PROJECTIONS` registers the mode
    name: ClassVar[str] = ""
    #: Phi (and its graph) is needed at every step
    needs_phi: ClassVar[bool] = False
    #: the gradient is projected off the row space of J = dPhi/d delta (exactly or by a sketch):
    #: where the reference's options act (the drift penalty added after the projection, the
    #: drift-correction steps; RecoveryConfig.penalty_after_projection, drift_correction_steps)
    row_space: ClassVar[bool] = False

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def project_gradient(self, grads: Deltas, state: StepState) -> Deltas:
        """The gradient the optimizer sees (masked to the optimized rows already)."""
        return grads

    def take_step(self, old: Deltas, new: Deltas, budgets: torch.Tensor, active: torch.Tensor) -> Deltas:
        """The deltas applied next, from the deltas before (``old``) and after (``new``, masked
        to the optimized rows) the optimizer's step. Default: C4 by rescaling, as the paper."""
        return rescale_to_budget(old, new, budgets, active)

    def history_fields(self, i: int) -> dict[str, Any]:
        """Extra fields of example ``i``'s history entry for the step just taken."""
        return {}

    def metrics(self, i: int) -> dict[str, Any]:
        """Extra final metrics of example ``i``."""
        return {}


def rescale_to_budget(old: Deltas, new: Deltas, budgets: torch.Tensor, active: torch.Tensor) -> Deltas:
    """C4 by rescaling: each active example's delta (all sites together) scaled down to its
    budget when it is over it (rescaling keeps encoder-null rows in the null space); inactive
    examples keep ``old``."""
    n = budgets.shape[0]
    norms = torch.sqrt(sum(v.pow(2).flatten(1).sum(1) for v in new.values()))
    scale = torch.clamp(budgets / norms.clamp_min(1e-30), max=1.0).view(n, 1, 1)
    keep = active.view(n, 1, 1)
    return {s: torch.where(keep, new[s] * scale, old[s]) for s in new}


def flatten_example(deltas: Mapping[str, torch.Tensor], b: int, mask: torch.Tensor) -> torch.Tensor:
    """Example b's optimized rows of every delta site as one vector, (sites * rows * d,)."""
    return torch.cat([d[b][mask[b]].reshape(-1) for d in deltas.values()])


def unflatten_example(vec: torch.Tensor, like: Mapping[str, torch.Tensor], b: int, mask: torch.Tensor,
                      out: Mapping[str, torch.Tensor]) -> None:
    """Write vec (from :func:`flatten_example`) into ``out[site][b]`` at the masked rows."""
    rows = int(mask[b].sum())
    offset = 0
    for name, d in like.items():
        size = rows * d.shape[-1]
        out[name][b][mask[b]] = vec[offset:offset + size].reshape(rows, d.shape[-1]).to(out[name].dtype)
        offset += size
