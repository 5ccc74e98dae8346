"""How delta is searched for: the recovery options of one run (steps, lr, budget C4, optimizer,
positions, penalties, checkpoints), checked once before any work."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from saerecover import linalg

OPTIMIZERS = ("adam", "sgd")
#: Rows where delta acts (``positions``): the answer row, every real row, the prompt rows (a
#: ``prompt_len`` target), the rows after the answer position (a teacher-forced response).
POSITIONS = ("answer", "all", "prompt", "response")
#: Rows Phi covers (``phi_positions``): every real row from the first optimised row on, or the
#: rows after the answer position.
PHI_POSITIONS = ("from_delta", "response")
#: Forms of the lambda_act drift penalty (saerecover.core.drift).
DRIFT_PENALTIES = ("relative_l2", "relative_mse")


@dataclass
class RecoveryConfig:
    """How delta is searched for. Defaults follow the paper's IOI setting; where the paper's
    reference code made another choice, the field's comment names its value (docs/refusal.md)."""

    steps: int = 100
    lr: float = 0.1
    budget: float = 20.0
    optimizer: str = "adam"
    #: Rows where delta acts (:data:`POSITIONS`); "response" rows are at most ``response_rows``.
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
    #: The lambda_act penalty (saerecover.core.drift): "relative_l2" = ||Phi - Phi_def|| /
    #: ||Phi_def|| over all sites; "relative_mse" = per site mean((z - z_def)^2) / (mean(z_def^2)
    #: + 1e-6), mean over sites (the reference's, squared).
    drift_penalty: str = "relative_l2"
    #: In the modes that project off Phi's row space (jacobian, sketch), add the penalty's gradient
    #: after the projection instead of before it (before, the projection removes it: it lies in
    #: J's row space). The reference: True.
    penalty_after_projection: bool = False
    #: After each optimiser step and C4, this many plain gradient steps of size
    #: ``drift_correction_lr`` on the drift penalty alone, unprojected, each followed by C4
    #: rescaling; row-space modes only (the reference's "jacobian", our sketch: 5 x 0.05).
    drift_correction_steps: int = 0
    drift_correction_lr: float = 0.05
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
    #: Checkpoint candidates: the deltas of step 0, of every step s with (s + 1) % checkpoint_every
    #: == 0, and of the last step (the reference: 10).
    checkpoint_every: int = 1
    #: Candidates are taken after their step's update (the reference: delta = 0 is never one)
    #: instead of before it (step 0, delta = 0, always qualifies).
    checkpoint_after_update: bool = False
    #: When no candidate is under max_drift, keep the one with the highest score - this x drift
    #: (the reference: 80); None: delta = 0.
    checkpoint_fallback_weight: float | None = None
    #: A first stage of this many steps on the answer row alone (lr ``anchor_lr``, budget
    #: ``anchor_budget``, default ``budget``), whose delta stays fixed while the main stage runs
    #: (the reference's refusal stage 1: 30 steps, lr 0.1, budget 40, the last prompt token).
    anchor_steps: int = 0
    anchor_lr: float = 0.1
    anchor_budget: float | None = None
    #: At most this many "response" rows per example, the first ones (the reference: 48).
    response_rows: int | None = None
    #: Rows Phi covers (:data:`PHI_POSITIONS`): the jacobian / sketch constraint, the drift penalty,
    #: the checkpoint drift and ``phi_relative_drift`` (the reference: "response").
    phi_positions: str = "from_delta"

    def validate(self) -> None:
        """Raise TypeError / ValueError naming the first bad field and what would be valid."""
        for name in ("steps", "sketch_probes", "seed", "drift_correction_steps", "checkpoint_every", "anchor_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        for name in ("lr", "budget", "lambda_act", "lambda_decode", "lambda_delta", "stop_margin", "eta",
                     "drift_correction_lr", "anchor_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
        for name in ("reclamp", "early_stop", "sketch_drift_probe", "history", "penalty_after_projection",
                     "checkpoint_after_update", "shared_delta"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not -(2**63) <= self.seed < 2**63:  # torch generators take 64-bit seeds
            raise ValueError(f"seed must be a 64-bit integer (-2**63 <= seed < 2**63), got {self.seed}")
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
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; valid: {', '.join(POSITIONS)}")
        if self.phi_positions not in PHI_POSITIONS:
            raise ValueError(f"unknown phi_positions {self.phi_positions!r}; valid: {', '.join(PHI_POSITIONS)}")
        if self.drift_penalty not in DRIFT_PENALTIES:
            raise ValueError(f"unknown drift_penalty {self.drift_penalty!r}; valid: {', '.join(DRIFT_PENALTIES)}")
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
        for name in ("drift_correction_steps", "anchor_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        for name in ("drift_correction_lr", "anchor_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name, low in (("checkpoint_fallback_weight", 0.0), ("anchor_budget", None), ("response_rows", None)):
            value = getattr(self, name)
            if value is None:
                continue
            integral = name == "response_rows"
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real) \
                    or not math.isfinite(value) or (value < low if low is not None else value <= 0):
                what = "an integer >= 1" if integral else ("a finite number >= 0" if low is not None else "a finite number > 0")
                raise ValueError(f"{name} must be None or {what}, got {value!r}")
        linalg._check_rcond(self.rcond)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
