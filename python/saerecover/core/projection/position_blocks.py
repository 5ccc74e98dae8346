"""The exact Jacobian of the defended features at delta's own site, without a VJP per row.

An SAE encodes one row at a time, so the features at the first delta site depend on delta at
that site only through the same row: the block of J = dPhi/d delta for that site is
block-diagonal over rows, each block (features x d_model) the encoder's derivative at that row
(the encoder columns of the active features for ReLU / JumpReLU / TopK). One VJP per clamped
feature, seeded at every row of every example at once, gives all of them, through the encoder
alone; the transformer is never differentiated.

When Phi covers that site only (one clamped site, the usual case), J *is* this block matrix:
:class:`PositionBlocks` projects every row onto the null space of its own block in one batched
call (``saerecover.linalg.jacobian_null_project_batched``) instead of factoring a dense J per
example. Otherwise the rows are written into the dense J (:func:`same_site_rows`) and the later
sites' rows come from VJPs (saerecover.core.projection.jacobian).
"""

from __future__ import annotations

import torch

from saerecover import linalg
from saerecover.core.sites import at_least_f32


def same_site_gradients(part: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(k, n, seq, d): entry [f, b, p] = d part[b, p * k + f] / d delta[b, p] for a Phi part
    (n, seq * k) computed row by row from the residual that ``delta`` (n, seq, d) is added to.
    One VJP per feature f, seeded at every row (rows are independent, so nothing mixes)."""
    n, seq, _ = delta.shape
    k = part.shape[1] // max(seq, 1)
    seeds = torch.zeros((k, n, seq, k), dtype=part.dtype, device=part.device)
    feats = torch.arange(k, device=part.device)
    seeds[feats, :, :, feats] = 1.0
    (grads,) = torch.autograd.grad(part, [delta], grad_outputs=seeds.reshape(k, n, seq * k),
                                   is_grads_batched=True, retain_graph=True, allow_unused=True)
    if grads is None:
        return delta.new_zeros((k, *delta.shape))
    return grads


#: SAE architectures whose active features have a derivative that is the same wherever they are
#: active, when the encoder's input map is affine: z_f = pre_f (ReLU, JumpReLU, TopK) there.
CONSTANT_DERIVATIVE_ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk")


def active_feature_rows(site, features: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(k, d): row f = d z_{features[f]} / d h where that feature is active, for an SAE of
    :data:`CONSTANT_DERIVATIVE_ARCHITECTURES` with an affine input map (the row is the same at
    every row where the feature fires). One backward pass through the encoder at one row per
    feature (the first where ``keep``, (n, seq * k), has it); zero for a feature never kept.

    h: (n, seq, d) the residual the site encodes (h_rec)."""
    n, seq, d = h.shape
    k = int(features.numel())
    kept = keep.reshape(n, seq, k)
    seen = kept.reshape(n * seq, k)
    present = seen.any(dim=0)
    first = seen.float().argmax(dim=0)  # the first row where each feature is kept
    # float32 or better: delta is float32, and h_rec's cast to a lower model dtype passes its gradient unchanged
    x = at_least_f32(h.detach().reshape(n * seq, d)[first]).clone().requires_grad_(True)
    with torch.enable_grad():
        z = site.encode(x)[:, features.to(x.device)]
        (rows,) = torch.autograd.grad(torch.diagonal(z).sum(), x)
    return rows * present.unsqueeze(1).to(rows.dtype)


def constant_derivative_blocks(rows: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The blocks of :func:`row_blocks` from :func:`active_feature_rows`, compacted: block r holds
    rows[f] for each coordinate f kept at that row, first, then zero rows up to the longest
    block's count, (optimized rows, longest, d). Row order inside a block does not change its
    null space."""
    n, seq = mask.shape
    k = rows.shape[0]
    kept = keep.reshape(n, seq, k)[mask]  # (R, k)
    longest = max(int(kept.sum(dim=1).max()) if kept.numel() else 0, 1)
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :longest]
    return rows[order] * torch.gather(kept, 1, order).unsqueeze(-1).to(rows.dtype)


def row_blocks(grads: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The blocks of the optimized rows, (rows, k, d), example-major (the order of
    ``tensor[mask]``): block [r, f] = row f of J at that row, zero where coordinate f is not
    kept (``keep``: (n, seq * k), the coordinates of J, e.g. the non-zero features)."""
    k, n, seq, _ = grads.shape
    kept = keep.reshape(n, seq, k)[mask]  # (rows, k)
    return grads.permute(1, 2, 0, 3)[mask] * kept.unsqueeze(-1).to(grads.dtype)


def same_site_rows(grads: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Example b's rows of J for its kept coordinates (in coordinate order, as the VJP route
    gives them), over its optimized rows of this delta site only: (kept_b, rows_b * d)."""
    k, _, seq, d = grads.shape
    coords = keep[b].nonzero().flatten()
    pos, feat = coords // k, coords % k
    rows_b = mask[b].to(grads.device)
    slot = torch.cumsum(rows_b.long(), dim=0) - 1
    out = grads.new_zeros((coords.numel(), int(rows_b.sum()), d))
    inside = rows_b[pos]
    out[torch.arange(coords.numel(), device=grads.device)[inside], slot[pos[inside]]] = grads[feat[inside], b,
                                                                                             pos[inside]]
    return out.reshape(coords.numel(), -1)


class PositionBlocks:
    """J of one clamped site at delta's own (first) site: one block (k, d) per optimized row.

    blocks: (rows, k, d) from :func:`row_blocks`; mask: (n, seq) the optimized rows. Later delta
    sites do not move these features (J is zero there), so their rows pass unchanged. Each
    block's rows are compacted (its non-zero rows first, the rest cut to the longest block's)
    and factored once (``linalg.BatchedJacobianNull``); :meth:`project` reuses the factors.
    """

    def __init__(self, blocks: torch.Tensor, mask: torch.Tensor, rcond: float | None) -> None:
        nonzero = (blocks != 0).any(dim=2)  # (rows, k)
        longest = max(int(nonzero.sum(dim=1).max()) if nonzero.numel() else 0, 1)
        order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :longest]
        self.blocks = torch.gather(blocks.detach(), 1, order.unsqueeze(-1).expand(-1, -1, blocks.shape[2]))
        self.mask = mask
        counts = mask.sum(dim=1)
        #: the example each optimized row belongs to, (rows,)
        self.owner = torch.arange(mask.shape[0], device=mask.device).repeat_interleave(counts)
        rows_per = torch.zeros(mask.shape[0], dtype=torch.long, device=nonzero.device)
        rows_per.index_add_(0, self.owner.to(nonzero.device), nonzero.sum(dim=1))
        #: rows of J per example (its non-zero rows: kept coordinates at optimized rows)
        self.rows = rows_per.tolist()
        self.null = linalg.BatchedJacobianNull(self.blocks, rcond=rcond, dtype=blocks.dtype)
        self.routes = self.null.routes
        b64 = self.blocks.double()
        gram = b64 @ b64.mT
        sigma = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt() if gram.numel() else gram.new_zeros(0)
        #: ||J_b||_2 per example: the largest of its blocks' (J_b is block-diagonal)
        self.norm = torch.zeros(mask.shape[0], dtype=torch.float64, device=sigma.device)
        self.norm = self.norm.scatter_reduce(0, self.owner.to(sigma.device), sigma, "amax")
        self.norms = self.norm.tolist()

    def project(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each (n, seq, d) tensor of this site with every optimized row projected onto the null
        space of its block (all rows and all tensors at once); other rows zero."""
        rows = torch.stack([v[self.mask] for v in vectors], dim=1)  # (rows, r, d)
        out = self.null.apply(rows)
        projected = []
        for i, v in enumerate(vectors):
            y = torch.zeros_like(v)
            y[self.mask] = out[:, i].to(v.dtype)
            projected.append(y)
        return projected

    def drifts(self, steps: torch.Tensor) -> torch.Tensor:
        """||J_b step_b|| per example (n,), float64, for steps (n, seq, d) of this site."""
        rows = steps[self.mask].double().unsqueeze(-1)  # (rows, d, 1)
        sq = (self.blocks.double() @ rows).squeeze(-1).pow(2).sum(dim=1)
        return torch.zeros_like(self.norm).index_add(0, self.owner.to(sq.device), sq).sqrt()

    def drift(self, b: int, step: torch.Tensor) -> float:
        """||J_b step|| for example b's step at this site, (rows_b, d), in float64."""
        return float(self.drifts(self._embed(b, step))[b])

    def _embed(self, b: int, step: torch.Tensor) -> torch.Tensor:
        full = torch.zeros((*self.mask.shape, step.shape[-1]), dtype=step.dtype, device=step.device)
        full[b][self.mask[b]] = step
        return full
