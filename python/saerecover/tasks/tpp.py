"""Targeted probe perturbation (TPP), SAEBench's protocol, as a recovery task.

PAPER_NOTES, TPP row. Per class c of a labelled text set:

1. mean-pool the residual at the SAE site over each text's real tokens (special and pad tokens
   masked) and train a one-vs-rest logistic probe (w_c, b_c) on the clean pooled residuals;
2. score every latent: (mean pooled SAE activation on class-c texts minus on the others,
   clamped at 0 as SAEBench does for TPP) x (W_dec @ w_c), and zero-ablate the top-N latents at
   every position with the SAE error kept (the clamp);
3. the behavior is "probe c fires" on class-c test texts: B holds iff the probe logit of the
   mean-pooled residual at the site, *after* the clamp and delta, is > 0. Valid flips: clean
   probe positive, ablated not. Recovery: delta at the pooled positions (positions "all").

The probe reads the residual at the SAE site itself, so the model under test is
:class:`ProbedModel`: the model run up to the site (with every edit the engine makes there) and
read out by the probes. Its "logits" are per-position probe logits (n, seq, n_classes); since a
linear probe commutes with mean pooling, the task's score is their masked mean. Nothing in the
engine changes: the clamp, delta, projection and metrics all act at the same site as for IOI.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from saerecover.core.examples import Examples
from saerecover.data.text_classes import TextClasses
from saerecover.models.partial import run_to_site
from saerecover.tasks.probes import PROBE_DEFAULTS, Probes, train_probes
from saerecover.tasks.text import CONTEXT_LENGTH, masked_mean, pool_mask, special_ids, tokenize

LOSSES = ("logit", "bce")


# ----------------------------------------------------------------------------------------------
# data





# ----------------------------------------------------------------------------------------------
# tokens, pooling, the residual at the site




# ----------------------------------------------------------------------------------------------
# probes



# ----------------------------------------------------------------------------------------------
# the probed model


class ProbedModel:
    """``model`` read out by ``probes`` at ``hook_name``: a ModelAdapter whose logits are the
    per-position probe logits h @ W^T + b, (n, seq, n_classes), of the residual at the site
    after that site's edits (clamp, delta). Everything else is the wrapped model's."""

    def __init__(self, model: Any, hook_name: str, probes: Probes) -> None:
        if hook_name not in model.site_names():
            raise ValueError(f"unknown hook name {hook_name!r}; valid sites: {model.site_names()}")
        if probes.weight.shape[1] != model.d_model:
            raise ValueError(f"probes read d={probes.weight.shape[1]} but the model has d_model={model.d_model}")
        self.model_adapter = model
        self.hook_name = hook_name
        self.probes = probes
        self._w = probes.weight.to(model.device, torch.float32)
        self._b = probes.bias.to(model.device, torch.float32)

    def __getattr__(self, name: str) -> Any:
        if name in ("model_adapter", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.model_adapter, name)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                edits: Mapping[str, Any] | None = None, capture: tuple[str, ...] = ()
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h, captured = run_to_site(self.model_adapter, self.hook_name, input_ids, attention_mask, edits, capture)
        return h.float() @ self._w.T + self._b, captured

    __call__ = forward


# ----------------------------------------------------------------------------------------------
# the task


@dataclass
class TPPTask:
    """Probe ``class_name`` fires on its class's texts: score = the probe logit of the
    mean-pooled residual at the site (logits from :class:`ProbedModel`), > 0 = present.

    loss: "logit" (minus the target probe logit, as the paper) or "bce" (softplus of minus it).
    """

    ex: Examples
    class_name: str
    class_index: int
    specials: tuple[int, ...]
    loss_kind: str = "logit"
    name: str = "tpp"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss_kind not in LOSSES:
            raise ValueError(f"unknown TPP loss {self.loss_kind!r}; valid: {', '.join(LOSSES)}")

    def examples(self) -> Examples:
        return self.ex

    def score(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        mask = pool_mask(ex.input_ids.to(logits.device), ex.attention_mask.to(logits.device), self.specials)
        return masked_mean(logits[..., self.class_index].float(), mask)

    def loss(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        s = self.score(logits, ex)
        return -s if self.loss_kind == "logit" else torch.nn.functional.softplus(-s)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class": self.class_name, "class_index": self.class_index,
                "n": len(self.ex), "loss": self.loss_kind, **self.info}


def make_task(tokenizer: Any, texts: Sequence[str], class_name: str, probes: Probes, *,
              context_length: int = CONTEXT_LENGTH, loss: str = "logit", info: dict | None = None) -> TPPTask:
    """The TPP task of one target class on its test texts."""
    ids, mask = tokenize(tokenizer, texts, context_length)
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in class_name)
    ex = Examples(input_ids=ids, attention_mask=mask, answer_pos=mask.sum(1) - 1,
                  ids=[f"tpp-{safe}-{i:05d}" for i in range(len(texts))],
                  meta=[{"text": t[:200]} for t in texts])
    ex.validate()
    digest = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]
    return TPPTask(ex=ex, class_name=class_name, class_index=probes.index(class_name),
                   specials=special_ids(tokenizer), loss_kind=loss,
                   info={"texts_sha256_16": digest, "context_length": context_length, **(info or {})})


# ----------------------------------------------------------------------------------------------
# latent selection


@dataclass
class PooledStats:
    """Clean mean-pooled residuals (n, d_model) and per-class mean pooled SAE activations."""

    x: torch.Tensor
    labels: list[str]
    z_class_mean: dict[str, torch.Tensor]  # class -> (d_sae,)
    z_rest_mean: dict[str, torch.Tensor]  # class -> mean over the other classes' texts (d_sae,)


@torch.no_grad()
def pooled_stats(model: Any, site: Any, tokenizer: Any, data: Mapping[str, Sequence[str]], *,
                 context_length: int = CONTEXT_LENGTH, batch_size: int = 32, with_sae: bool = True) -> PooledStats:
    """One clean pass over ``data`` (class -> texts): pooled residuals at the site and, per
    class, the mean pooled SAE activation on its texts and on all other texts."""
    texts = [t for c in data for t in data[c]]
    labels = [c for c in data for _ in data[c]]
    specials = special_ids(tokenizer)
    xs, zsum = [], {}
    counts = {c: len(v) for c, v in data.items()}
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[start:start + batch_size], context_length)
        ids, mask = ids.to(model.device), mask.to(model.device)
        h, _ = run_to_site(model, site.hook_name, ids, mask)
        pm = pool_mask(ids, mask, specials)
        xs.append(masked_mean(h.float(), pm).cpu())
        if with_sae:
            z = masked_mean(site.encode(h), pm).double().cpu()
            for j, c in enumerate(labels[start:start + batch_size]):
                zsum[c] = zsum.get(c, 0) + z[j]
    cls_mean, rest_mean = {}, {}
    if with_sae:
        total = sum(zsum.values())
        n = len(texts)
        for c in data:
            cls_mean[c] = (zsum[c] / counts[c]).float()
            rest_mean[c] = ((total - zsum[c]) / max(n - counts[c], 1)).float()
    return PooledStats(x=torch.cat(xs), labels=labels, z_class_mean=cls_mean, z_rest_mean=rest_mean)


def latent_scores(site: Any, z_pos: torch.Tensor, z_neg: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """SAEBench's TPP effect per latent: clamp(mean_pos - mean_neg, min=0) * (W_dec @ w), (d_sae,)."""
    w_dec = site.sae.W_dec.detach().float().cpu()
    return (z_pos.float() - z_neg.float()).clamp(min=0.0) * (w_dec @ w.float().cpu())


def top_latents(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The top-``n`` latents by score among those with a non-zero score (SAEBench's
    ``select_top_n_features``), sorted indices (<= n,)."""
    if n < 1:
        raise ValueError(f"top_n must be >= 1, got {n}")
    candidates = torch.nonzero(scores != 0).flatten()
    k = min(n, int(candidates.numel()))
    if k == 0:
        raise ValueError("no latent has a non-zero TPP effect for this class")
    # top-k among the candidates only: over all latents, zero scores would outrank negative ones
    return candidates[torch.topk(scores[candidates], k).indices].sort().values


# ----------------------------------------------------------------------------------------------
# the whole protocol


@dataclass
class TPPSetup:
    """Everything fitted before recovery: probes, the probed model, per-class latents and tasks."""

    probes: Probes
    probed: ProbedModel
    scores: dict[str, torch.Tensor]
    latents: dict[str, torch.Tensor]
    tasks: dict[str, TPPTask]
    data: TextClasses


def fit(model: Any, site: Any, data: TextClasses, *, classes: Sequence[str] | None = None, top_n: int = 10,
        context_length: int = CONTEXT_LENGTH, probe: Mapping[str, Any] | None = None, seed: int = 0,
        loss: str = "logit", batch_size: int = 32) -> TPPSetup:
    """Steps 1-2 of TPP: probes on clean pooled residuals, latent scores, top-N per class, and the
    recovery task of each target class (``classes``, default all)."""
    data.check()
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be an integer >= 1, got {top_n!r}")
    targets = list(classes) if classes is not None else data.classes
    unknown = [c for c in targets if c not in data.train]
    if unknown:
        raise ValueError(f"unknown target class(es) {unknown}; classes: {data.classes}")
    tok = model.tokenizer
    opts = {**PROBE_DEFAULTS, **(probe or {})}
    train = pooled_stats(model, site, tok, data.train, context_length=context_length, batch_size=batch_size)
    test = pooled_stats(model, site, tok, data.test, context_length=context_length, batch_size=batch_size,
                        with_sae=False)
    probes = train_probes(train.x, train.labels, data.classes, x_test=test.x, labels_test=test.labels,
                          seed=seed, **opts)
    probed = ProbedModel(model, site.hook_name, probes)
    scores, latents, tasks = {}, {}, {}
    for c in targets:
        k = probes.index(c)
        scores[c] = latent_scores(site, train.z_class_mean[c], train.z_rest_mean[c], probes.weight[k])
        latents[c] = top_latents(scores[c], top_n)
        tasks[c] = make_task(tok, data.test[c], c, probes, context_length=context_length, loss=loss,
                             info={"probe": probes.describe(), "data": data.describe(), "top_n": top_n,
                                   "probe_options": opts, "seed": seed})
    return TPPSetup(probes=probes, probed=probed, scores=scores, latents=latents, tasks=tasks, data=data)



