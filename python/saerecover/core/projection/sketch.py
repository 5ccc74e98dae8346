"""``sketch``: the reference's approximation of J's row space. Per example, VJPs of an optional
drift probe and a few random unit vectors in Phi space, Gram-Schmidt orthonormalised; the
gradient is projected off that basis (the step taken is not projected again), then C4 by
rescaling."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from saerecover.core.projection.base import (
    Deltas,
    ProjectionMode,
    StepContext,
    StepState,
    flatten_example,
    unflatten_example,
)


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


class Sketch(ProjectionMode):
    """The randomized sketch: ``cfg.sketch_probes`` random probes plus the drift probe
    (``cfg.sketch_drift_probe``), drawn from a generator seeded with ``cfg.seed``."""

    name = "sketch"
    needs_phi = True
    row_space = True

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        self.generator = torch.Generator().manual_seed(ctx.cfg.seed)

    def project_gradient(self, grads: Deltas, state: StepState) -> Deltas:
        ctx = self.ctx
        assert state.phi is not None
        bases = sketch_basis(state.phi, state.phi_ref, state.deltas, ctx.mask, probes=ctx.cfg.sketch_probes,
                             drift_probe=ctx.cfg.sketch_drift_probe, generator=self.generator)
        projected = {s: torch.zeros_like(g) for s, g in grads.items()}
        for b in range(ctx.mask.shape[0]):
            unflatten_example(project_out_basis(flatten_example(grads, b, ctx.mask), bases[b]), grads, b, ctx.mask,
                              projected)
        return projected
