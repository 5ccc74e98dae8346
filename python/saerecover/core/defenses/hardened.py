"""The adversarially hardened clamp: recover, take the principal directions of the recovered
deltas, add them to an ablated subspace, repeat.

Round 0 is the clamp re-applied after delta with nothing ablated; round r + 1 ablates, after
the clamp and again after delta, the span of round r's subspace and the top ``k`` right
singular vectors of round r's recovered deltas (all recovered examples' optimised rows stacked,
not centred: a direction an attacker moves along, not a spread around a mean)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.defenses.base import Defense, DefenseContext, orthonormal_basis
from saerecover.core.defenses.sites import HardenedSiteClamp, derive

#: Principal directions added per round when the spec does not say (``hardened:R:k``).
DEFAULT_DIRECTIONS = 4


def principal_directions(deltas: torch.Tensor, k: int) -> torch.Tensor:
    """The top ``k`` right singular vectors (k, d) of the stacked delta rows (m, d), float64;
    fewer when the rows span fewer."""
    basis = orthonormal_basis(deltas)  # sorted by singular value
    return basis[:k]


def grow_subspace(basis: torch.Tensor, deltas: torch.Tensor, k: int) -> torch.Tensor:
    """An orthonormal basis of span(basis) + span(top-k principal directions of deltas)."""
    new = principal_directions(deltas, k)
    return orthonormal_basis(torch.cat([basis.double(), new.to(basis.device)], dim=0))


class Hardened(Defense):
    """``hardened:R[:k]``: R hardening rounds after round 0, ``k`` directions added per round
    at each delta site (``bases``: hook name -> (m, d_model) orthonormal rows)."""

    name: ClassVar[str] = "hardened"
    doc: ClassVar[str] = ("clamp plus an ablated subspace grown from the principal directions of recovered deltas, "
                          "round by round; re-applied after delta")

    def __init__(self, hardening_rounds: int, k: int = DEFAULT_DIRECTIONS, *, round: int = 0,
                 bases: Mapping[str, torch.Tensor] | None = None) -> None:
        if isinstance(hardening_rounds, bool) or not isinstance(hardening_rounds, int) or hardening_rounds < 1:
            raise ValueError(f"hardened:R needs R >= 1 rounds, got {hardening_rounds!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"hardened:R:k needs k >= 1 directions per round, got {k!r}")
        self.hardening_rounds = hardening_rounds
        self.k = k
        self.rounds = hardening_rounds + 1
        self.round = round
        self.bases = dict(bases or {})

    @classmethod
    def from_spec(cls, *args: str) -> "Hardened":
        if not 1 <= len(args) <= 2:
            raise TypeError("hardened takes :ROUNDS[:K]")
        try:
            nums = [int(a) for a in args]
        except ValueError:
            raise ValueError(f"hardened:{':'.join(args)}: ROUNDS and K must be integers") from None
        return cls(*nums)

    @property
    def label(self) -> str:
        return f"hardened:{self.hardening_rounds}" + (f":{self.k}" if self.k != DEFAULT_DIRECTIONS else "")

    def build(self, clamp: Clamp, ctx: DefenseContext) -> Clamp:
        out = Clamp()
        for sc in clamp.site_clamps:
            d = sc.site.d_in
            basis = self.bases.get(sc.site.hook_name, torch.zeros((0, d), dtype=torch.float64))
            out._add(derive(sc, HardenedSiteClamp, basis=basis, round=self.round))
        return out

    def harden(self, deltas: Mapping[str, torch.Tensor]) -> "Hardened":
        """The next round: at each site of ``deltas`` (hook name -> (rows, d_model) recovered
        delta rows), the subspace grown by their top-k principal directions."""
        if self.round + 1 >= self.rounds:
            raise ValueError(f"{self.label} has no round after {self.round}")
        bases = dict(self.bases)
        for name, rows in deltas.items():
            old = bases.get(name, torch.zeros((0, rows.shape[-1]), dtype=torch.float64))
            bases[name] = grow_subspace(old, rows, self.k) if rows.shape[0] else old
        return Hardened(self.hardening_rounds, self.k, round=self.round + 1, bases=bases)

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k,
                "basis_rank": {name: int(b.shape[0]) for name, b in self.bases.items()}}
