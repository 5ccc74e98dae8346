"""Collateral cost of a defense: what it changes on inputs it should leave alone.

- ``accuracy``: the task's behavior B under the defense on non-target examples (IOI: the
  task's examples that the base model gets right and the plain clamp does not flip; refusal:
  held-out harmless requests, B = answered), beside the base model's on the same examples,
  with Wilson 95% intervals.
- ``kl``: KL(p_base || p_defended) of the next-token distributions at every real token of a
  reference text set (the toy corpus for the toy world), averaged per text; the mean over texts
  with a bootstrap 95% interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.defended import DefendedModel
from saerecover.core.examples import Examples, Task
from saerecover.experiments.pipeline import behavior_scores, find_flips
from saerecover.runs.stats import bootstrap_ci, wilson_interval
from saerecover.tasks.text import tokenize

#: Tokens kept per reference text.
REFERENCE_CONTEXT = 128


def reference_examples(tokenizer: Any, texts: Sequence[str], *, context_length: int = REFERENCE_CONTEXT) -> Examples:
    """The reference texts as Examples (ids ``ref-00000``..., answer position the last token)."""
    if not texts:
        raise ValueError("the reference text set is empty")
    ids, mask = tokenize(tokenizer, list(texts), context_length)
    return Examples(input_ids=ids, attention_mask=mask, answer_pos=mask.sum(dim=1) - 1,
                    ids=[f"ref-{i:05d}" for i in range(len(texts))])


def next_token_kl(model: Any, clamp: Clamp, reference: Examples, *, batch_size: int = 16) -> list[float]:
    """Per reference text: the mean over its real tokens of KL(p_base || p_defended), nats."""
    base, defended = DefendedModel(model, Clamp()), DefendedModel(model, clamp)
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(reference), batch_size):
            part = reference.select(list(range(start, min(start + batch_size, len(reference))))).to(model.device)
            lp = torch.log_softmax(base.forward(part, defended=False).logits.float(), dim=-1)
            lq = torch.log_softmax(defended.forward(part).logits.float(), dim=-1)
            kl = (lp.exp() * (lp - lq)).sum(dim=-1).clamp_min(0.0)  # (n, seq)
            m = part.attention_mask.float()
            out += ((kl * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).cpu().tolist()
    return out


def _rate(k: int, n: int) -> dict[str, Any]:
    ci = wilson_interval(k, n)
    return {"correct": k, "n": n, "accuracy": k / n if n else None, "accuracy_ci95": list(ci) if ci else None}


@dataclass
class Collateral:
    """How collateral cost is measured for one task: ``non_target`` (a task whose examples the
    defense should not change), ``outside_flips`` (keep only its examples that the base model
    gets right and the reference clamp does not flip: the non-target examples of the task
    itself), and the ``reference`` texts of the KL."""

    non_target: Task
    reference: Examples
    description: str
    outside_flips: bool = False
    batch_size: int = 16
    _base: torch.Tensor | None = field(default=None, init=False, repr=False)
    _kept: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)

    def _indices(self, model: Any, reference_clamp: Clamp) -> list[int]:
        ex = self.non_target.examples()
        if self._base is None:
            self._base = behavior_scores(DefendedModel(model, reference_clamp), self.non_target, ex,
                                         with_clamp=False, batch_size=self.batch_size)
        if not self.outside_flips:
            return list(range(len(ex)))
        key = id(reference_clamp)
        if key not in self._kept:
            flips = find_flips(DefendedModel(model, reference_clamp), self.non_target, ex, batch_size=self.batch_size,
                               progress=False)
            self._kept[key] = [i for i in range(len(ex)) if bool(flips.base[i] > 0) and not bool(flips.valid[i])]
        return self._kept[key]

    def measure(self, model: Any, clamp: Clamp, reference_clamp: Clamp) -> dict[str, Any]:
        """The collateral cost of ``clamp`` (``reference_clamp``: the plain clamp whose flips
        define the task's non-target examples)."""
        keep = self._indices(model, reference_clamp)
        ex = self.non_target.examples()
        if keep:
            sub = ex.select(keep)
            scores = behavior_scores(DefendedModel(model, clamp), self.non_target, sub, with_clamp=True,
                                     batch_size=self.batch_size)
            k = int((scores > 0).sum())
        else:
            k = 0
        base_k = int((self._base[keep] > 0).sum()) if keep else 0
        kl = next_token_kl(model, clamp, self.reference, batch_size=self.batch_size)
        ci = bootstrap_ci(kl)
        return {
            "non_target": {"description": self.description, **_rate(k, len(keep)),
                           "base": _rate(base_k, len(keep))},
            "kl_mean": sum(kl) / len(kl),
            "kl_ci95": list(ci) if ci else None,
            "kl_n_texts": len(kl),
        }
