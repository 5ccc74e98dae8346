"""The recovery engine: projected optimisation of a per-example delta under an active clamp.

PAPER_NOTES, "Post-intervention recovery": minimise L_rec(h_def + delta) subject to
C1 (A_S^T delta = 0 at every optimized row, mode "encoder") and C4 (||delta||_F <= budget).
C1 is enforced on the delta that is applied: the gradient is projected (as the paper does)
*and* the delta after each optimiser step is projected, because Adam's per-coordinate scaling
breaks orthogonality. Examples are batched; each has its own delta, budget and early stop, and
the loss is a sum over examples, so a batch gives the same result as one example at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from saerecover.core.checkpoints import Checkpoints
from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.examples import Examples, Task
from saerecover.core.metrics import c1_residual, clamped_features, example_metrics
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


def _optimizer(cfg: RecoveryConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr)


def _site_order(model) -> dict[str, int]:
    return {name: i for i, name in enumerate(model.site_names())}


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
) -> list[ExampleOutcome]:
    """Search a delta for every example of ``ex`` at once, then evaluate with the clamp active.

    delta_site: the site(s) where delta is added (default: the first clamped site).
    budget: optional per-example budgets (n,); defaults to ``cfg.budget`` for all.
    on_step: called after every step with (step, {site: delta (n, seq, d)} as applied next, row mask).
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
    mask = ex.position_mask(cfg.positions)
    pos = torch.arange(seq, device=dev).expand(n, seq)
    first_row = torch.where(mask, pos, seq).min(dim=1).values
    phi_mask = ex.attention_mask.bool() & (pos >= first_row.unsqueeze(1))
    budgets = (budget if budget is not None else torch.full((n,), cfg.budget)).to(dev, torch.float32)
    # rows of J for coordinates at 0 are exactly 0 for rectified encoders (zero derivative there)
    rectified = [clamp.at(s).site.architecture in RECTIFIED_ARCHITECTURES for s in phi_sites]
    projection = PROJECTIONS[mode](StepContext(clamp=clamp, cfg=cfg, sites=sites, phi_sites=phi_sites, mask=mask,
                                               phi_mask=phi_mask, rectified=rectified, example_ids=list(ex.ids)))
    torch.manual_seed(cfg.seed)

    with torch.no_grad():
        ref_states = defended.forward(ex, track=tuple(phi_sites)).sites
        phi_ref = defended_features(clamp, ref_states, phi_sites, phi_mask)
    phi_ref_norm = phi_ref.norm(dim=1)

    deltas = {s: torch.zeros(n, seq, model.d_model, device=dev, dtype=torch.float32, requires_grad=True)
              for s in sites}
    opt = _optimizer(cfg, list(deltas.values()))
    active = torch.ones(n, dtype=torch.bool, device=dev)
    steps_taken = torch.zeros(n, dtype=torch.long)
    histories: list[list[dict[str, float]]] = [[] for _ in range(n)]
    needs_phi = projection.needs_phi or cfg.lambda_act > 0 or cfg.lambda_decode > 0 or cfg.max_drift is not None
    best = Checkpoints(deltas, cfg.max_drift) if cfg.max_drift is not None else None

    for step in range(cfg.steps):
        out = defended.forward(ex, deltas, reclamp=cfg.reclamp, track=tuple(phi_sites))
        score = task.score(out.logits, ex)
        if cfg.early_stop:
            active = active & ~(score.detach() > cfg.stop_margin)
            if not bool(active.any()):
                break
        loss_vec = task.loss(out.logits, ex)
        phi_parts = defended_feature_parts(clamp, out.sites, phi_sites, phi_mask) if needs_phi else []
        phi = (torch.cat(phi_parts, dim=1) if phi_parts else phi_mask.new_zeros((n, 0), dtype=torch.float32)) \
            if needs_phi else None
        if cfg.lambda_act > 0:
            loss_vec = loss_vec + cfg.lambda_act * (phi - phi_ref).norm(dim=1) / (phi_ref_norm + 1e-8)
        if cfg.lambda_decode > 0:
            loss_vec = loss_vec + cfg.lambda_decode * _decode_drift(clamp, phi - phi_ref, phi_sites, phi_mask)
        if cfg.lambda_delta > 0:
            loss_vec = loss_vec + cfg.lambda_delta * torch.sqrt(sum(d.pow(2).flatten(1).sum(1) for d in deltas.values()))
        loss = (loss_vec * active).sum()
        finite = torch.isfinite(loss_vec.detach()) & torch.isfinite(score.detach())
        if not bool((finite | ~active).all()):
            bad = (~finite & active).nonzero().flatten().tolist()
            raise FloatingPointError(f"non-finite loss or score at step {step} for examples {[ex.ids[i] for i in bad]}")
        drift = ((phi.detach() - phi_ref).norm(dim=1) / (phi_ref_norm + 1e-8)).cpu() if needs_phi else None
        if best is not None:
            best.offer(step, score.detach().cpu(), drift, active.cpu())
        grads = dict(zip(sites, torch.autograd.grad(loss, list(deltas.values()), retain_graph=projection.needs_phi)))
        if any(not torch.isfinite(g).all() for g in grads.values()):
            bad = torch.zeros(n, dtype=torch.bool, device=dev)
            for g in grads.values():
                bad |= ~torch.isfinite(g.flatten(1)).all(dim=1)
            raise FloatingPointError(f"non-finite gradient for examples {[ex.ids[i] for i in bad.nonzero().flatten().tolist()]}")
        grads = {s: g * mask.unsqueeze(-1) for s, g in grads.items()}
        grads = projection.project_gradient(grads, StepState(step=step, deltas=deltas, phi_parts=phi_parts,
                                                             phi=phi, phi_ref=phi_ref, active=active))
        old = {s: d.detach().clone() for s, d in deltas.items()}
        for s, d in deltas.items():
            d.grad = grads[s]  # the paper's projected gradient
        opt.step()
        with torch.no_grad():
            new = {s: d.detach() * mask.unsqueeze(-1) for s, d in deltas.items()}
            final = projection.take_step(old, new, budgets, active)  # C1 on what is applied, and C4
            for s, d in deltas.items():
                d.copy_(final[s])
            if on_step is not None:
                on_step(step, {s: d.detach() for s, d in deltas.items()}, mask)
        steps_taken += active.cpu().long()
        if cfg.history:
            if drift is None:  # the history keeps the drift of every mode (read only, no gradient)
                with torch.no_grad():
                    phi_now = defended_features(clamp, out.sites, phi_sites, phi_mask)
                    drift = ((phi_now - phi_ref).norm(dim=1) / (phi_ref_norm + 1e-8)).cpu()
            sc_ = score.detach().cpu()
            lv = loss_vec.detach().cpu()
            dn = torch.sqrt(sum(d.detach().pow(2).flatten(1).sum(1) for d in deltas.values())).cpu()
            for i in torch.nonzero(active.cpu()).flatten().tolist():
                entry = {"step": step, "score": float(sc_[i]), "loss": float(lv[i]), "delta_norm": float(dn[i])}
                entry["phi_relative_drift"] = float(drift[i])  # at this step's delta, before its update
                entry.update(projection.history_fields(i))
                histories[i].append(entry)

    checkpoint_steps = None
    if best is not None:  # the last delta is a candidate too, then each example keeps its best
        with torch.no_grad():
            out = defended.forward(ex, deltas, reclamp=cfg.reclamp, track=tuple(phi_sites))
            phi = defended_features(clamp, out.sites, phi_sites, phi_mask)
            drift = ((phi - phi_ref).norm(dim=1) / (phi_ref_norm + 1e-8)).cpu()
            best.offer(steps_taken, task.score(out.logits, ex).detach().cpu(), drift, torch.ones(n, dtype=torch.bool))
            checkpoint_steps = best.restore(deltas)
    outcomes = _evaluate(defended, task, ex, deltas, mask, phi_mask, phi_sites, phi_ref, sites, projection, cfg,
                         steps_taken, histories)
    if checkpoint_steps is not None:
        for oc, st in zip(outcomes, checkpoint_steps):
            oc.metrics["checkpoint_step"] = int(st)
    return outcomes



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


def _evaluate(defended, task, ex, deltas, mask, phi_mask, phi_sites, phi_ref, sites, projection, cfg,
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
        metrics["phi_relative_drift"] = float(dphi.norm()) / (ref_norm + 1e-8)
        metrics["phi_floor_violation"] = float(torch.clamp(-dphi, min=0).norm()) / (ref_norm + 1e-8)
        metrics.update(projection.metrics(i))
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
