"""``jacobian``: every step taken orthogonal to the row space of the exact Jacobian J = dPhi/d delta
of all defended features at that step (PAPER_NOTES, cross-layer clamps), solved by
``saerecover.linalg.jacobian_null_project``.

J's rows for the features at delta's own site come from the encoder alone, one VJP per clamped
feature (saerecover.core.projection.position_blocks); when Phi covers that site only, J is
block-diagonal over rows and each row is projected against its own block, all in one batched
solve. Rows of later sites are packed vector-Jacobian products (coordinates at 0 skipped where
the encoder is rectified; one product serves the whole batch; chunked to
``MAX_VJP_CHUNK_BYTES``). The gradient is projected, and so is the step the optimizer actually
took; C4 at the budget pulls delta back along its own null-space part (also orthogonal to J's
rows) or shortens the step, never rotates it.
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
from saerecover.core.projection.position_blocks import (
    CONSTANT_DERIVATIVE_ARCHITECTURES,
    PositionBlocks,
    active_feature_rows,
    constant_derivative_blocks,
    row_blocks,
    same_site_gradients,
    same_site_rows,
)

#: A step shorter than this fraction of ||delta|| is not taken (C4 at the budget shrinks steps
#: toward 0; storing delta + step in float32 would then add round-off of relative size ~1e-7
#: ||delta|| in arbitrary directions, larger than the step's own first-order drift).
MIN_RELATIVE_STEP = 1e-3

#: The packed VJPs of a site run in chunks of seeds whose gradients take at most this many bytes.
MAX_VJP_CHUNK_BYTES = 256 * 2**20


def kept_coordinates(part: torch.Tensor, sparse: bool, phi_mask: torch.Tensor | None) -> torch.Tensor:
    """(n, width) the coordinates of a Phi part that get a row of J: the non-zero ones where
    the encoder is rectified (``sparse``), else the rows ``phi_mask`` covers (else all)."""
    if sparse:
        return part.detach() != 0
    if phi_mask is not None:
        return phi_mask.repeat_interleave(part.shape[1] // max(phi_mask.shape[1], 1), dim=1).to(part.device)
    return torch.ones_like(part, dtype=torch.bool)


def packed_jacobians(parts: list[torch.Tensor], deltas: Mapping[str, torch.Tensor], mask: torch.Tensor,
                     skip_zero: list[bool], *, phi_mask: torch.Tensor | None = None,
                     row_local: list[bool] | None = None,
                     max_chunk_bytes: int = MAX_VJP_CHUNK_BYTES) -> list[torch.Tensor]:
    """Per-example J_b = dPhi_b/d delta_b (m_b, sites * rows_b * d), rows in site order.

    parts: Phi per site (:func:`defended_feature_parts`), each still attached to the graph.
    Examples are independent, so one vector-Jacobian product serves every example at once,
    each with its own coordinate: VJP j seeds the j-th kept coordinate of every example, and a
    site costs max_b(kept_b) products (batched with ``is_grads_batched``), each through that
    site's part of the graph only. skip_zero[s]: drop coordinates that are 0 (rectified
    encoders have zero derivative there, so those rows of J are exactly 0). phi_mask: (n, seq),
    the rows Phi covers (other coordinates are 0 by construction and always dropped).
    row_local[s]: part s is computed row by row from the residual at the first delta site (the
    features of that site): its rows come from one VJP per feature through the encoder alone
    (:func:`same_site_gradients`), the same rows in the same order. The products of a site run
    in chunks whose gradients take at most ``max_chunk_bytes``.
    """
    n = mask.shape[0]
    names = list(deltas)
    dev = mask.device
    per_example: list[list[torch.Tensor]] = [[] for _ in range(n)]
    widths = [int(mask[b].sum()) * int(deltas[nm].shape[-1]) for b in range(n) for nm in names]
    for i, (part, sparse) in enumerate(zip(parts, skip_zero)):
        keep = kept_coordinates(part, sparse, phi_mask)
        counts = keep.sum(dim=1)
        k = int(counts.max()) if n else 0
        if k == 0:
            continue
        if row_local is not None and row_local[i]:
            grads0 = same_site_gradients(part, deltas[names[0]])
            for b in range(n):
                if int(counts[b]):
                    rows = same_site_rows(grads0, keep, mask, b)
                    rest = [rows.new_zeros((rows.shape[0], widths[b * len(names) + j])) for j in range(1, len(names))]
                    per_example[b].append(torch.cat([rows, *rest], dim=1))
            continue
        # slot j of example b holds its j-th kept coordinate
        slot = torch.cumsum(keep.long(), dim=1) - 1
        b_idx, c_idx = keep.nonzero(as_tuple=True)
        per_seed = n * sum(int(deltas[nm][0].numel()) for nm in names) * part.element_size() + part[0].numel() * n * 4
        chunk = max(1, int(max_chunk_bytes // max(per_seed, 1)))
        inputs = [deltas[nm] for nm in names]
        for lo in range(0, k, chunk):
            hi = min(k, lo + chunk)
            sel = (slot[b_idx, c_idx] >= lo) & (slot[b_idx, c_idx] < hi)
            seeds = torch.zeros((hi - lo, *part.shape), dtype=part.dtype, device=part.device)
            seeds[slot[b_idx, c_idx][sel] - lo, b_idx[sel], c_idx[sel]] = 1.0
            grads = _batched_products(part, inputs, names, deltas, seeds)
            for b in range(n):
                kb = min(int(counts[b]), hi) - lo
                if kb > 0:
                    per_example[b].append(torch.cat([g[:kb, b][:, mask[b].to(dev)].reshape(kb, -1) for g in grads],
                                                    dim=1))
    out = []
    for b in range(n):
        width = int(mask[b].sum()) * sum(int(deltas[nm].shape[-1]) for nm in names)
        first = next(iter(deltas.values()))
        out.append(torch.cat(per_example[b], dim=0) if per_example[b]
                   else first.new_zeros((0, width)))
    return out


def _batched_products(part: torch.Tensor, inputs: list[torch.Tensor], names: list[str],
                      deltas: Mapping[str, torch.Tensor], seeds: torch.Tensor) -> list[torch.Tensor]:
    """The VJPs of ``part`` for every seed (k, *part.shape), one gradient (k, n, seq, d) per site."""
    k = seeds.shape[0]
    try:
        grads = torch.autograd.grad(part, inputs, grad_outputs=seeds, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one product at a time
        per = [torch.autograd.grad(part, inputs, grad_outputs=seeds[j], retain_graph=True, allow_unused=True)
               for j in range(k)]
        grads = tuple(torch.stack([p[i] if p[i] is not None else torch.zeros_like(deltas[nm]) for p in per])
                      for i, nm in enumerate(names))
    return [g if g is not None else deltas[nm].new_zeros((k, *deltas[nm].shape)) for nm, g in zip(names, grads)]


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
    grads = _batched_products(phi, [deltas[nm] for nm in names], names, deltas, seeds)
    return dict(zip(names, grads))


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


def budget_steps(old: torch.Tensor, step: torch.Tensor, old_null: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """:func:`budget_step` for every example at once: rows of (n, D) float64, budgets (n,)."""
    w = old + step
    excess = (w * w).sum(1) - budgets * budgets
    a = (old_null * old_null).sum(1)
    b = (w * old_null).sum(1)
    disc = b * b - a * excess
    pull = (a > 0) & (b > 0) & (disc >= 0)
    gamma = torch.where(pull, (b - disc.clamp_min(0).sqrt()) / torch.where(pull, a, torch.ones_like(a)),
                        torch.zeros_like(a))
    # else shorten the step (shrink_to_budget)
    ss = (step * step).sum(1)
    os_ = (old * step).sum(1)
    slack = budgets * budgets - (old * old).sum(1)
    root = (os_ * os_ + ss * slack.clamp_min(0)).clamp_min(0).sqrt()
    alpha = ((-os_ + root) / torch.where(ss > 0, ss, torch.ones_like(ss))).clamp(0.0, 1.0)
    alpha = torch.where((ss == 0) | ((w * w).sum(1) <= budgets * budgets), torch.ones_like(alpha), alpha)
    out = torch.where(pull.unsqueeze(1), step - gamma.unsqueeze(1) * old_null, alpha.unsqueeze(1) * step)
    return torch.where((excess <= 0).unsqueeze(1), step, out)


def _spectral_norm(j: torch.Tensor) -> torch.Tensor:
    """||J||_2 from the smaller Gram matrix, float64."""
    gram = j @ j.T if j.shape[0] <= j.shape[1] else j.T @ j
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()


class ExactJacobian(ProjectionMode):
    """The exact Jacobian mode. Records, per example, the first-order drift of every step taken,
    ||J step|| / (||J|| ||step||): in the step's history (``first_order_drift``) and its maximum
    over the run (metric ``jacobian_step_residual``); and the rows of J (``jacobian_rows``, the
    largest over the run)."""

    name = "jacobian"
    needs_phi = True
    row_space = True

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        n = ctx.mask.shape[0]
        self.jacs: list[torch.Tensor] = []
        self.blocks: PositionBlocks | None = None
        self.first_order = torch.zeros(n, dtype=torch.float64)
        self.step_ratio = torch.full((n,), math.nan, dtype=torch.float64)
        self.max_rows = [0] * n

    @property
    def block_diagonal(self) -> bool:
        """Phi covers the first delta site only: J is one block per optimized row there."""
        return self.ctx.phi_sites == self.ctx.sites[:1]

    def _constant_derivative(self, state: StepState) -> bool:
        """Whether J's rows at the first site are the encoder's constant derivative on the active
        region (:func:`active_feature_rows`): a rectified SAE of those architectures with an
        affine input map, and Phi read from h_def + delta itself (no re-clamp after delta)."""
        site = self.ctx.clamp.at(self.ctx.sites[0]).site
        return (state.phi_inputs is not None and self.ctx.rectified[0] and not self.ctx.cfg.reclamp
                and site.architecture in CONSTANT_DERIVATIVE_ARCHITECTURES and site.is_affine_encoder_input)

    def project_gradient(self, grads: Deltas, state: StepState) -> Deltas:
        ctx = self.ctx
        assert state.phi_parts is not None
        first = ctx.sites[0]
        if self.block_diagonal:
            part = state.phi_parts[0]
            keep = kept_coordinates(part, ctx.rectified[0], ctx.phi_mask)
            sc = ctx.clamp.at(first)
            if self._constant_derivative(state):
                # every block is a row subset of the same (k, d) matrix: one backward at k rows
                rows = active_feature_rows(sc.site, sc.features, state.phi_inputs[first], keep)
                blocks = constant_derivative_blocks(rows, keep, ctx.mask)
            else:  # one VJP per feature through the encoder, at every row at once
                blocks = row_blocks(same_site_gradients(part, state.deltas[first]), keep, ctx.mask)
            self.blocks = PositionBlocks(blocks, ctx.mask, ctx.cfg.rcond)
            self.max_rows = [max(a, b) for a, b in zip(self.max_rows, self.blocks.rows)]
            (projected_first,) = self.blocks.project([grads[first]])
            return {s: projected_first if s == first else g for s, g in grads.items()}
        self.jacs = packed_jacobians(state.phi_parts, state.deltas, ctx.mask, ctx.rectified, phi_mask=ctx.phi_mask,
                                     row_local=[s == first for s in ctx.phi_sites])
        self.max_rows = [max(a, int(j.shape[0])) for a, j in zip(self.max_rows, self.jacs)]
        projected = {s: torch.zeros_like(g) for s, g in grads.items()}
        for b in range(ctx.mask.shape[0]):
            g_b = flatten_example(grads, b, ctx.mask)
            unflatten_example(linalg.jacobian_null_project(self.jacs[b], g_b, rcond=ctx.cfg.rcond), grads, b,
                              ctx.mask, projected)
        return projected

    def take_step(self, old: Deltas, new: Deltas, budgets: torch.Tensor, active: torch.Tensor) -> Deltas:
        ctx = self.ctx
        mask = ctx.mask
        first = ctx.sites[0]
        if self.blocks is not None and len(ctx.sites) == 1:
            return self._take_block_step(old, new, budgets, active)
        final = {s: old[s].clone() for s in old}
        if self.blocks is not None:  # every row against its own block, all at once
            step = {s: new[s] - old[s] for s in old}
            step_null, old_null = self.blocks.project([step[first], old[first]])
            step_null, old_null = {**step, first: step_null}, {**old, first: old_null}
        for b in torch.nonzero(active).flatten().tolist():
            o = flatten_example(old, b, mask)
            v = flatten_example(new, b, mask)
            # the step actually taken is orthogonal to J's row space; C4 either pulls delta back
            # along its own null-space part (also orthogonal to J's rows) or shortens the step
            if self.blocks is not None:
                both = torch.stack([flatten_example(step_null, b, mask), flatten_example(old_null, b, mask)])
            else:
                both = linalg.jacobian_null_project(self.jacs[b], torch.stack([v - o, o]), rcond=ctx.cfg.rcond)
            st = budget_step(o.double(), both[0].double(), both[1].double(), float(budgets[b]))
            if float(st.norm()) <= MIN_RELATIVE_STEP * float(o.norm()):
                st = torch.zeros_like(st)  # below the float32 resolution of delta: round-off would leave J's null space
            v = o + st.to(o.dtype)
            taken = (v - o).double()
            ratio = self._drift_ratio(b, taken)
            if ratio is not None:
                self.first_order[b] = max(float(self.first_order[b]), ratio)
                self.step_ratio[b] = ratio
            else:
                self.step_ratio[b] = 0.0
            unflatten_example(v, new, b, mask, final)
        return final

    def _take_block_step(self, old: Deltas, new: Deltas, budgets: torch.Tensor, active: torch.Tensor) -> Deltas:
        """:meth:`take_step` for one delta site whose J is :class:`PositionBlocks`: the same
        rule, every example at once (:func:`budget_steps`)."""
        assert self.blocks is not None
        site = self.ctx.sites[0]
        o = old[site]
        step_null, old_null = self.blocks.project([new[site] - o, o])
        n = o.shape[0]
        o64, st = o.double().reshape(n, -1), step_null.double().reshape(n, -1)
        st = budget_steps(o64, st, old_null.double().reshape(n, -1), budgets.to(st.device, torch.float64))
        # below the float32 resolution of delta: round-off would leave J's null space
        tiny = st.norm(dim=1) <= MIN_RELATIVE_STEP * o.reshape(n, -1).norm(dim=1).double()
        st = torch.where(tiny.unsqueeze(1), torch.zeros_like(st), st)
        v = o + st.reshape(o.shape).to(o.dtype)
        taken = (v - o).double()
        size = taken.reshape(n, -1).norm(dim=1)
        drift = self.blocks.drifts(taken)
        ratio = drift / (self.blocks.norm * size + 1e-30)
        moved = (size > 0) & (self.blocks.norm > 0)
        for b in torch.nonzero(active).flatten().tolist():
            if bool(moved[b]):
                self.first_order[b] = max(float(self.first_order[b]), float(ratio[b]))
                self.step_ratio[b] = float(ratio[b])
            else:
                self.step_ratio[b] = 0.0
        keep = active.view(n, 1, 1).to(o.device)
        return {site: torch.where(keep, v, o)}

    def _drift_ratio(self, b: int, taken: torch.Tensor) -> float | None:
        """||J_b taken|| / (||J_b|| ||taken||), or None for a zero step or an empty J_b."""
        if float(taken.norm()) == 0:
            return None
        if self.blocks is not None:
            norm = self.blocks.norms[b]
            if norm == 0:
                return None
            rows = int(self.ctx.mask[b].sum())
            d = taken.numel() // (rows * len(self.ctx.sites))
            drift = self.blocks.drift(b, taken[:rows * d].reshape(rows, d))
            return drift / (norm * float(taken.norm()) + 1e-30)
        jb = self.jacs[b].double()
        if not jb.numel():
            return None
        return float((jb @ taken).norm() / (_spectral_norm(jb) * taken.norm() + 1e-30))

    def history_fields(self, i: int) -> dict[str, Any]:
        return {"first_order_drift": float(self.step_ratio[i])}

    def metrics(self, i: int) -> dict[str, Any]:
        return {"jacobian_step_residual": float(self.first_order[i]), "jacobian_rows": int(self.max_rows[i])}
