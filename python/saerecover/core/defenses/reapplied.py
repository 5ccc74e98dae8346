"""The defended behavior as the attack sees it when a defense is applied again after delta.

With ``reclamp`` the model sees defend(h_def + delta), so at delta = 0 it sees defend(defend(h)).
Only an idempotent defense (``dir-ablate``) gives h_def back; the clamp, error-mean, error-proj
and the hardened clamp move the state again, and some flips of one application are undone by
the second with no delta at all. :class:`Reapplied` wraps a task so that its defended pass
(valid flips) is that of the attack's starting point: the defense applied again after a zero
delta at the delta sites. Everything else is the task's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from saerecover.core.examples import Examples


class Reapplied:
    """``task`` with its defended behavior judged at delta = 0 with the defense re-applied at
    ``delta_sites``; with a delta given (the recovery's final pass) it judges as the task does."""

    def __init__(self, task: Any, delta_sites: Sequence[str]) -> None:
        self._task = task
        self._sites = list(delta_sites)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._task, name)

    def judge(self, defended: Any, ex: Examples, *, with_clamp: bool, deltas: dict | None = None,
              reclamp: bool = False) -> torch.Tensor:
        """(n,) float: > 0 where the behavior is present."""
        if with_clamp and not deltas:
            shape = (*ex.input_ids.shape, defended.model.d_model)
            deltas = {s: torch.zeros(shape, device=ex.input_ids.device) for s in self._sites}
            reclamp = True
        if hasattr(self._task, "judge"):
            return self._task.judge(defended, ex, with_clamp=with_clamp, deltas=deltas, reclamp=reclamp)
        logits = defended.forward(ex, deltas, reclamp=reclamp, defended=with_clamp).logits
        return self._task.score(logits, ex)

    def describe(self) -> dict[str, Any]:
        return {**self._task.describe(), "defended_pass": {"reapplied_at": self._sites}}
