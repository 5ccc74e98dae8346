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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import linalg
from .clamp import SiteClamp
from .defense import DefendedModel
from .metrics import SiteFeatures, clamped_features, example_metrics
from .tasks.base import Examples, Task

PROJECTIONS = ("none", "encoder")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class RecoveryConfig:
    """How delta is searched for. Defaults follow the paper's IOI setting."""

    steps: int = 100
    lr: float = 0.1
    budget: float = 20.0
    optimizer: str = "adam"
    positions: str = "answer"
    reclamp: bool = False
    lambda_act: float = 0.0
    lambda_decode: float = 0.0
    lambda_delta: float = 0.0
    early_stop: bool = False
    stop_margin: float = 0.0
    eta: float = 0.0
    rcond: float | None = None
    seed: int = 0
    history: bool = True

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0 (C4: ||delta|| <= budget), got {self.budget}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.positions not in ("answer", "all"):
            raise ValueError(f"unknown positions {self.positions!r}; valid: 'answer', 'all'")
        for name in ("lambda_act", "lambda_decode", "lambda_delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


class Projector:
    """Row-wise projection of (n, seq, d) tensors at the masked rows for one mode."""

    def __init__(self, mode: str, sc: SiteClamp, rcond: float | None) -> None:
        if mode not in PROJECTIONS:
            raise ValueError(f"unknown projection {mode!r}; valid: {', '.join(PROJECTIONS)}")
        self.mode = mode
        self.encoder = None
        if mode == "encoder":
            a = sc.site.encoder_columns(sc.features)
            self.encoder = linalg.EncoderNullProjector(a, rcond=rcond)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            return x * mask.unsqueeze(-1)
        out = torch.zeros_like(x)
        rows = x[mask]
        if rows.numel():
            out[mask] = self.encoder.apply(rows.contiguous())
        return out


def _optimizer(cfg: RecoveryConfig, param: torch.Tensor) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam([param], lr=cfg.lr)
    return torch.optim.SGD([param], lr=cfg.lr)


def recover_batch(
    defended: DefendedModel,
    task: Task,
    ex: Examples,
    *,
    mode: str,
    cfg: RecoveryConfig,
    delta_site: str | None = None,
    budget: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[ExampleOutcome]:
    """Search a delta for every example of ``ex`` at once, then evaluate with the clamp active.

    budget: optional per-example budgets (n,); defaults to ``cfg.budget`` for all.
    on_step: called after every step with (step, delta (n, seq, d) as applied next, row mask).
    """
    cfg.validate()
    model = defended.model
    sc = defended.clamp.at(delta_site) if delta_site else defended.clamp.site_clamps[0]
    if sc is None:
        raise ValueError(f"delta site {delta_site!r} is not a clamped site; clamped: "
                         f"{[s.site.hook_name for s in defended.clamp.site_clamps]}")
    site_name = sc.site.hook_name
    ex = ex.to(model.device)
    n, seq = ex.input_ids.shape
    mask = ex.position_mask(cfg.positions)
    budgets = (budget if budget is not None else torch.full((n,), cfg.budget)).to(model.device, torch.float32)
    project = Projector(mode, sc, cfg.rcond)
    torch.manual_seed(cfg.seed)

    with torch.no_grad():
        ref = defended.forward(ex, reclamp=False, track=(site_name,)).sites[site_name]
        z_ref = sc.site.encode(ref.h_def)[..., sc.features.to(model.device)]
    z_ref_norm = z_ref.mul(mask.unsqueeze(-1)).flatten(1).norm(dim=1)

    delta = torch.zeros(n, seq, model.d_model, device=model.device, dtype=torch.float32, requires_grad=True)
    opt = _optimizer(cfg, delta)
    active = torch.ones(n, dtype=torch.bool, device=model.device)
    steps_taken = torch.zeros(n, dtype=torch.long)
    histories: list[list[dict[str, float]]] = [[] for _ in range(n)]

    for step in range(cfg.steps):
        out = defended.forward(ex, {site_name: delta}, reclamp=cfg.reclamp)
        score = task.score(out.logits, ex)
        if cfg.early_stop:
            active = active & ~(score.detach() > cfg.stop_margin)
            if not bool(active.any()):
                break
        loss_vec = task.loss(out.logits, ex)
        penalty_needed = cfg.lambda_act > 0 or cfg.lambda_decode > 0
        if penalty_needed:
            z_cur = sc.site.encode(out.sites[site_name].h_rec)[..., sc.features.to(model.device)]
            dz = (z_cur - z_ref) * mask.unsqueeze(-1)
            if cfg.lambda_act > 0:
                loss_vec = loss_vec + cfg.lambda_act * dz.flatten(1).norm(dim=1) / (z_ref_norm + 1e-8)
            if cfg.lambda_decode > 0:
                dec = sc.site.decode_features(dz, sc.features.to(model.device))
                loss_vec = loss_vec + cfg.lambda_decode * dec.flatten(1).norm(dim=1)
        if cfg.lambda_delta > 0:
            loss_vec = loss_vec + cfg.lambda_delta * delta.flatten(1).norm(dim=1)
        loss = (loss_vec * active).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        if not torch.isfinite(grad).all():
            bad = (~torch.isfinite(grad.flatten(1))).any(dim=1)
            raise FloatingPointError(f"non-finite gradient for examples {[ex.ids[i] for i in bad.nonzero().flatten().tolist()]}")
        old = delta.detach().clone()
        delta.grad = project(grad, mask)  # the paper's projected gradient
        opt.step()
        with torch.no_grad():
            new = project(delta, mask)  # the step actually taken stays in the null space (C1)
            keep = active.view(n, 1, 1)
            new = torch.where(keep, new, old)
            norms = new.flatten(1).norm(dim=1)
            scale = torch.clamp(budgets / (norms + 1e-12), max=1.0)  # C4
            new = new * scale.view(n, 1, 1)
            delta.copy_(new)
            if on_step is not None:
                on_step(step, delta.detach(), mask)
        steps_taken += active.cpu().long()
        if cfg.history:
            s = score.detach().cpu()
            lv = loss_vec.detach().cpu()
            dn = delta.detach().flatten(1).norm(dim=1).cpu()
            for i in torch.nonzero(active.cpu()).flatten().tolist():
                histories[i].append({"step": step, "score": float(s[i]), "loss": float(lv[i]), "delta_norm": float(dn[i])})

    with torch.no_grad():
        final = defended.forward(ex, {site_name: delta.detach()}, reclamp=cfg.reclamp)
        scores = task.score(final.logits, ex).float().cpu()
        state = final.sites[site_name]
        a = sc.site.encoder_columns(sc.features)

    outcomes = []
    for i in range(n):
        rows = mask[i].nonzero().flatten()
        d_rows = delta.detach()[i, rows].float()
        hd = state.h_def[i, rows].float()
        hr = state.h_rec[i, rows] if not cfg.reclamp else (state.h_def[i, rows].float() + d_rows)
        feats: SiteFeatures = clamped_features(sc.site, sc.features, hd, hr.float())
        recovered = bool(scores[i] > 0)
        metrics = example_metrics(site=sc.site, features=sc.features, feats=feats, delta_rows=d_rows,
                                  h_def_rows=hd, a=a, recovered=recovered, eta=cfg.eta)
        outcomes.append(ExampleOutcome(
            example_id=ex.ids[i],
            recovered=recovered,
            recovered_score=float(scores[i]),
            steps=int(steps_taken[i]),
            metrics=metrics,
            tensors={
                "delta": d_rows.cpu().contiguous(),
                "rows": rows.cpu().contiguous(),
                "h_def": hd.cpu().contiguous(),
                "z_def": feats.z_def.cpu().contiguous(),
                "z_rec": feats.z_rec.cpu().contiguous(),
            },
            history=histories[i],
        ))
    return outcomes
