"""``jacobian``: every step taken orthogonal to the row space of the exact Jacobian J = dPhi/d delta
of all defended features at that step (PAPER_NOTES, cross-layer clamps), solved by
``saerecover.linalg.jacobian_null_project``.

J is built from packed vector-Jacobian products (coordinates at 0 skipped where the encoder is
rectified; one product serves the whole batch). The gradient is projected, and so is the step
the optimizer actually took; C4 at the budget pulls delta back along its own null-space part
(also orthogonal to J's rows) or shortens the step, never rotates it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from saerecover import linalg
from saerecover.core.projection.base import (
    Deltas,
    ProjectionMode,
    StepContext,
    StepState,
    flatten_example,
    unflatten_example,
)

#: A step shorter than this fraction of ||delta|| is not taken (C4 at the budget shrinks steps
#: toward 0; storing delta + step in float32 would then add round-off of relative size ~1e-7
#: ||delta|| in arbitrary directions, larger than the step's own first-order drift).
MIN_RELATIVE_STEP = 1e-3


def packed_jacobians(parts: list[torch.Tensor], deltas: Mapping[str, torch.Tensor], mask: torch.Tensor,
                     skip_zero: list[bool], *, phi_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per-example J_b = dPhi_b/d delta_b (m_b, sites * rows_b * d), rows in site order.

    parts: Phi per site (:func:`defended_feature_parts`), each still attached to the graph.
    Examples are independent, so one vector-Jacobian product serves every example at once,
    each with its own coordinate: VJP j seeds the j-th kept coordinate of every example, and a
    site costs max_b(kept_b) products (batched with ``is_grads_batched``), each through that
    site's part of the graph only. skip_zero[s]: drop coordinates that are 0 (rectified
    encoders have zero derivative there, so those rows of J are exactly 0). phi_mask: (n, seq),
    the rows Phi covers (other coordinates are 0 by construction and always dropped).
    """
    n = mask.shape[0]
    names = list(deltas)
    dev = mask.device
    per_example: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for part, sparse in zip(parts, skip_zero):
        if sparse:
            keep = part.detach() != 0
        elif phi_mask is not None:
            keep = phi_mask.repeat_interleave(part.shape[1] // max(phi_mask.shape[1], 1), dim=1).to(part.device)
        else:
            keep = torch.ones_like(part, dtype=torch.bool)
        counts = keep.sum(dim=1)
        k = int(counts.max()) if n else 0
        if k == 0:
            continue
        # slot j of example b holds its j-th kept coordinate
        slot = torch.cumsum(keep.long(), dim=1) - 1
        b_idx, c_idx = keep.nonzero(as_tuple=True)
        seeds = torch.zeros((k, *part.shape), dtype=part.dtype, device=part.device)
        seeds[slot[b_idx, c_idx], b_idx, c_idx] = 1.0
        inputs = [deltas[nm] for nm in names]
        try:
            grads = torch.autograd.grad(part, inputs, grad_outputs=seeds, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one product at a time
            per = [torch.autograd.grad(part, inputs, grad_outputs=seeds[j], retain_graph=True, allow_unused=True)
                   for j in range(k)]
            grads = tuple(torch.stack([p[i] if p[i] is not None else torch.zeros_like(deltas[nm]) for p in per])
                          for i, nm in enumerate(names))
        grads = [g if g is not None else deltas[nm].new_zeros((k, *deltas[nm].shape)) for nm, g in zip(names, grads)]
        for b in range(n):
            kb = int(counts[b])
            if kb:
                per_example[b].append(torch.cat([g[:kb, b][:, mask[b].to(dev)].reshape(kb, -1) for g in grads], dim=1))
    out = []
    for b in range(n):
        width = int(mask[b].sum()) * sum(int(deltas[nm].shape[-1]) for nm in names)
        first = next(iter(deltas.values()))
        out.append(torch.cat(per_example[b], dim=0) if per_example[b]
                   else first.new_zeros((0, width)))
    return out


def batched_vjp_jacobian(phi: torch.Tensor, deltas: Mapping[str, torch.Tensor], coords: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of J = dPhi/d delta for the coordinates ``coords`` of Phi (n, m).

    One vector-Jacobian product per coordinate, batched over coordinates with
    ``is_grads_batched`` (examples are independent, so one product serves the whole batch).
    Returns {site: (len(coords), n, seq, d)}.
    """
    k = int(coords.numel())
    names = list(deltas)
    if k == 0:
        return {nm: deltas[nm].new_zeros((0, *deltas[nm].shape)) for nm in names}
    seeds = torch.zeros((k, *phi.shape), dtype=phi.dtype, device=phi.device)
    seeds[torch.arange(k, device=phi.device), :, coords.to(phi.device)] = 1.0
    try:
        grads = torch.autograd.grad(phi, [deltas[nm] for nm in names], grad_outputs=seeds,
                                    is_grads_batched=True, retain_graph=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one product at a time
        per = [torch.autograd.grad(phi, [deltas[nm] for nm in names], grad_outputs=seeds[j],
                                   retain_graph=True, allow_unused=True) for j in range(k)]
        grads = tuple(torch.stack([p[i] if p[i] is not None else torch.zeros_like(deltas[nm]) for p in per])
                      for i, nm in enumerate(names))
    return {nm: (g if g is not None else deltas[nm].new_zeros((k, *deltas[nm].shape))) for nm, g in zip(names, grads)}


def example_jacobians(jac: Mapping[str, torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-example J_b (m, sites * rows_b * d) from :func:`batched_vjp_jacobian` output."""
    n = mask.shape[0]
    out = []
    for b in range(n):
        parts = [g[:, b][:, mask[b]].reshape(g.shape[0], -1) for g in jac.values()]
        out.append(torch.cat(parts, dim=1))
    return out


def shrink_to_budget(old: torch.Tensor, step: torch.Tensor, budget: float) -> float:
    """Largest alpha in [0, 1] with ||old + alpha step|| <= budget (C4 without leaving J's null
    space: the step is shortened, never rotated)."""
    ss = float(step @ step)
    if ss == 0.0:
        return 1.0
    os_ = float(old @ step)
    slack = budget * budget - float(old @ old)
    if float((old + step) @ (old + step)) <= budget * budget:
        return 1.0
    disc = max(os_ * os_ + ss * max(slack, 0.0), 0.0)
    return max(0.0, min(1.0, (-os_ + disc ** 0.5) / ss))


def budget_step(old: torch.Tensor, step: torch.Tensor, old_null: torch.Tensor, budget: float) -> torch.Tensor:
    """Jacobian mode's C4: ``step`` and ``old_null`` (the part of ``old`` in J's null space) are
    orthogonal to J's rows, so is ``step - gamma * old_null``; take the smallest gamma >= 0 that
    brings ||old + step - gamma old_null|| down to the budget, else shorten the step."""
    w = old + step
    excess = float(w @ w) - budget * budget
    if excess <= 0:
        return step
    a = float(old_null @ old_null)
    b = float(w @ old_null)
    disc = b * b - a * excess
    if a > 0 and b > 0 and disc >= 0:
        return step - ((b - disc ** 0.5) / a) * old_null
    return shrink_to_budget(old, step, budget) * step


def _spectral_norm(j: torch.Tensor) -> torch.Tensor:
    """||J||_2 from the smaller Gram matrix, float64."""
    gram = j @ j.T if j.shape[0] <= j.shape[1] else j.T @ j
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()


class ExactJacobian(ProjectionMode):
    """The exact Jacobian mode. Records, per example, the first-order drift of every step taken,
    ||J step|| / (||J|| ||step||): in the step's history (``first_order_drift``) and its maximum
    over the run (metric ``jacobian_step_residual``)."""

    name = "jacobian"
    needs_phi = True
    row_space = True

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        n = ctx.mask.shape[0]
        self.jacs: list[torch.Tensor] = []
        self.first_order = torch.zeros(n, dtype=torch.float64)
        self.step_ratio = torch.full((n,), math.nan, dtype=torch.float64)

    def project_gradient(self, grads: Deltas, state: StepState) -> Deltas:
        ctx = self.ctx
        assert state.phi_parts is not None
        self.jacs = packed_jacobians(state.phi_parts, state.deltas, ctx.mask, ctx.rectified, phi_mask=ctx.phi_mask)
        projected = {s: torch.zeros_like(g) for s, g in grads.items()}
        for b in range(ctx.mask.shape[0]):
            g_b = flatten_example(grads, b, ctx.mask)
            unflatten_example(linalg.jacobian_null_project(self.jacs[b], g_b, rcond=ctx.cfg.rcond), grads, b,
                              ctx.mask, projected)
        return projected

    def take_step(self, old: Deltas, new: Deltas, budgets: torch.Tensor, active: torch.Tensor) -> Deltas:
        ctx = self.ctx
        mask = ctx.mask
        final = {s: old[s].clone() for s in old}
        for b in torch.nonzero(active).flatten().tolist():
            o = flatten_example(old, b, mask)
            v = flatten_example(new, b, mask)
            # the step actually taken is orthogonal to J's row space; C4 either pulls delta back
            # along its own null-space part (also orthogonal to J's rows) or shortens the step
            both = linalg.jacobian_null_project(self.jacs[b], torch.stack([v - o, o]), rcond=ctx.cfg.rcond)
            st = budget_step(o.double(), both[0].double(), both[1].double(), float(budgets[b]))
            if float(st.norm()) <= MIN_RELATIVE_STEP * float(o.norm()):
                st = torch.zeros_like(st)  # below the float32 resolution of delta: round-off would leave J's null space
            v = o + st.to(o.dtype)
            taken = (v - o).double()
            jb = self.jacs[b].double()
            if float(taken.norm()) > 0 and jb.numel():
                ratio = float((jb @ taken).norm() / (_spectral_norm(jb) * taken.norm() + 1e-30))
                self.first_order[b] = max(float(self.first_order[b]), ratio)
                self.step_ratio[b] = ratio
            else:
                self.step_ratio[b] = 0.0
            unflatten_example(v, new, b, mask, final)
        return final

    def history_fields(self, i: int) -> dict[str, Any]:
        return {"first_order_drift": float(self.step_ratio[i])}

    def metrics(self, i: int) -> dict[str, Any]:
        return {"jacobian_step_residual": float(self.first_order[i])}
