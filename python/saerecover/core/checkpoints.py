"""Best checkpoints: per example, the delta of the best-scoring step whose defended-feature
drift stays under a threshold (the paper's reference keeps the best under 0.03)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class Checkpoints:
    """Per example, the delta with the best behavior score among the steps whose defended-feature
    drift is <= max_drift. Step 0 (delta = 0, drift 0) always qualifies, so every example has one."""

    def __init__(self, deltas: Mapping[str, torch.Tensor], max_drift: float) -> None:
        n = next(iter(deltas.values())).shape[0]
        self.max_drift = float(max_drift)
        self.score = torch.full((n,), -math.inf)
        self.step = torch.zeros(n, dtype=torch.long)
        self.delta = {s: torch.zeros_like(d.detach()) for s, d in deltas.items()}
        self._deltas = deltas

    def offer(self, step: int | torch.Tensor, score: torch.Tensor, drift: torch.Tensor, active: torch.Tensor) -> None:
        """The deltas as they are now, after ``step`` updates (an int, or one per example), which
        scored ``score`` with drift ``drift`` (n,)."""
        better = active & (drift <= self.max_drift) & (score > self.score)
        if not bool(better.any()):
            return
        self.score = torch.where(better, score, self.score)
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
