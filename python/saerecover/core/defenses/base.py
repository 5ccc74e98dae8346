"""What every defense shares: the :class:`Defense` interface, the reference set it may read
(:class:`DefenseContext`), and an orthonormal basis helper for the ablating defenses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.examples import Examples

#: Singular values below this times the largest are dropped from an ablated subspace.
BASIS_RCOND = 1e-6


def orthonormal_basis(vectors: torch.Tensor, rcond: float = BASIS_RCOND) -> torch.Tensor:
    """An orthonormal basis (k, d) float64 of the row space of ``vectors`` (m, d), rank by
    ``rcond`` x the largest singular value; (0, d) for none."""
    v = vectors.detach().double().reshape(-1, vectors.shape[-1])
    if v.shape[0] == 0 or float(v.abs().max()) == 0.0:
        return v.new_zeros((0, v.shape[-1]))
    _, s, vh = torch.linalg.svd(v, full_matrices=False)
    keep = s > rcond * s[0]
    return vh[keep]


def ablate(h: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """h - (h Q^T) Q: h (..., d) with its component in the span of ``basis`` (k, d),
    orthonormal rows, removed; float32 or better."""
    x = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    if basis.shape[0] == 0:
        return x
    q = basis.to(device=x.device, dtype=x.dtype)
    return x - (x @ q.T) @ q


@dataclass
class DefenseContext:
    """What a defense may measure before it is built: the model and a reference set of
    inputs (texts the defense should not change), with residuals cached per site."""

    model: Any
    reference: Examples | None = None
    _residuals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def residuals(self, hook_name: str) -> torch.Tensor:
        """The base model's residual rows at ``hook_name`` over every real token of the
        reference set: (rows, d_model), float32, no gradients."""
        if hook_name in self._residuals:
            return self._residuals[hook_name]
        if self.reference is None:
            raise ValueError("this defense needs a reference set of inputs (its mean SAE error is measured there)")
        from saerecover.core.defended import DefendedModel

        base = DefendedModel(self.model, Clamp())
        ex = self.reference.to(self.model.device)
        with torch.no_grad():
            h = base.forward(ex, track=(hook_name,), defended=False).sites[hook_name].h_def
        rows = h[ex.attention_mask.bool()].float()
        self._residuals[hook_name] = rows
        return rows


class Defense:
    """A named intervention built from the task's clamp. ``rounds`` > 1: an iterated defense
    (:meth:`harden` gives the next round's from the recovered deltas)."""

    name: ClassVar[str] = ""
    #: One line: what the defender does (the report and ``--help`` show it).
    doc: ClassVar[str] = ""
    #: RecoveryConfig fields this defense sets.
    recovery: ClassVar[Mapping[str, Any]] = {"reclamp": True}
    rounds: int = 1
    round: int = 0

    @property
    def label(self) -> str:
        """The spec that names it (``hardened:3``)."""
        return self.name

    @property
    def member(self) -> str:
        """The directory name of one round's results (``hardened-3-r2``; the label when there is
        one round)."""
        return self.label if self.rounds == 1 else f"{self.label.replace(':', '-')}-r{self.round}"

    def build(self, clamp: Clamp, ctx: DefenseContext) -> Clamp:
        raise NotImplementedError

    def harden(self, deltas: Mapping[str, torch.Tensor]) -> "Defense":
        raise TypeError(f"defense {self.label!r} has one round")

    def describe(self) -> dict[str, Any]:
        return {"defense": self.label, "round": self.round, "doc": self.doc, "recovery": dict(self.recovery)}
