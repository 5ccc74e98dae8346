"""The soft-suffix baseline (an embedding-space attack in the spirit of OABD): ``n_suffix``
placeholder tokens appended to the prompt and a delta at ``blocks.0.hook_resid_pre``
restricted to those rows, optimized with the clamp active toward the same target,
unconstrained, under the same budget. A delta at the input of block 0 at those rows is exactly a
learned additive change of their input embeddings. Its ``phi_relative_drift`` is Phi over every
clamped site from the first suffix row on, against the defended state of the same suffixed
prompt, so the drift / recovery trade-off of residual recovery and of suffixes reads side by side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.examples import Examples, pad_right
from saerecover.core.drift import drift_penalty
from saerecover.core.projection import defended_feature_parts, defended_features
from saerecover.core.recovery import ExampleOutcome
from saerecover.tasks.refusal.task import Refusal

SUFFIX = "suffix"


SUFFIX_SITE = "blocks.0.hook_resid_pre"


#: Placeholder suffix tokens tried in order: the first that is one known token is used.
SUFFIX_PLACEHOLDERS = ("!", " !", ".", " .")


def placeholder_token(tokenizer: Any, token: str | int | None = None) -> int:
    """The suffix placeholder token id: ``token`` (an id or a one-token string), or the first
    of :data:`SUFFIX_PLACEHOLDERS` that is one known token (else the EOS token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(token, int) and not isinstance(token, bool):
        return int(token)
    for text in ([token] if token is not None else SUFFIX_PLACEHOLDERS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != unk:
            return int(ids[0])
    eos = getattr(tokenizer, "eos_token_id", None)
    if token is None and isinstance(eos, int):
        return eos  # a vocabulary without punctuation: the EOS token as placeholder
    raise ValueError(f"no one-token suffix placeholder among {token or SUFFIX_PLACEHOLDERS}; pass suffix_token=ID")


def suffix_examples(task: Refusal, ex: Examples, n_suffix: int, token_id: int) -> tuple[Examples, torch.Tensor]:
    """``ex`` with ``n_suffix`` copies of ``token_id`` inserted after each prompt, before the
    response. Returns (examples, suffix_start (n,)); ``prompt_len`` includes the suffix."""
    if n_suffix < 1:
        raise ValueError(f"n_suffix must be >= 1, got {n_suffix}")
    plen = ex.targets["prompt_len"].tolist()
    rlen = ex.targets["response_len"].tolist()
    seqs = []
    for i in range(len(ex)):
        row = ex.input_ids[i].tolist()
        p, r = int(plen[i]), int(rlen[i])
        seqs.append(row[:p] + [token_id] * n_suffix + row[p:p + r])
    ids, mask = pad_right(seqs, task._pad())
    prompt_len = torch.tensor(plen, dtype=torch.long) + n_suffix
    response_len = torch.tensor(rlen, dtype=torch.long)
    out = Examples(input_ids=ids, attention_mask=mask, answer_pos=prompt_len - 1, ids=list(ex.ids),
                   targets={"prompt_len": prompt_len, "response_len": response_len,
                            "weights": task.response_weights(prompt_len, response_len, ids.shape[1])},
                   meta=list(ex.meta))
    return out, torch.tensor(plen, dtype=torch.long)


def recover_suffix(
    defended: DefendedModel,
    task: Refusal,
    ex: Examples,
    *,
    cfg: RecoveryConfig,
    n_suffix: int = 8,
    token: str | int | None = None,
    lr: float | None = None,
    budget: float | None = None,
) -> list[ExampleOutcome]:
    """The soft-suffix baseline on ``ex`` (examples of ``task``), batched.

    Optimizes delta (n, seq, d_model) at ``blocks.0.hook_resid_pre``, non-zero only at the
    suffix rows, with Adam on ``task.loss`` (+ ``cfg.lambda_act`` x the drift penalty
    ``cfg.drift_penalty``, as the residual modes), the clamp active, for ``cfg.steps`` steps; C4 by rescaling to ``budget``
    (default ``cfg.budget``). Then judges with the clamp and the suffix delta active and
    measures ``phi_relative_drift`` / ``phi_floor_violation`` over every clamped site.
    """
    cfg.validate()
    model, clamp = defended.model, defended.clamp
    dev = model.device
    token_id = placeholder_token(task.tokenizer, token)
    sx, start = suffix_examples(task, ex, n_suffix, token_id)
    sx.validate()
    sx = sx.to(dev)
    n, seq = sx.input_ids.shape
    cols = torch.arange(seq, device=dev).unsqueeze(0)
    start = start.to(dev).unsqueeze(1)
    mask = (cols >= start) & (cols < start + n_suffix)
    phi_mask = sx.attention_mask.bool() & (cols >= start)
    order = {name: i for i, name in enumerate(model.site_names())}
    phi_sites = sorted((sc.site.hook_name for sc in clamp.site_clamps), key=order.__getitem__)
    lr = float(lr if lr is not None else cfg.lr)
    bud = float(budget if budget is not None else cfg.budget)

    with torch.no_grad():
        ref = defended.forward(sx, track=(*phi_sites, SUFFIX_SITE))
        ref_parts = defended_feature_parts(clamp, ref.sites, phi_sites, phi_mask)
        phi_ref = torch.cat(ref_parts, dim=1) if ref_parts else phi_mask.new_zeros((n, 0), dtype=torch.float32)
        embed = ref.sites[SUFFIX_SITE].h_def.float()
        init_scores = task.judge(defended, sx, with_clamp=True, stage="suffix_init")
    delta = torch.zeros(n, seq, model.d_model, device=dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr) if cfg.optimizer == "adam" else torch.optim.SGD([delta], lr=lr)
    histories: list[list[dict[str, float]]] = [[] for _ in range(n)]
    for step in range(cfg.steps):
        out = defended.forward(sx, {SUFFIX_SITE: delta}, reclamp=cfg.reclamp, track=tuple(phi_sites))
        loss_vec = task.loss(out.logits, sx)
        if cfg.lambda_act > 0:
            parts = defended_feature_parts(clamp, out.sites, phi_sites, phi_mask)
            loss_vec = loss_vec + cfg.lambda_act * drift_penalty(parts, ref_parts, phi_mask, cfg.drift_penalty)
        if cfg.lambda_delta > 0:
            # ||delta|| by vector_norm: its gradient at delta = 0 (the start) is 0; sqrt(sum of squares) gives NaN
            loss_vec = loss_vec + cfg.lambda_delta * torch.linalg.vector_norm(delta.flatten(1), dim=1)
        if not bool(torch.isfinite(loss_vec.detach()).all()):
            raise FloatingPointError(f"non-finite suffix loss at step {step}")
        (grad,) = torch.autograd.grad(loss_vec.sum(), [delta])
        delta.grad = grad * mask.unsqueeze(-1)
        opt.step()
        with torch.no_grad():
            delta.mul_(mask.unsqueeze(-1))
            norms = delta.flatten(1).norm(dim=1)
            scale = torch.where(norms > bud, bud / norms.clamp_min(1e-30), torch.ones_like(norms))
            delta.mul_(scale.view(n, 1, 1))  # C4
        if cfg.history:
            score = task.score(out.logits.detach(), sx).cpu()
            lv = loss_vec.detach().cpu()
            for i in range(n):
                histories[i].append({"step": step, "score": float(score[i]), "loss": float(lv[i]),
                                     "delta_norm": float(norms[i].clamp(max=bud))})

    with torch.no_grad():
        fixed = {SUFFIX_SITE: delta.detach()}
        final = defended.forward(sx, fixed, reclamp=cfg.reclamp, track=tuple(phi_sites))
        scores = task.judge(defended, sx, with_clamp=True, deltas=fixed, reclamp=cfg.reclamp).float().cpu()
        phi = defended_features(clamp, final.sites, phi_sites, phi_mask)
        target_score = task.score(final.logits, sx).cpu()
    outcomes = []
    for i in range(n):
        rows = mask[i].nonzero().flatten()
        d_rows = delta.detach()[i, rows].float()
        dphi = phi[i] - phi_ref[i]
        ref_norm = float(phi_ref[i].norm())
        d_norm = float(d_rows.norm())
        metrics: dict[str, Any] = {
            "delta_norm": d_norm,
            "relative_delta_norm": d_norm / (float(embed[i, rows].norm()) + 1e-8),
            "phi_relative_drift": float(dphi.norm()) / (ref_norm + 1e-8),
            "phi_floor_violation": float(torch.clamp(-dphi, min=0).norm()) / (ref_norm + 1e-8),
            "suffix_tokens": int(n_suffix),
            "suffix_token_id": int(token_id),
            "suffix_init_answered": bool(init_scores[i] > 0),
            "target_logprob": float(target_score[i]),
        }
        tensors = {"delta": d_rows.cpu().contiguous(), "rows": rows.cpu().contiguous(),
                   "h_def": embed[i, rows].cpu().contiguous()}
        outcomes.append(ExampleOutcome(example_id=sx.ids[i], recovered=bool(scores[i] > 0),
                                       recovered_score=float(scores[i]), steps=cfg.steps, metrics=metrics,
                                       tensors=tensors, history=histories[i]))
    return outcomes


@dataclass
class SuffixSettings:
    """The soft-suffix baseline (a :class:`saerecover.experiments.baselines.Baseline`):
    ``n_suffix`` placeholder tokens; lr / budget default to the residual modes'
    (``RecoveryConfig.lr`` / ``budget``)."""

    n_suffix: int = 8
    token: str | int | None = None
    lr: float | None = None
    budget: float | None = None

    #: saved with each example's tensors: where the suffix delta acts
    tensor_metadata: ClassVar[dict[str, str]] = {"site": SUFFIX_SITE}

    def to_dict(self) -> dict[str, Any]:
        return {"n_suffix": self.n_suffix, "token": self.token, "lr": self.lr, "budget": self.budget,
                "site": SUFFIX_SITE}

    def recover(self, defended: DefendedModel, task: Refusal, ex: Examples, *,
                cfg: RecoveryConfig) -> list[ExampleOutcome]:
        """The baseline on a batch of valid flips (see :func:`recover_suffix`)."""
        return recover_suffix(defended, task, ex, cfg=cfg, n_suffix=self.n_suffix, token=self.token,
                              lr=self.lr, budget=self.budget)
