"""``sketch``: the reference's approximation of J's row space. Per example, VJPs of an optional
drift probe and a few random unit vectors in Phi space, Gram-Schmidt orthonormalised; the
gradient is projected off that basis (the step taken is not projected again), then C4 by
rescaling.

Randomness is a function of (seed, example id, step), never of the batch: each example draws its
probes at each step from its own generator, seeded by :func:`probe_seed`, over its own Phi
coordinates only (its rows of every Phi site, in site order, row-major, feature-minor), so that
batch size, padding, resume and shards give the same probes (DESIGN.md, "Decisions")."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

from saerecover.core.projection.base import (
    Deltas,
    ProjectionMode,
    StepContext,
    StepState,
    flatten_example,
    unflatten_example,
)


#: Gram-Schmidt keeps a probe's VJP only if what is left of it after removing the directions
#: kept before has norm above SKETCH_ATOL and above SKETCH_RTOL times its own norm. The VJPs are
#: float32 (eps 1.2e-7): a VJP inside the span of those before it (more probes than active
#: coordinates of Phi) leaves about 1e-6 of its norm as round-off, and keeping that as a
#: direction would project the gradient off noise, which differs with batch size and padding.
SKETCH_ATOL = 1e-7
SKETCH_RTOL = 1e-4


def probe_seed(seed: int, example_id: str, step: int) -> int:
    """The seed of one example's probes at one step: the first 8 bytes of
    ``sha256(f"sketch/{seed}/{example_id}/{step}")`` as an integer below 2**63. Stable across
    processes, platforms and Python versions (``hash()`` is not), and any integer seed works."""
    digest = hashlib.sha256(f"sketch/{int(seed)}/{example_id}/{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_probes(phi_mask: torch.Tensor, widths: Sequence[int], example_ids: Sequence[str], *, seed: int,
                  step: int, probes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``probes`` random unit vectors in Phi space per example, (probes, n, m) with m =
    seq * sum(widths), in the layout of :func:`saerecover.core.projection.defended_features`.

    Example b's probes are drawn on CPU as ``randn(probes, rows_b * sum(widths))`` from a
    generator seeded with ``probe_seed(seed, example_ids[b], step)`` (rows_b: its Phi rows,
    ``phi_mask[b]``), laid out per site as (rows_b, width) and scattered into its Phi rows; the
    other coordinates (padding, rows before the delta) are 0. Each probe has unit norm."""
    n, seq = phi_mask.shape
    total = sum(int(w) for w in widths)
    out = torch.zeros((probes, n, seq * total), dtype=dtype)
    mask = phi_mask.detach().to("cpu", torch.bool)
    for b in range(n):
        rows = int(mask[b].sum())
        if not rows or not total or not probes:
            continue
        gen = torch.Generator().manual_seed(probe_seed(seed, example_ids[b], step))
        draw = torch.randn((probes, rows * total), generator=gen, dtype=torch.float32)
        draw = draw / draw.norm(dim=1, keepdim=True).clamp_min(1e-8)  # before padding: the same bits in any batch
        offset, start = 0, 0
        for w in widths:
            block = out[:, b, offset:offset + seq * w].view(probes, seq, w)
            block[:, mask[b]] = draw[:, start:start + rows * w].reshape(probes, rows, w).to(dtype)
            offset += seq * w
            start += rows * w
    return out


def sketch_basis(phi: torch.Tensor, phi_ref: torch.Tensor, deltas: Mapping[str, torch.Tensor], mask: torch.Tensor,
                 *, probes: torch.Tensor, drift_probe: bool) -> list[torch.Tensor]:
    """The reference's randomized row-space sketch, per example: VJPs of a drift probe and the
    random unit vectors ``probes`` (k, n, m) in Phi space (:func:`random_probes`),
    Gram-Schmidt orthonormalised. Returns one (r_b, sites * rows_b * d) basis per example."""
    n, m = phi.shape
    dirs = []
    if drift_probe:
        drift = (phi - phi_ref).detach()
        dirs.append(drift / drift.norm(dim=1, keepdim=True).clamp_min(1e-8))
    if probes.shape[1:] != (n, m):
        raise ValueError(f"probes have shape {tuple(probes.shape)}; expected (k, {n}, {m}) for Phi of shape ({n}, {m})")
    dirs += list(probes.to(phi.device, phi.dtype))
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
            scale = float(q.norm())
            for u in basis:
                q = q - (q @ u) * u
            norm = q.norm()
            if float(norm) > max(SKETCH_ATOL, SKETCH_RTOL * scale):
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


class Sketch(ProjectionMode):
    """The randomized sketch: ``cfg.sketch_probes`` random probes plus the drift probe
    (``cfg.sketch_drift_probe``); example b's probes at step t come from a generator seeded with
    ``probe_seed(cfg.seed, id_b, t)`` (:func:`random_probes`)."""

    name = "sketch"
    needs_phi = True
    row_space = True

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        self.widths = [int(ctx.clamp.at(s).features.numel()) for s in ctx.phi_sites]

    def project_gradient(self, grads: Deltas, state: StepState) -> Deltas:
        ctx = self.ctx
        assert state.phi is not None
        probes = random_probes(ctx.phi_mask, self.widths, ctx.example_ids, seed=ctx.cfg.seed, step=state.step,
                               probes=ctx.cfg.sketch_probes)
        bases = sketch_basis(state.phi, state.phi_ref, state.deltas, ctx.mask, probes=probes,
                             drift_probe=ctx.cfg.sketch_drift_probe)
        projected = {s: torch.zeros_like(g) for s, g in grads.items()}
        for b in range(ctx.mask.shape[0]):
            unflatten_example(project_out_basis(flatten_example(grads, b, ctx.mask), bases[b]), grads, b, ctx.mask,
                              projected)
        return projected
