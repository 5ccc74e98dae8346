"""Linear probes on the mean-pooled residual (SAEBench's TPP): one-vs-rest logistic probes,
their training, and balanced binary splits.

Two trainers (``trainer=``): "saerecover" (Adam, zero init, the last epoch, negatives drawn from the
pooled other classes) and "saebench" (SAEBench 0.6.0's ``train_probe_gpu`` with
``prepare_probe_data``: AdamW with weight decay 0.01, ``nn.Linear``'s default init, the epoch with
the best accuracy on the balanced test set kept, i.e. selected on evaluation data; negatives in
equal shares from each other class). Both: BCE + L1 on the weights, seeded minibatches, float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: SAEBench's probe settings (``ScrAndTppEvalConfig``).
PROBE_DEFAULTS: dict[str, Any] = {"epochs": 20, "lr": 1e-3, "batch_size": 16, "l1": 1e-3}
#: The probe trainers (see the module docstring).
PROBE_TRAINERS = ("saerecover", "saebench")
#: AdamW's default weight decay, which SAEBench's probe optimizer keeps.
SAEBENCH_WEIGHT_DECAY = 0.01


@dataclass
class Probes:
    """One-vs-rest linear probes on the mean-pooled residual: logit_c = w_c . pool(h) + b_c.

    weight: (n_classes, d_model), bias: (n_classes,), float32 on CPU.
    """

    classes: list[str]
    weight: torch.Tensor
    bias: torch.Tensor
    train_accuracy: dict[str, float] = field(default_factory=dict)
    test_accuracy: dict[str, float] = field(default_factory=dict)
    trainer: str = "saerecover"
    #: per class, the epoch kept (1-based) when the trainer selects one (saebench)
    epoch: dict[str, int] = field(default_factory=dict)

    def index(self, cls: str) -> int:
        if cls not in self.classes:
            raise ValueError(f"unknown class {cls!r}; probes exist for {self.classes}")
        return self.classes.index(cls)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.weight, self.bias):
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        out = {"classes": self.classes, "sha256_16": self.fingerprint(), "trainer": self.trainer,
               "train_accuracy": self.train_accuracy, "test_accuracy": self.test_accuracy}
        if self.epoch:
            out["epoch_kept"] = self.epoch
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path),
                  metadata={"classes": json.dumps(self.classes)})


def balanced_binary(labels: Sequence[str], cls: str, seed: int) -> tuple[list[int], torch.Tensor]:
    """SAEBench's binary probe set for ``cls``: all its examples plus as many others, drawn
    (seeded) from the other classes. Returns (indices, 0/1 targets)."""
    pos = [i for i, c in enumerate(labels) if c == cls]
    neg = [i for i, c in enumerate(labels) if c != cls]
    rng = random.Random(f"{seed}-{cls}")
    neg = rng.sample(neg, min(len(pos), len(neg)))
    idx = pos + neg
    return idx, torch.tensor([1.0] * len(pos) + [0.0] * len(neg))


def saebench_binary(labels: Sequence[str], cls: str, gen: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """SAEBench's binary probe set for ``cls`` (``prepare_probe_data``): all its P examples, and
    from each of the k other classes (in order of first appearance) ceil(P / k) drawn at random,
    of which P are kept at random; shuffled. Random draws from ``gen``. Returns (indices, 0/1
    targets)."""
    pos = [i for i, c in enumerate(labels) if c == cls]
    others = [c for c in dict.fromkeys(labels) if c != cls]
    if not pos or not others:
        raise ValueError(f"class {cls!r} needs examples of its own and of another class for a probe set")
    per = math.ceil(len(pos) / len(others))
    neg: list[int] = []
    for other in others:
        members = [i for i, c in enumerate(labels) if c == other]
        neg += [members[j] for j in torch.randperm(len(members), generator=gen)[:per].tolist()]
    neg = [neg[j] for j in torch.randperm(len(neg), generator=gen)[:len(pos)].tolist()]
    idx = pos + neg
    y = torch.tensor([1.0] * len(pos) + [0.0] * len(neg))
    order = torch.randperm(len(idx), generator=gen)
    return [idx[j] for j in order.tolist()], y[order]


def binary_set(labels: Sequence[str], cls: str, seed: int, trainer: str) -> tuple[list[int], torch.Tensor]:
    """The balanced binary set of ``cls`` the trainer draws (``seed`` fixes it)."""
    if trainer == "saebench":
        return saebench_binary(labels, cls, torch.Generator().manual_seed(seed))
    return balanced_binary(labels, cls, seed)


def train_probe_saebench(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                         epochs: int = 20, lr: float = 1e-3, batch_size: int = 16, l1: float = 1e-3, seed: int = 0,
                         weight_decay: float = SAEBENCH_WEIGHT_DECAY) -> tuple[torch.Tensor, float, int, float]:
    """SAEBench's ``train_probe_gpu``: logistic regression initialised as ``nn.Linear`` (weight and
    bias uniform in +-1/sqrt(d)), AdamW (``weight_decay`` on weight and bias), BCE + ``l1`` x
    sum|w| per minibatch, a fresh permutation per epoch; after each epoch the accuracy on
    (x_test, y_test), and the epoch with the best one (strictly better than the best so far,
    starting from 0) is kept. Selection on the test data, as SAEBench does. Random draws from a
    generator seeded with ``seed``; float32. Returns (w (d,), b, epoch kept (1-based), its test
    accuracy)."""
    x, y = x.detach().float().cpu(), y.detach().float().cpu()
    x_test, y_test = x_test.detach().float().cpu(), y_test.detach().float().cpu()
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(x.shape[1])
    w = ((torch.rand(x.shape[1], generator=gen) * 2 - 1) * bound).requires_grad_()
    b = ((torch.rand(1, generator=gen) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay)
    best: tuple[torch.Tensor, float, int, float] | None = None
    best_acc = 0.0
    with torch.enable_grad():
        for epoch in range(epochs):
            perm = torch.randperm(x.shape[0], generator=gen)
            for start in range(0, x.shape[0], batch_size):
                idx = perm[start:start + batch_size]
                loss = (torch.nn.functional.binary_cross_entropy_with_logits(x[idx] @ w + b, y[idx])
                        + l1 * w.abs().sum())
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                acc = float((((x_test @ w + b) > 0).float() == y_test).float().mean())
            if acc > best_acc:
                best_acc, best = acc, (w.detach().clone(), float(b.detach()), epoch + 1, acc)
    if best is None:  # never above 0 accuracy: the last epoch (SAEBench would fail here)
        best = (w.detach().clone(), float(b.detach()), epochs, 0.0)
    return best


def train_probe(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 20, lr: float = 1e-3, batch_size: int = 16,
                l1: float = 1e-3, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Logistic regression by Adam on (x (n, d), y (n,) in {0, 1}) with an L1 penalty on w,
    seeded minibatches (SAEBench's probe trainer). Returns (w (d,), b)."""
    x = x.detach().float().cpu()
    y = y.detach().float().cpu()
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=gen)
            for start in range(0, x.shape[0], batch_size):
                idx = perm[start:start + batch_size]
                logits = x[idx] @ w + b
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx]) + l1 * w.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return w.detach().clone(), float(b.detach())


def train_probes(x_train: torch.Tensor, labels_train: Sequence[str], classes: Sequence[str], *,
                 x_test: torch.Tensor | None = None, labels_test: Sequence[str] | None = None,
                 epochs: int = 20, lr: float = 1e-3, batch_size: int = 16, l1: float = 1e-3, seed: int = 0,
                 trainer: str = "saerecover") -> Probes:
    """One balanced one-vs-rest probe per class on pooled residuals (n, d_model), by ``trainer``
    (see the module docstring; "saebench" needs the test set, on which it selects the epoch).
    Test accuracy: on the class's balanced test set (:func:`binary_set` with ``seed + 1``)."""
    if trainer not in PROBE_TRAINERS:
        raise ValueError(f"unknown probe trainer {trainer!r}; valid: {', '.join(PROBE_TRAINERS)}")
    if trainer == "saebench" and (x_test is None or labels_test is None):
        raise ValueError("the saebench probe trainer selects its epoch on a test set; give x_test and labels_test")
    ws, bs, tr_acc, te_acc, kept = [], [], {}, {}, {}
    for k, c in enumerate(classes):
        idx, y = binary_set(labels_train, c, seed, trainer)
        tidx, ty = binary_set(labels_test, c, seed + 1, trainer) if labels_test is not None else ([], None)
        if trainer == "saebench":
            w, b, kept[c], _ = train_probe_saebench(x_train[idx], y, x_test[tidx], ty, epochs=epochs, lr=lr,
                                                    batch_size=batch_size, l1=l1, seed=seed + k)
        else:
            w, b = train_probe(x_train[idx], y, epochs=epochs, lr=lr, batch_size=batch_size, l1=l1, seed=seed + k)
        ws.append(w)
        bs.append(b)
        tr_acc[c] = float((((x_train[idx].float() @ w + b) > 0).float() == y).float().mean())
        if x_test is not None and labels_test is not None:
            te_acc[c] = float((((x_test[tidx].float() @ w + b) > 0).float() == ty).float().mean())
    return Probes(classes=list(classes), weight=torch.stack(ws), bias=torch.tensor(bs, dtype=torch.float32),
                  train_accuracy=tr_acc, test_accuracy=te_acc, trainer=trainer, epoch=kept)
