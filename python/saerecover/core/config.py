"""How delta is searched for: the recovery options of one run (steps, lr, budget C4, optimizer,
positions, penalties, checkpoints), checked once before any work."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from saerecover import linalg

OPTIMIZERS = ("adam", "sgd")


@dataclass
class RecoveryConfig:
    """How delta is searched for. Defaults follow the paper's IOI setting."""

    steps: int = 100
    lr: float = 0.1
    budget: float = 20.0
    optimizer: str = "adam"
    positions: str = "answer"
    #: C4 relative to the residual: ||delta|| <= budget_rel x the defended residual's scale at the
    #: optimized rows (metrics.residual_scale), per example; None: the absolute ``budget``.
    budget_rel: float | None = None
    #: One delta for all examples (the paper's reference IOI code): a single vector added at every
    #: optimized row of every example, optimised on the mean loss over all the task's examples
    #: (with budget_rel, relative to the median example's residual scale).
    shared_delta: bool = False
    reclamp: bool = False
    lambda_act: float = 0.0
    lambda_decode: float = 0.0
    lambda_delta: float = 0.0
    early_stop: bool = False
    stop_margin: float = 0.0
    eta: float = 0.0
    rcond: float | None = None
    sketch_probes: int = 4
    sketch_drift_probe: bool = True
    seed: int = 0
    history: bool = True
    #: Best checkpoint: keep, per example, the delta of the step with the highest behavior score
    #: among those whose defended-feature drift ||Phi - Phi_def|| / ||Phi_def|| is at most this
    #: (the paper's reference uses 0.03). None: keep the last delta.
    max_drift: float | None = None

    def validate(self) -> None:
        """Raise TypeError / ValueError naming the first bad field and what would be valid."""
        for name in ("steps", "sketch_probes", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        for name in ("lr", "budget", "lambda_act", "lambda_decode", "lambda_delta", "stop_margin", "eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
        for name in ("reclamp", "early_stop", "sketch_drift_probe", "history", "shared_delta"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0 (C4: ||delta|| <= budget), got {self.budget}")
        if self.budget_rel is not None and (isinstance(self.budget_rel, bool)
                                            or not isinstance(self.budget_rel, numbers.Real)
                                            or not (self.budget_rel > 0 and math.isfinite(self.budget_rel))):
            raise ValueError(f"budget_rel must be None or a finite number > 0 (C4: ||delta|| <= budget_rel x "
                             f"||h_def||), got {self.budget_rel!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.positions not in ("answer", "all", "prompt"):
            raise ValueError(f"unknown positions {self.positions!r}; valid: 'answer', 'all', 'prompt'")
        for name in ("lambda_act", "lambda_decode", "lambda_delta", "eta"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.stop_margin):
            raise ValueError(f"stop_margin must be finite, got {self.stop_margin}")
        if self.max_drift is not None and (isinstance(self.max_drift, bool) or not isinstance(self.max_drift, numbers.Real)
                                           or not (self.max_drift >= 0 and math.isfinite(self.max_drift))):
            raise ValueError(f"max_drift must be None or a finite number >= 0, got {self.max_drift!r}")
        if self.shared_delta:
            clash = [name for name, on in (("early_stop", self.early_stop), ("max_drift", self.max_drift is not None),
                                           ("lambda_act", self.lambda_act > 0), ("lambda_decode", self.lambda_decode > 0),
                                           ("lambda_delta", self.lambda_delta > 0)) if on]
            if clash:
                raise ValueError(f"shared_delta (one delta for all examples) does not combine with {', '.join(clash)}; "
                                 "those act per example")
        if self.sketch_probes < 0:
            raise ValueError(f"sketch_probes must be >= 0, got {self.sketch_probes}")
        linalg._check_rcond(self.rcond)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
