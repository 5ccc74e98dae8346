"""Projection modes: how each optimisation step is kept away from the defended features.

- ``none``: unconstrained (the paper's baseline).
- ``encoder``: C1, delta in the null space of A_S^T at every optimized row of every clamped
  delta site (``saerecover.linalg.EncoderNullProjector``, the Rust core on CPU).
- ``jacobian``: every step orthogonal to the row space of the exact Jacobian J of Phi, the
  stacked defended features of every clamped site at or after the delta sites (one
  vector-Jacobian product per defended coordinate, batched), solved by
  ``saerecover.linalg.jacobian_null_project``.
- ``sketch``: the reference's approximation: a few random probes of Phi's row space plus an
  optional drift probe, Gram-Schmidt, projection of the gradient only.

Deltas are dicts ``{hook_name: (n, seq, d)}``; an example's delta vector is its optimized rows of
every delta site, concatenated in site order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from saerecover import linalg
from saerecover.core.clamp import Clamp

PROJECTIONS = ("none", "encoder", "jacobian", "sketch")

Deltas = dict[str, torch.Tensor]


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


class EncoderNull:
    """C1 at every clamped delta site: rows projected onto the null space of that site's A_S^T."""

    def __init__(self, clamp: Clamp, sites: list[str], rcond: float | None) -> None:
        self.projectors: dict[str, linalg.EncoderNullProjector] = {}
        for name in sites:
            sc = clamp.at(name)
            if sc is not None and sc.features.numel():
                self.projectors[name] = linalg.EncoderNullProjector(
                    sc.site.encoder_columns(sc.features), rcond=rcond)

    def __call__(self, deltas: Mapping[str, torch.Tensor], mask: torch.Tensor) -> Deltas:
        out = {}
        for name, x in deltas.items():
            y = x * mask.unsqueeze(-1)
            proj = self.projectors.get(name)
            if proj is not None:
                rows = y[mask]
                if rows.numel():
                    y = torch.zeros_like(y)
                    y[mask] = proj.apply(rows.contiguous())
            out[name] = y
        return out


def defended_feature_parts(clamp: Clamp, states: Mapping, sites: list[str], phi_mask: torch.Tensor) -> list[torch.Tensor]:
    """Phi per site: E_S of the residual leaving each clamped site in ``sites`` at the rows of
    ``phi_mask`` (n, seq), one (n, seq * |S_site|) tensor per site (row-major, feature-minor)."""
    parts = []
    for name in sites:
        sc = clamp.at(name)
        z = sc.site.encode(states[name].h_rec)[..., sc.features.to(phi_mask.device)]
        parts.append((z * phi_mask.unsqueeze(-1)).flatten(1))
    return parts


def defended_features(clamp: Clamp, states: Mapping, sites: list[str], phi_mask: torch.Tensor) -> torch.Tensor:
    """Phi: E_S of the residual leaving every clamped site in ``sites``, at the rows of
    ``phi_mask`` (n, seq), stacked to (n, m)."""
    parts = defended_feature_parts(clamp, states, sites, phi_mask)
    return torch.cat(parts, dim=1) if parts else phi_mask.new_zeros((phi_mask.shape[0], 0), dtype=torch.float32)


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


def sketch_basis(phi: torch.Tensor, phi_ref: torch.Tensor, deltas: Mapping[str, torch.Tensor], mask: torch.Tensor,
                 *, probes: int, drift_probe: bool, generator: torch.Generator) -> list[torch.Tensor]:
    """The reference's randomized row-space sketch, per example: VJPs of a drift probe and
    ``probes`` random unit vectors in Phi space, Gram-Schmidt orthonormalised.
    Returns one (r_b, sites * rows_b * d) basis per example."""
    n, m = phi.shape
    dirs = []
    if drift_probe:
        drift = (phi - phi_ref).detach()
        dirs.append(drift / drift.norm(dim=1, keepdim=True).clamp_min(1e-8))
    for _ in range(probes):
        r = torch.randn((n, m), generator=generator, device="cpu").to(phi.device, phi.dtype)
        dirs.append(r / r.norm(dim=1, keepdim=True).clamp_min(1e-8))
    names = list(deltas)
    vjps = []
    for r in dirs:
        grads = torch.autograd.grad(phi, [deltas[nm] for nm in names], grad_outputs=r, retain_graph=True,
                                    allow_unused=True)
        vjps.append({nm: (g if g is not None else torch.zeros_like(deltas[nm])) for nm, g in zip(names, grads)})
    bases = []
    for b in range(n):
        basis: list[torch.Tensor] = []
        for v in vjps:
            q = flatten_example(v, b, mask).double()
            for u in basis:
                q = q - (q @ u) * u
            norm = q.norm()
            if float(norm) > 1e-7:
                basis.append(q / norm)
        bases.append(torch.stack(basis) if basis else torch.zeros((0, int(mask[b].sum()) * len(names) *
                                                                   next(iter(deltas.values())).shape[-1]),
                                                                  dtype=torch.float64, device=phi.device))
    return bases


def project_out_basis(vec: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """vec minus its components along the orthonormal rows of ``basis``."""
    if basis.numel() == 0:
        return vec
    v = vec.double()
    return (v - (basis @ v) @ basis).to(vec.dtype)
