"""One delta for all examples: the paper's reference IOI protocol.

The reference code optimises a single vector (1, d) for its 64 IOI prompts: added at the answer
row of every prompt, trained on the batch-mean logit difference over all of them (valid flips or
not), held to the budget as one vector, and the final vector is then applied to each prompt
(``src/sae_bench/recovery_core/core.py:213-217, 311-321, 377-380``; ``ioi_recovery.py:98-106,
292-293, 310``). :func:`optimise_shared` does that with our projections (exact C1 on the gradient
and on the vector applied, C4 by rescaling); :func:`evaluate_shared` measures it per example with
the engine's own metrics (:func:`saerecover.core.recovery.recover_batch` at zero steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.examples import Examples, Task
from saerecover.core.metrics import residual_scales
from saerecover.core.projection import PROJECTIONS, StepContext, StepState
from saerecover.core.recovery import ExampleOutcome, recover_batch


@dataclass
class SharedDelta:
    """The shared vector ``delta`` (d_model,) at ``site``, its ``budget`` (C4), with one history
    entry per step (mean loss and score over the ``n`` examples it was optimised on, and its
    norm)."""

    site: str
    delta: torch.Tensor
    n: int
    budget: float
    history: list[dict[str, float]] = field(default_factory=list)


def _check(defended: DefendedModel, mode: str, cfg: RecoveryConfig, delta_site: str | None) -> str:
    cfg.validate()
    if mode not in PROJECTIONS:
        raise ValueError(f"unknown projection {mode!r}; valid: {', '.join(PROJECTIONS)}")
    if PROJECTIONS[mode].needs_phi:
        valid = [m for m, cls in PROJECTIONS.items() if not cls.needs_phi]
        raise ValueError(f"a shared delta works with the per-row projection modes ({', '.join(valid)}), not "
                         f"{mode!r}, whose constraint is per example")
    site = delta_site or defended.clamp.site_clamps[0].site.hook_name
    defended.check_delta_site(site)
    if defended.clamp.at(site) is None:
        raise ValueError(f"the delta site {site!r} must be clamped; clamped: "
                         f"{[sc.site.hook_name for sc in defended.clamp.site_clamps]}")
    return site


def optimise_shared(defended: DefendedModel, task: Task, ex: Examples, *, mode: str, cfg: RecoveryConfig,
                    delta_site: str | None = None, batch_size: int = 64) -> SharedDelta:
    """One delta vector for every example of ``ex``: ``cfg.steps`` optimizer steps on the mean of
    ``task.loss`` over all of them (computed in chunks of ``batch_size``, gradients summed, so the
    chunking does not change the result), the vector added at every optimized row
    (``cfg.positions``) of every example, projected by ``mode`` (C1 for "encoder", on the gradient
    and on the vector applied) and rescaled to the budget (C4) after each step: ``cfg.budget``, or
    with ``cfg.budget_rel`` that times the median over the examples of their residual scale
    (metrics.residual_scales)."""
    site = _check(defended, mode, cfg, delta_site)
    if len(ex) == 0:
        raise ValueError("a shared delta needs at least one example")
    model, clamp = defended.model, defended.clamp
    dev = model.device
    parts = []
    for start in range(0, len(ex), max(1, int(batch_size))):
        part = ex.select(list(range(start, min(start + batch_size, len(ex))))).to(dev)
        parts.append((part, part.position_mask(cfg.positions).unsqueeze(-1)))
    one = torch.ones(1, 1, dtype=torch.bool, device=dev)
    projection = PROJECTIONS[mode](StepContext(clamp=clamp, cfg=cfg, sites=[site], phi_sites=[site], mask=one,
                                               phi_mask=one, rectified=[True], example_ids=["shared"]))
    torch.manual_seed(cfg.seed)
    delta = torch.zeros(1, 1, model.d_model, device=dev, dtype=torch.float32, requires_grad=True)
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)([delta], lr=cfg.lr)
    budget = float(cfg.budget)
    if cfg.budget_rel is not None:
        with torch.no_grad():
            scales = torch.cat([residual_scales([defended.forward(part, track=(site,)).sites[site].h_def],
                                                rows.squeeze(-1)) for part, rows in parts])
        budget = float(cfg.budget_rel * scales.median())
    budgets = torch.full((1,), budget, device=dev)
    active = torch.ones(1, dtype=torch.bool, device=dev)
    history: list[dict[str, float]] = []
    n = len(ex)
    for step in range(cfg.steps):
        grad = torch.zeros_like(delta)
        loss_sum = score_sum = 0.0
        for part, rows in parts:
            out = defended.forward(part, {site: rows * delta}, reclamp=cfg.reclamp)
            loss = task.loss(out.logits, part).sum() / n  # the mean over all examples
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite shared-delta loss at step {step}")
            grad += torch.autograd.grad(loss, delta)[0]
            loss_sum += float(loss.detach())
            score_sum += float(task.score(out.logits, part).detach().sum())
        state = StepState(step=step, deltas={site: delta}, phi_parts=None, phi=None,
                          phi_ref=torch.zeros(1, 0, device=dev), active=active)
        old = {site: delta.detach().clone()}
        delta.grad = projection.project_gradient({site: grad}, state)[site]
        opt.step()
        with torch.no_grad():
            delta.copy_(projection.take_step(old, {site: delta.detach().clone()}, budgets, active)[site])
        history.append({"step": step, "loss": loss_sum, "score": score_sum / n, "delta_norm": float(delta.detach().norm())})
    return SharedDelta(site=site, delta=delta.detach().reshape(-1).clone(), n=n, budget=budget, history=history)


def evaluate_shared(defended: DefendedModel, task: Task, ex: Examples, shared: SharedDelta, *, mode: str,
                    cfg: RecoveryConfig) -> list[ExampleOutcome]:
    """Each example of ``ex`` with the shared vector at its optimized rows and the clamp active:
    the engine's outcome and metrics (recovered, drifts, reactivation, C1 residual, ...), with
    the shared optimisation's steps and history."""
    _check(defended, mode, cfg, shared.site)
    outcomes = recover_batch(defended, task, ex, mode=mode, cfg=replace(cfg, steps=0, shared_delta=False),
                             delta_site=shared.site, init={shared.site: shared.delta.view(1, 1, -1)},
                             budget=torch.full((len(ex),), shared.budget))
    for oc in outcomes:
        oc.steps = len(shared.history)
        oc.history = list(shared.history)
    return outcomes


def recover_shared(defended: DefendedModel, task: Task, ex: Examples, evaluate: Sequence[int], *, mode: str,
                   cfg: RecoveryConfig, delta_site: str | None = None, batch_size: int = 64
                   ) -> tuple[SharedDelta, list[ExampleOutcome]]:
    """:func:`optimise_shared` on every example of ``ex``, then :func:`evaluate_shared` on the
    examples at indices ``evaluate`` (e.g. the valid flips)."""
    shared = optimise_shared(defended, task, ex, mode=mode, cfg=cfg, delta_site=delta_site, batch_size=batch_size)
    outcomes: list[ExampleOutcome] = []
    idx = list(evaluate)
    for start in range(0, len(idx), max(1, int(batch_size))):
        outcomes += evaluate_shared(defended, task, ex.select(idx[start:start + batch_size]), shared, mode=mode,
                                    cfg=cfg)
    return shared, outcomes
