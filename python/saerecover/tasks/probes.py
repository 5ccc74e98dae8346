"""Linear probes on the mean-pooled residual (SAEBench's TPP): one-vs-rest logistic probes,
their training, and balanced binary splits."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: SAEBench's probe settings (``ScrAndTppEvalConfig``).
PROBE_DEFAULTS: dict[str, Any] = {"epochs": 20, "lr": 1e-3, "batch_size": 16, "l1": 1e-3}


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
        return {"classes": self.classes, "sha256_16": self.fingerprint(),
                "train_accuracy": self.train_accuracy, "test_accuracy": self.test_accuracy}

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
                 epochs: int = 20, lr: float = 1e-3, batch_size: int = 16, l1: float = 1e-3, seed: int = 0) -> Probes:
    """One balanced one-vs-rest probe per class on pooled residuals (n, d_model)."""
    ws, bs, tr_acc, te_acc = [], [], {}, {}
    for k, c in enumerate(classes):
        idx, y = balanced_binary(labels_train, c, seed)
        w, b = train_probe(x_train[idx], y, epochs=epochs, lr=lr, batch_size=batch_size, l1=l1, seed=seed + k)
        ws.append(w)
        bs.append(b)
        tr_acc[c] = float((((x_train[idx].float() @ w + b) > 0).float() == y).float().mean())
        if x_test is not None and labels_test is not None:
            tidx, ty = balanced_binary(labels_test, c, seed + 1)
            te_acc[c] = float((((x_test[tidx].float() @ w + b) > 0).float() == ty).float().mean())
    return Probes(classes=list(classes), weight=torch.stack(ws), bias=torch.tensor(bs, dtype=torch.float32),
                  train_accuracy=tr_acc, test_accuracy=te_acc)
