"""The recovery engine: projected optimisation of a per-example delta under an active clamp.

PAPER_NOTES, "Post-intervention recovery": minimise L_rec(h_def + delta) subject to
C1 (A_S^T delta = 0 at every optimized row, mode "encoder") and C4 (||delta||_F <= budget).
C1 is enforced on the delta that is applied: the gradient is projected (as the paper does)
*and* the delta after each optimiser step is projected, because Adam's per-coordinate scaling
breaks orthogonality. Examples are batched; each has its own delta, budget and early stop, and
the loss is a sum over examples, so a batch gives the same result as one example at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from saerecover.core.checkpoints import Checkpoints
from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.drift import correct_drift, drift_penalty
from saerecover.core.examples import Examples, Task
from saerecover.core.metrics import (
    EPS,
    UNDEFINED_BELOW,
    c1_residual,
    clamped_features,
    example_metrics,
    residual_scales,
)
from saerecover.core.projection import (
    PROJECTIONS,
    StepContext,
    StepState,
    defended_feature_parts,
    defended_features,
)

#: SAE architectures whose features have zero derivative wherever they are zero (ReLU, JumpReLU,
#: TopK, gated), so that J's rows for all-zero coordinates can be skipped.
RECTIFIED_ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk", "gated")


@dataclass
class ExampleOutcome:
    """The result for one example: metrics plus the tensors worth keeping."""

    example_id: str
    recovered: bool
    recovered_score: float
    steps: int
    metrics: dict[str, float | bool]
    tensors: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


def _optimizer(cfg: RecoveryConfig, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def _site_order(model) -> dict[str, int]:
    return {name: i for i, name in enumerate(model.site_names())}


@dataclass
class _Stage:
    """One optimisation stage: its rows (n, seq), steps, lr and per-example budgets (n,)."""

    name: str
    mask: torch.Tensor
    steps: int
    lr: float
    budgets: torch.Tensor


@dataclass
class _Searched:
    """What one stage leaves: its deltas (detached), steps per example, histories, checkpoints."""

    deltas: dict[str, torch.Tensor]
    steps_taken: torch.Tensor
    histories: list[list[dict[str, float]]]
    projection: Any
    checkpoint_steps: list[int] | None = None
    checkpoint_feasible: list[bool] | None = None


def _is_candidate(step: int, steps: int, every: int) -> bool:
    """Whether step ``step`` (0-based, of ``steps``) offers a checkpoint candidate: the first, every
    ``every``-th ((step + 1) % every == 0) and the last."""
    return step == 0 or step == steps - 1 or (step + 1) % every == 0


def recover_batch(
    defended: DefendedModel,
    task: Task,
    ex: Examples,
    *,
    mode: str,
    cfg: RecoveryConfig,
    delta_site: str | list[str] | None = None,
    budget: torch.Tensor | None = None,
    on_step: Callable[[int, dict[str, torch.Tensor], torch.Tensor], None] | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> list[ExampleOutcome]:
    """Search a delta for every example of ``ex`` at once, then evaluate with the clamp active.

    delta_site: the site(s) where delta is added (default: the first clamped site).
    budget: optional per-example budgets (n,); defaults to ``cfg.budget_rel`` x each example's
    residual scale (metrics.residual_scales) when that is set, else ``cfg.budget`` for all.
    on_step: called after every step with (step, {site: delta (n, seq, d)} as applied next, the
    stage's row mask). With ``cfg.anchor_steps`` a first stage optimises the answer row alone;
    its delta then stays fixed (added to the main stage's) and the main stage runs.
    init: the deltas to start from, {site: a tensor broadcastable to (n, seq, d)}, kept at the
    optimized rows of the first stage (zeros by default); with ``cfg.steps == 0`` it is evaluated
    as given (a shared delta, saerecover.core.shared).
    """
    cfg.validate()
    if mode not in PROJECTIONS:
        raise ValueError(f"unknown projection {mode!r}; valid: {', '.join(PROJECTIONS)}")
    model, clamp = defended.model, defended.clamp
    order = _site_order(model)
    sites = [delta_site] if isinstance(delta_site, str) else list(delta_site or [clamp.site_clamps[0].site.hook_name])
    for name in sites:
        defended.check_delta_site(name)
    sites = sorted(dict.fromkeys(sites), key=order.__getitem__)
    first = order[sites[0]]
    phi_sites = sorted((sc.site.hook_name for sc in clamp.site_clamps if order[sc.site.hook_name] >= first),
                       key=order.__getitem__)
    primary = clamp.at(sites[0])
    if primary is None:
        raise ValueError(f"the first delta site {sites[0]!r} must be clamped; clamped: "
                         f"{[sc.site.hook_name for sc in clamp.site_clamps]}")
    if primary.features.numel() == 0:
        raise ValueError(f"the clamp at {sites[0]!r} has an empty feature set: nothing is defended there; "
                         f"give at least one feature index (valid: 0..{primary.site.d_sae - 1})")
    ex.validate()
    if budget is not None:
        budget = torch.as_tensor(budget)
        if tuple(budget.shape) != (len(ex),):
            raise ValueError(f"budget must hold one value per example, shape ({len(ex)},), got shape "
                             f"{tuple(budget.shape)}")
        if not bool((torch.isfinite(budget) & (budget > 0)).all()):
            raise ValueError(f"per-example budgets must be finite and > 0 (C4), got {budget.tolist()[:8]}")

    ex = ex.to(model.device)
    n, seq = ex.input_ids.shape
    dev = model.device
    plan = []  # (name, rows, steps, lr) of each stage
    if cfg.anchor_steps > 0:
        plan.append(("anchor", ex.position_mask("answer"), cfg.anchor_steps, cfg.anchor_lr))
    plan.append(("main", ex.position_mask(cfg.positions, cfg.response_rows), cfg.steps, cfg.lr))
    for name, rows, _, _ in plan:
        empty = ~rows.any(dim=1)
        if bool(empty.any()):
            bad = [ex.ids[i] for i in empty.nonzero().flatten().tolist()[:5]]
            raise ValueError(f"examples {bad} have no rows for positions={cfg.positions!r} (nothing after the "
                             "answer position)" if name == "main" else f"examples {bad} have no answer row")
    mask = torch.stack([rows for _, rows, _, _ in plan]).any(dim=0)
    pos = torch.arange(seq, device=dev).expand(n, seq)
    if cfg.phi_positions == "response":
        phi_mask = ex.position_mask("response", cfg.response_rows)
    else:
        first_row = torch.where(mask, pos, seq).min(dim=1).values
        phi_mask = ex.attention_mask.bool() & (pos >= first_row.unsqueeze(1))
    # rows of J for coordinates at 0 are exactly 0 for rectified encoders (zero derivative there)
    rectified = [clamp.at(s).site.architecture in RECTIFIED_ARCHITECTURES for s in phi_sites]

    with torch.no_grad():
        ref_states = defended.forward(ex, track=tuple(dict.fromkeys(phi_sites + sites))).sites
        ref_parts = defended_feature_parts(clamp, ref_states, phi_sites, phi_mask)
    phi_ref = torch.cat(ref_parts, dim=1)  # never empty: phi_sites holds the first (clamped) delta site
    scales = residual_scales([ref_states[s].h_def for s in sites], mask)  # C4 relative to the residual
    if budget is None:
        budget = cfg.budget_rel * scales if cfg.budget_rel is not None else torch.full((n,), cfg.budget)
    budgets = budget.to(dev, torch.float32)
    stages = []
    for name, rows, steps, lr in plan:
        stage_budgets = budgets
        if name == "anchor" and cfg.anchor_budget is not None:
            stage_budgets = torch.full((n,), float(cfg.anchor_budget), device=dev)
        stages.append(_Stage(name, rows, steps, lr, stage_budgets))

    fixed: dict[str, torch.Tensor] = {s: torch.zeros(n, seq, model.d_model, device=dev) for s in sites}
    done: list[_Searched] = []
    offset = 0
    for st in stages:
        ctx = StepContext(clamp=clamp, cfg=cfg, sites=sites, phi_sites=phi_sites, mask=st.mask, phi_mask=phi_mask,
                          rectified=rectified, example_ids=list(ex.ids))
        result = _search(defended, task, ex, mode=mode, cfg=cfg, ctx=ctx, stage=st, fixed=fixed, ref_parts=ref_parts,
                         phi_ref=phi_ref, on_step=on_step, step_offset=offset, init=init if not done else None)
        done.append(result)
        offset += st.steps
        fixed = {s: fixed[s] + result.deltas[s] for s in sites}

    last = done[-1]
    steps_taken = sum(r.steps_taken for r in done)
    histories = [[{**h, "stage": st.name} if len(done) > 1 else h for st, r in zip(stages, done) for h in r.histories[i]]
                 for i in range(n)]
    outcomes = _evaluate(defended, task, ex, fixed, mask, phi_mask, phi_sites, phi_ref, sites,
                         [r.projection for r in done], cfg, steps_taken, histories)
    for i, oc in enumerate(outcomes):
        b, scale = float(budgets[i]), float(scales[i])  # C4 as enforced, absolute and relative
        oc.metrics.update(budget=b, relative_budget=b / scale if scale > 0 else math.nan)
        main_norm = float(torch.sqrt(sum(last.deltas[s][i].float().pow(2).sum() for s in sites)))
        # the reference's relative delta norm: the (last stage's) delta against Phi_def, not h_def
        # (undefined, NaN, where the clamp leaves Phi_def at 0, as the other relative metrics)
        ref_norm = float(phi_ref[i].norm())
        oc.metrics["relative_delta_norm_phi"] = main_norm / (ref_norm + EPS) if ref_norm > UNDEFINED_BELOW else math.nan
        if len(done) > 1:
            oc.metrics["anchor_delta_norm"] = float(torch.sqrt(sum(done[0].deltas[s][i].float().pow(2).sum()
                                                                   for s in sites)))
            oc.metrics["main_delta_norm"] = main_norm
            if done[0].checkpoint_steps is not None:
                oc.metrics["anchor_checkpoint_step"] = int(done[0].checkpoint_steps[i])
        if last.checkpoint_steps is not None:
            oc.metrics["checkpoint_step"] = int(last.checkpoint_steps[i])
            oc.metrics["checkpoint_feasible"] = bool(last.checkpoint_feasible[i])
    return outcomes


def _search(defended: DefendedModel, task: Task, ex: Examples, *, mode: str, cfg: RecoveryConfig, ctx: StepContext,
            stage: _Stage, fixed: dict[str, torch.Tensor], ref_parts: list[torch.Tensor], phi_ref: torch.Tensor,
            on_step, step_offset: int, init: Mapping[str, torch.Tensor] | None = None) -> _Searched:
    """One stage of projected optimisation: delta at ``stage.mask``'s rows of every delta site,
    added to the ``fixed`` deltas of earlier stages, ``stage.steps`` steps."""
    model, clamp = defended.model, defended.clamp
    sites, phi_sites, phi_mask, mask = ctx.sites, ctx.phi_sites, ctx.phi_mask, stage.mask
    n, seq = ex.input_ids.shape
    dev = model.device
    projection = PROJECTIONS[mode](ctx)
    budgets = stage.budgets
    phi_ref_norm = phi_ref.norm(dim=1)
    deltas = {s: torch.zeros(n, seq, model.d_model, device=dev, dtype=torch.float32, requires_grad=True)
              for s in sites}
    if init is not None:
        with torch.no_grad():
            for s, d in deltas.items():
                d.copy_(torch.as_tensor(init[s]).to(dev, torch.float32) * mask.unsqueeze(-1))
    opt = _optimizer(cfg, list(deltas.values()), stage.lr)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    steps_taken = torch.zeros(n, dtype=torch.long)
    histories: list[list[dict[str, float]]] = [[] for _ in range(n)]
    needs_phi = projection.needs_phi or cfg.lambda_act > 0 or cfg.lambda_decode > 0 or cfg.max_drift is not None
    best = Checkpoints(deltas, cfg.max_drift, cfg.checkpoint_fallback_weight) if cfg.max_drift is not None else None
    # the reference adds the penalty's gradient after the row-space projection (jacobian / sketch)
    split = cfg.lambda_act > 0 and cfg.penalty_after_projection and projection.row_space
    corrections = cfg.drift_correction_steps if projection.row_space else 0

    def applied(ds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {s: ds[s] + fixed[s] for s in sites}

    def measure(ds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Behavior score and Phi relative drift (n,) at ``ds`` (no gradients)."""
        with torch.no_grad():
            out = defended.forward(ex, applied(ds), reclamp=cfg.reclamp, track=tuple(phi_sites))
            phi = defended_features(clamp, out.sites, phi_sites, phi_mask)
            return task.score(out.logits, ex).detach().cpu(), ((phi - phi_ref).norm(dim=1) / (phi_ref_norm + 1e-8)).cpu()

    def penalty_at(ds: dict[str, torch.Tensor]) -> torch.Tensor:
        out = defended.forward(ex, applied(ds), reclamp=cfg.reclamp, track=tuple(phi_sites))
        return drift_penalty(defended_feature_parts(clamp, out.sites, phi_sites, phi_mask), ref_parts, phi_mask,
                             cfg.drift_penalty)

    for step in range(stage.steps):
        out = defended.forward(ex, applied(deltas), reclamp=cfg.reclamp, track=tuple(phi_sites))
        score = task.score(out.logits, ex)
        if cfg.early_stop:
            active = active & ~(score.detach() > cfg.stop_margin)
            if not bool(active.any()):
                break
        loss_vec = task.loss(out.logits, ex)
        phi_parts = defended_feature_parts(clamp, out.sites, phi_sites, phi_mask) if needs_phi else []
        phi = torch.cat(phi_parts, dim=1) if needs_phi else None
        penalty = (cfg.lambda_act * drift_penalty(phi_parts, ref_parts, phi_mask, cfg.drift_penalty)
                   if cfg.lambda_act > 0 else None)
        if penalty is not None and not split:
            loss_vec = loss_vec + penalty
        if cfg.lambda_decode > 0:
            loss_vec = loss_vec + cfg.lambda_decode * _decode_drift(clamp, phi - phi_ref, phi_sites, phi_mask)
        if cfg.lambda_delta > 0:
            # vector_norm: its gradient at delta = 0 (every run's start) is 0; sqrt(sum of squares) has NaN there
            flat = torch.cat([d.flatten(1) for d in deltas.values()], dim=1)
            loss_vec = loss_vec + cfg.lambda_delta * torch.linalg.vector_norm(flat, dim=1)
        loss = (loss_vec * active).sum()
        total = loss_vec.detach() + (penalty.detach() if split else 0.0)
        finite = torch.isfinite(total) & torch.isfinite(score.detach())
        if not bool((finite | ~active).all()):
            bad = (~finite & active).nonzero().flatten().tolist()
            raise FloatingPointError(f"non-finite loss or score at step {step} for examples {[ex.ids[i] for i in bad]}")
        drift = ((phi.detach() - phi_ref).norm(dim=1) / (phi_ref_norm + 1e-8)).cpu() if needs_phi else None
        if best is not None and not cfg.checkpoint_after_update and _is_candidate(step, stage.steps, cfg.checkpoint_every):
            best.offer(steps_taken, score.detach().cpu(), drift, active.cpu())
        params = list(deltas.values())
        pen_grads = (dict(zip(sites, torch.autograd.grad((penalty * active).sum(), params, retain_graph=True)))
                     if split else None)
        grads = dict(zip(sites, torch.autograd.grad(loss, params, retain_graph=projection.needs_phi)))
        for g in [*grads.values(), *(pen_grads or {}).values()]:
            if not torch.isfinite(g).all():
                bad = torch.zeros(n, dtype=torch.bool, device=dev)
                for h in [*grads.values(), *(pen_grads or {}).values()]:
                    bad |= ~torch.isfinite(h.flatten(1)).all(dim=1)
                raise FloatingPointError(f"non-finite gradient for examples "
                                         f"{[ex.ids[i] for i in bad.nonzero().flatten().tolist()]}")
        grads = {s: g * mask.unsqueeze(-1) for s, g in grads.items()}
        phi_inputs = {s: out.sites[s].h_rec.detach() for s in phi_sites} if projection.needs_phi else None
        grads = projection.project_gradient(grads, StepState(step=step, deltas=deltas, phi_parts=phi_parts,
                                                             phi=phi, phi_ref=phi_ref, active=active,
                                                             phi_inputs=phi_inputs))
        if pen_grads is not None:  # the penalty's gradient, unprojected
            grads = {s: grads[s] + pen_grads[s] * mask.unsqueeze(-1) for s in sites}
        old = {s: d.detach().clone() for s, d in deltas.items()}
        for s, d in deltas.items():
            d.grad = grads[s]  # the paper's projected gradient
        try:
            opt.step()
        except RuntimeError as err:  # e.g. Adam's lr / (1 - beta1^t) past float32's range
            raise FloatingPointError(f"the {cfg.optimizer} step overflowed at step {step} (lr={cfg.lr:g}): "
                                     f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}") from err
        with torch.no_grad():
            new = {s: d.detach() * mask.unsqueeze(-1) for s, d in deltas.items()}
            _check_finite_step(new, active, ex.ids, step, cfg)
            final = projection.take_step(old, new, budgets, active)  # C1 on what is applied, and C4
            for s, d in deltas.items():
                d.copy_(final[s])
        if corrections:
            correct_drift(deltas, penalty_at, steps=corrections, lr=cfg.drift_correction_lr, mask=mask,
                          budgets=budgets, active=active)
        steps_taken += active.cpu().long()
        if best is not None and cfg.checkpoint_after_update and _is_candidate(step, stage.steps, cfg.checkpoint_every):
            best.offer(steps_taken, *measure(deltas), active.cpu())
        if on_step is not None:
            on_step(step_offset + step, {s: d.detach() for s, d in applied(deltas).items()}, mask)
        if cfg.history:
            if drift is None:  # the history keeps the drift of every mode (read only, no gradient)
                with torch.no_grad():
                    phi_now = defended_features(clamp, out.sites, phi_sites, phi_mask)
                    drift = ((phi_now - phi_ref).norm(dim=1) / (phi_ref_norm + 1e-8)).cpu()
            sc_ = score.detach().cpu()
            lv = total.cpu()
            dn = torch.sqrt(sum(d.detach().pow(2).flatten(1).sum(1) for d in deltas.values())).cpu()
            for i in torch.nonzero(active.cpu()).flatten().tolist():
                entry = {"step": step, "score": float(sc_[i]), "loss": float(lv[i]), "delta_norm": float(dn[i])}
                entry["phi_relative_drift"] = float(drift[i])  # at this step's delta, before its update
                entry.update(projection.history_fields(i))
                histories[i].append(entry)

    result = _Searched(deltas={s: d.detach() for s, d in deltas.items()}, steps_taken=steps_taken,
                       histories=histories, projection=projection)
    if best is not None:  # the last delta is a candidate too, then each example keeps its best
        best.offer(steps_taken, *measure(deltas), torch.ones(n, dtype=torch.bool))
        result.checkpoint_steps = best.restore(deltas)
        result.checkpoint_feasible = best.feasible.tolist()
        result.deltas = {s: d.detach() for s, d in deltas.items()}
    return result


def _check_finite_step(new: dict[str, torch.Tensor], active: torch.Tensor, ids: list[str], step: int,
                       cfg: RecoveryConfig) -> None:
    """FloatingPointError naming the examples whose delta after the optimizer step is not finite
    (an lr so large that lr x step overflows float32), before any projection sees it."""
    bad = torch.zeros_like(active)
    for d in new.values():
        bad |= ~torch.isfinite(d.flatten(1)).all(dim=1)
    bad &= active
    if bool(bad.any()):
        names = [ids[i] for i in bad.nonzero().flatten().tolist()]
        raise FloatingPointError(f"non-finite delta after the {cfg.optimizer} step at step {step} for examples "
                                 f"{names}: the step overflowed float32 (lr={cfg.lr:g} is too large)")


def _decode_drift(clamp, dphi: torch.Tensor, phi_sites: list[str], phi_mask: torch.Tensor) -> torch.Tensor:
    """Per-example ||D_S(dz_S)|| summed over the phi sites, from a Phi difference (n, m)."""
    n, seq = phi_mask.shape
    total = dphi.new_zeros(n)
    offset = 0
    for name in phi_sites:
        sc = clamp.at(name)
        k = sc.features.numel()
        dz = dphi[:, offset:offset + seq * k].reshape(n, seq, k)
        total = total + sc.site.decode_features(dz, sc.features.to(dz.device)).flatten(1).norm(dim=1)
        offset += seq * k
    return total


def _mode_metrics(projections: list, i: int) -> dict[str, Any]:
    """Example ``i``'s mode metrics over the stages (a number: the largest, as each is a maximum)."""
    out: dict[str, Any] = {}
    for p in projections:
        for k, v in p.metrics(i).items():
            out[k] = max(out[k], v) if isinstance(v, (int, float)) and isinstance(out.get(k), (int, float)) else v
    return out


def _evaluate(defended, task, ex, deltas, mask, phi_mask, phi_sites, phi_ref, sites, projections, cfg,
              steps_taken, histories) -> list[ExampleOutcome]:
    """Final pass with the clamp active: behavior, then every metric on what was applied."""
    clamp = defended.clamp
    primary = clamp.at(sites[0])
    with torch.no_grad():
        fixed = {s: d.detach() for s, d in deltas.items()}
        final = defended.forward(ex, fixed, reclamp=cfg.reclamp, track=tuple(phi_sites))
        if hasattr(task, "judge"):  # the task decides B itself (e.g. by generating with the edits active)
            scores = task.judge(defended, ex, with_clamp=True, deltas=fixed, reclamp=cfg.reclamp).float().cpu()
        else:
            scores = task.score(final.logits, ex).float().cpu()
        if not bool(torch.isfinite(scores).all()):
            bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
            raise FloatingPointError(f"non-finite final score for examples {[ex.ids[i] for i in bad]}")
        phi = defended_features(clamp, final.sites, phi_sites, phi_mask)
        state = final.sites[sites[0]]
        a = primary.site.encoder_columns(primary.features)
    outcomes = []
    for i in range(len(ex)):
        rows = mask[i].nonzero().flatten()
        d_rows = fixed[sites[0]][i, rows].float()
        hd = state.h_def[i, rows].float()
        # with reclamp the model sees the clamp re-applied; drift is measured on what the attacker added
        hr = state.h_rec[i, rows].float() if not cfg.reclamp else hd + d_rows
        feats = clamped_features(primary.site, primary.features, hd, hr)
        recovered = bool(scores[i] > 0)
        metrics = example_metrics(site=primary.site, features=primary.features, feats=feats, delta_rows=d_rows,
                                  h_def_rows=hd, a=a, recovered=recovered, eta=cfg.eta)
        if len(sites) > 1:
            all_rows = torch.cat([fixed[s][i, rows].reshape(-1) for s in sites])
            metrics["delta_norm"] = float(all_rows.norm())
            c1s = [c1_residual(clamp.at(s).site.encoder_columns(clamp.at(s).features), fixed[s][i, rows])
                   for s in sites if clamp.at(s) is not None]
            metrics["c1_residual"] = max(c1s) if c1s else 0.0
        dphi = (phi[i] - phi_ref[i])
        ref_norm = float(phi_ref[i].norm())
        # relative to Phi_def, undefined (NaN) where the clamp leaves Phi_def at 0, as relative_drift
        defined = ref_norm > UNDEFINED_BELOW
        metrics["phi_relative_drift"] = float(dphi.norm()) / (ref_norm + EPS) if defined else math.nan
        metrics["phi_floor_violation"] = float(torch.clamp(-dphi, min=0).norm()) / (ref_norm + EPS) if defined \
            else math.nan
        metrics.update(_mode_metrics(projections, i))
        tensors = {
            "delta": d_rows.cpu().contiguous(),
            "rows": rows.cpu().contiguous(),
            "h_def": hd.cpu().contiguous(),
            "z_def": feats.z_def.cpu().contiguous(),
            "z_rec": feats.z_rec.cpu().contiguous(),
        }
        for s in sites[1:]:
            tensors[f"delta@{s}"] = fixed[s][i, rows].float().cpu().contiguous()
        outcomes.append(ExampleOutcome(
            example_id=ex.ids[i], recovered=recovered, recovered_score=float(scores[i]),
            steps=int(steps_taken[i]), metrics=metrics, tensors=tensors, history=histories[i]))
    return outcomes
