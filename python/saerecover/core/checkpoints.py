"""Best checkpoints: per example, the delta of the best-scoring candidate whose defended-feature
drift stays under a threshold (the paper's reference keeps the best under 0.03).

Which deltas are candidates is the recovery loop's business (``RecoveryConfig.checkpoint_every``
and ``checkpoint_after_update``); this module keeps the best one. Ours: every step's delta before
its update, so step 0 (delta = 0, drift 0) always qualifies. The reference's: every 10th step's
delta after its update, so delta = 0 is never a candidate and no candidate may be under the
threshold; with a ``fallback_weight`` w the example then keeps its candidate with the highest
score - w x drift (the reference: 80), and a feasible candidate always replaces it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class Checkpoints:
    """Per example, the delta with the best behavior score among the candidates whose
    defended-feature drift is <= max_drift; with ``fallback_weight``, while none is, the
    candidate with the best score - fallback_weight x drift. Until a first candidate is kept the
    example's best delta is 0 (step 0)."""

    def __init__(self, deltas: Mapping[str, torch.Tensor], max_drift: float,
                 fallback_weight: float | None = None) -> None:
        n = next(iter(deltas.values())).shape[0]
        self.max_drift = float(max_drift)
        self.fallback_weight = None if fallback_weight is None else float(fallback_weight)
        self.score = torch.full((n,), -math.inf)
        self.fallback = torch.full((n,), -math.inf)
        self.step = torch.zeros(n, dtype=torch.long)
        self.delta = {s: torch.zeros_like(d.detach()) for s, d in deltas.items()}
        self._deltas = deltas

    @property
    def feasible(self) -> torch.Tensor:
        """(n,) bool: the kept delta is under the drift threshold (False: a fallback, or none kept)."""
        return torch.isfinite(self.score)

    def offer(self, step: int | torch.Tensor, score: torch.Tensor, drift: torch.Tensor, active: torch.Tensor) -> None:
        """The deltas as they are now, after ``step`` updates (an int, or one per example), which
        scored ``score`` with drift ``drift`` (n,)."""
        ok = drift <= self.max_drift
        better = active & ok & (score > self.score)
        if self.fallback_weight is not None:
            value = score - self.fallback_weight * drift
            fall = active & ~ok & ~self.feasible & (value > self.fallback)
            self.fallback = torch.where(fall, value, self.fallback)
            better = better | fall
        if not bool(better.any()):
            return
        self.score = torch.where(active & ok & (score > self.score), score, self.score)
        self.step = torch.where(better, torch.as_tensor(step, dtype=torch.long).expand_as(self.step), self.step)
        for s, d in self._deltas.items():
            keep = better.to(d.device).view(-1, *([1] * (d.dim() - 1)))
            self.delta[s] = torch.where(keep, d.detach(), self.delta[s])

    def restore(self, deltas: Mapping[str, torch.Tensor]) -> list[int]:
        """Put each example's best delta back into ``deltas``; the step it came from, per example."""
        with torch.no_grad():
            for s, d in deltas.items():
                d.copy_(self.delta[s])
        return self.step.tolist()
