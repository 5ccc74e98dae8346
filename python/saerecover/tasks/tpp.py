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
from typing import Any, ClassVar

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.examples import Examples
from saerecover.data.text_classes import TextClasses
from saerecover.models.partial import run_to_site
from saerecover.tasks.probes import PROBE_DEFAULTS, Probes, binary_set, train_probes
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
    protocol_scope: ClassVar[str] = "tpp"

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


def text_labels(data: Mapping[str, Sequence[str]]) -> list[str]:
    """The class of every text of ``data`` (class -> texts), in the order the passes read them."""
    return [c for c in data for _ in data[c]]


@torch.no_grad()
def pooled_stats(model: Any, site: Any, tokenizer: Any, data: Mapping[str, Sequence[str]], *,
                 context_length: int = CONTEXT_LENGTH, batch_size: int = 32, with_sae: bool = True,
                 negatives: Mapping[str, Sequence[int]] | None = None, edit: Any = None) -> PooledStats:
    """One pass over ``data`` (class -> texts): pooled residuals at the site and, per class, the
    mean pooled SAE activation on its texts and on the other texts: all of them, or (``negatives``:
    class -> indices into :func:`text_labels`) those listed. ``edit``: a function of the site's
    residual applied first (a clamp), so the pooled residuals are the clamped model's."""
    texts = [t for c in data for t in data[c]]
    labels = text_labels(data)
    specials = special_ids(tokenizer)
    xs, zsum = [], {}
    counts = {c: len(v) for c, v in data.items()}
    neg_of = {c: set(v) for c, v in (negatives or {}).items()}
    negsum = {c: 0 for c in neg_of}
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[start:start + batch_size], context_length)
        ids, mask = ids.to(model.device), mask.to(model.device)
        h, _ = run_to_site(model, site.hook_name, ids, mask, edits={site.hook_name: edit} if edit else None)
        pm = pool_mask(ids, mask, specials)
        xs.append(masked_mean(h.float(), pm).cpu())
        if with_sae:
            z = masked_mean(site.encode(h), pm).double().cpu()
            for j, c in enumerate(labels[start:start + batch_size]):
                zsum[c] = zsum.get(c, 0) + z[j]
                for t, members in neg_of.items():
                    if start + j in members:
                        negsum[t] = negsum[t] + z[j]
    cls_mean, rest_mean = {}, {}
    if with_sae:
        total = sum(zsum.values())
        n = len(texts)
        for c in data:
            cls_mean[c] = (zsum[c] / counts[c]).float()
            if c in neg_of:
                rest_mean[c] = (negsum[c] / max(len(neg_of[c]), 1)).float()
            else:
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
    #: the clean pooled test residuals (n_test_texts, d_model) and their classes (for the TPP metric)
    x_test: torch.Tensor | None = None
    labels_test: list[str] = field(default_factory=list)
    seed: int = 0


def fit(model: Any, site: Any, data: TextClasses, *, classes: Sequence[str] | None = None, top_n: int = 10,
        context_length: int = CONTEXT_LENGTH, probe: Mapping[str, Any] | None = None, seed: int = 0,
        loss: str = "logit", batch_size: int = 32, trainer: str = "saerecover") -> TPPSetup:
    """Steps 1-2 of TPP: probes on clean pooled residuals, latent scores, top-N per class, and the
    recovery task of each target class (``classes``, default all).

    trainer: the probe trainer (saerecover.tasks.probes). With "saebench" a latent's negative-class
    mean is over a balanced draw of the other classes' train texts (equal shares, as SAEBench's
    ``get_effects_per_class_precomputed_acts``), not over all of them.
    """
    data.check()
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be an integer >= 1, got {top_n!r}")
    targets = list(classes) if classes is not None else data.classes
    unknown = [c for c in targets if c not in data.train]
    if unknown:
        raise ValueError(f"unknown target class(es) {unknown}; classes: {data.classes}")
    tok = model.tokenizer
    opts = {**PROBE_DEFAULTS, **(probe or {})}
    negatives = None
    if trainer == "saebench":  # a second balanced draw per class, as SAEBench draws again for the scores
        labels = text_labels(data.train)
        negatives = {c: [i for i, t in zip(*binary_set(labels, c, seed + 2, trainer)) if t == 0] for c in targets}
    train = pooled_stats(model, site, tok, data.train, context_length=context_length, batch_size=batch_size,
                         negatives=negatives)
    test = pooled_stats(model, site, tok, data.test, context_length=context_length, batch_size=batch_size,
                        with_sae=False)
    probes = train_probes(train.x, train.labels, data.classes, x_test=test.x, labels_test=test.labels,
                          seed=seed, trainer=trainer, **opts)
    probed = ProbedModel(model, site.hook_name, probes)
    scores, latents, tasks = {}, {}, {}
    for c in targets:
        k = probes.index(c)
        scores[c] = latent_scores(site, train.z_class_mean[c], train.z_rest_mean[c], probes.weight[k])
        latents[c] = top_latents(scores[c], top_n)
        tasks[c] = make_task(tok, data.test[c], c, probes, context_length=context_length, loss=loss,
                             info={"probe": probes.describe(), "data": data.describe(), "top_n": top_n,
                                   "probe_options": {**opts, "trainer": trainer}, "seed": seed})
    return TPPSetup(probes=probes, probed=probed, scores=scores, latents=latents, tasks=tasks, data=data,
                    x_test=test.x, labels_test=test.labels, seed=seed)


def probe_accuracies(probes: Probes, x: torch.Tensor, labels: Sequence[str], seed: int) -> dict[str, float]:
    """Each probe's accuracy (logit > 0 vs label) on its class's balanced test set, the one
    :func:`~saerecover.tasks.probes.train_probes` measures (``binary_set`` with ``seed + 1``),
    given the pooled residuals ``x`` of every test text."""
    out = {}
    for k, c in enumerate(probes.classes):
        idx, y = binary_set(labels, c, seed + 1, probes.trainer)
        out[c] = float((((x[idx].float() @ probes.weight[k] + probes.bias[k]) > 0).float() == y).float().mean())
    return out


def tpp_metric(model: Any, site: Any, setup: TPPSetup, *, context_length: int = CONTEXT_LENGTH,
               batch_size: int = 32) -> dict[str, Any]:
    """SAEBench's TPP metric of the clamp (``create_tpp_plotting_dict``), per target class c and its
    mean: intended = acc_c(clean) - acc_c(c ablated), unintended = the mean over the other probe
    classes j of acc_j(clean) - acc_j(c ablated), total = intended - unintended. Accuracy of probe j
    on its balanced test set (:func:`probe_accuracies`); clean and ablated on the same set (SAEBench
    draws fresh negatives for each ablated evaluation and takes the clean accuracy from training)."""
    if setup.x_test is None:
        raise ValueError("the TPP setup has no clean test residuals (fit() keeps them)")
    clean = probe_accuracies(setup.probes, setup.x_test, setup.labels_test, setup.seed)
    ablated = {}
    for c, latents in setup.latents.items():
        sc = Clamp({site: latents}, mode="zero", where="all").at(site.hook_name)
        pooled = pooled_stats(model, site, model.tokenizer, setup.data.test, context_length=context_length,
                              batch_size=batch_size, with_sae=False, edit=sc.defend)
        ablated[c] = probe_accuracies(setup.probes, pooled.x, pooled.labels, setup.seed)
    return {**tpp_scores(clean, ablated),
            "definition": "per target class: its probe's accuracy drop minus the mean drop of the other probes "
                          "(SAEBench create_tpp_plotting_dict), on each probe's balanced test set"}


def tpp_scores(clean: Mapping[str, float], ablated: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """SAEBench's TPP metric from accuracies: ``clean[j]`` of every probe j, ``ablated[c][j]`` of
    probe j with target class c's latents ablated. Per c: intended = clean[c] - ablated[c][c],
    unintended = mean over j != c of clean[j] - ablated[c][j], total = intended - unintended; and
    the means over the targets c."""
    per_class = {}
    for c, acc in ablated.items():
        others = [j for j in clean if j != c]
        intended = clean[c] - acc[c]
        unintended = sum(clean[j] - acc[j] for j in others) / len(others) if others else 0.0
        per_class[c] = {"intended": intended, "unintended": unintended, "total": intended - unintended,
                        "ablated_accuracy": dict(acc)}
    mean = {k: sum(v[k] for v in per_class.values()) / max(len(per_class), 1)
            for k in ("intended", "unintended", "total")}
    return {"per_class": per_class, "mean": mean["total"], "mean_intended": mean["intended"],
            "mean_unintended": mean["unintended"], "clean_accuracy": dict(clean)}



