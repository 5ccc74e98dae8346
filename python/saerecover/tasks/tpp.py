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
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import Examples, pad_right

#: SAEBench's TPP datasets and class sets (``dataset_info.chosen_classes_per_dataset``).
BIAS_IN_BIOS = "LabHC/bias_in_bios"
BIAS_IN_BIOS_CLASSES = ("0", "1", "2", "6", "9")  # accountant, architect, attorney, dentist, filmmaker
AMAZON_REVIEWS = "canrager/amazon_reviews_mcauley_1and5"
AMAZON_CLASSES = ("1", "2", "3", "5", "6")  # toys, cell phones, industrial/scientific, musical instr., electronics
#: SAEBench's probe settings (``ScrAndTppEvalConfig``).
PROBE_DEFAULTS: dict[str, Any] = {"epochs": 20, "lr": 1e-3, "batch_size": 16, "l1": 1e-3}
CONTEXT_LENGTH = 128
LOSSES = ("logit", "bce")


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class TextClasses:
    """Labelled texts for one-vs-rest probes: class name -> texts, in a train and a test split."""

    train: dict[str, list[str]]
    test: dict[str, list[str]]
    source: str = ""

    @property
    def classes(self) -> list[str]:
        return list(self.train)

    def check(self) -> None:
        if set(self.train) != set(self.test):
            raise ValueError(f"train and test classes differ: {sorted(self.train)} vs {sorted(self.test)}")
        if len(self.train) < 2:
            raise ValueError(f"TPP needs at least two classes (one-vs-rest probes), got {list(self.train)}")
        for split, data in (("train", self.train), ("test", self.test)):
            for c, texts in data.items():
                if not texts:
                    raise ValueError(f"class {c!r} has no {split} texts")
                if not all(isinstance(t, str) and t.strip() for t in texts):
                    raise ValueError(f"class {c!r} has an empty or non-string {split} text")

    def fingerprint(self) -> str:
        blob = json.dumps({"train": self.train, "test": self.test}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "classes": self.classes,
                "n_train": {c: len(v) for c, v in self.train.items()},
                "n_test": {c: len(v) for c, v in self.test.items()}, "sha256_16": self.fingerprint()}


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local table: .csv / .tsv (header row), .jsonl (one object a line) or .json
    (a list of objects, or ``{"data": [...]}``)."""
    import csv

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i + 1} is not valid JSON: {err}") from err
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a list of objects (or {{'data': [...]}})")
        return data
    raise ValueError(f"data file {path} must end in .csv, .tsv, .jsonl or .json")


def text_classes_from_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str | None = "split",
    classes: Sequence[str] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    source: str = "",
) -> TextClasses:
    """Group rows by label into train/test texts.

    A ``split_column`` with values "train"/"test" decides the split when present; otherwise each
    class is shuffled (seeded) and its last ``test_fraction`` is the test split. ``n_train`` /
    ``n_test`` cap the texts per class (a seeded sample). Labels are compared as strings.
    """
    if not rows:
        raise ValueError(f"no rows in {source or 'the data'}")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise ValueError(f"{source or 'the data'} has no column(s) {missing}; columns: {sorted(rows[0])}")
    use_split = split_column is not None and split_column in rows[0]
    groups: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        label, text = str(r[label_column]), r[text_column]
        if not isinstance(text, str) or not text.strip():
            continue
        split = str(r[split_column]).lower() if use_split else "all"
        groups.setdefault(label, {}).setdefault(split, []).append(text)
    wanted = [str(c) for c in classes] if classes is not None else sorted(groups)
    absent = [c for c in wanted if c not in groups]
    if absent:
        raise ValueError(f"class(es) {absent} not found in column {label_column!r}; present: {sorted(groups)[:20]}")
    rng = random.Random(seed)
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for c in wanted:
        g = groups[c]
        if use_split:
            tr, te = list(g.get("train", [])), list(g.get("test", []))
        else:
            texts = list(g["all"])
            rng.shuffle(texts)
            cut = max(1, int(round(len(texts) * (1 - test_fraction))))
            tr, te = texts[:cut], texts[cut:]
        train[c] = _sample(tr, n_train, rng)
        test[c] = _sample(te, n_test, rng)
    data = TextClasses(train=train, test=test, source=source)
    data.check()
    return data


def _sample(texts: list[str], n: int | None, rng: random.Random) -> list[str]:
    if n is None or len(texts) <= n:
        return texts
    return rng.sample(texts, n)


def load_text_classes(path: str | Path, *, test_path: str | Path | None = None, **kwargs: Any) -> TextClasses:
    """Labelled texts from local files (CSV/TSV/JSONL/JSON with text and label columns).

    With ``test_path`` the two files are the train and test splits; otherwise a ``split`` column
    or a seeded split decides (see :func:`text_classes_from_rows`).
    """
    rows = read_rows(path)
    if test_path is not None:
        rows = [{**r, "__split": "train"} for r in rows] + [{**r, "__split": "test"} for r in read_rows(test_path)]
        kwargs["split_column"] = "__split"
    return text_classes_from_rows(rows, source=str(path), **kwargs)


def _hub_rows(name: str, columns: dict[str, str]) -> list[dict[str, Any]]:
    """Rows of both splits of a HF hub dataset, renamed to text/label/split (needs ``datasets``
    and network or a local HF cache)."""
    try:
        from datasets import load_dataset
    except ImportError as err:  # pragma: no cover - datasets is a dependency of sae_lens
        raise RuntimeError(f"loading {name} from the HF hub needs the `datasets` package") from err
    ds = load_dataset(name)
    rows = []
    for split in ("train", "test"):
        part = ds[split]
        texts, labels = part[columns["text"]], part[columns["label"]]
        rows += [{"text": t, "label": str(lab), "split": split} for t, lab in zip(texts, labels)]
    return rows


def load_bias_in_bios(path: str | Path | None = None, *, classes: Sequence[str] = BIAS_IN_BIOS_CLASSES,
                      n_train: int = 2000, n_test: int = 500, seed: int = 42, **kwargs: Any) -> TextClasses:
    """Bias in Bios (professions), SAEBench class set 1 by default.

    path: a local CSV/JSONL export (columns ``hard_text`` or ``text``, ``profession`` or
    ``label``, optional ``split``); without it, ``LabHC/bias_in_bios`` from the HF hub.
    Per class, ``n_train`` / ``n_test`` texts (SAEBench balances 4000 / 1000 per binary probe).
    """
    if path is None:
        rows = _hub_rows(BIAS_IN_BIOS, {"text": "hard_text", "label": "profession"})
        return text_classes_from_rows(rows, classes=classes, n_train=n_train, n_test=n_test, seed=seed,
                                      source=BIAS_IN_BIOS, **kwargs)
    rows = read_rows(path)
    text_col = kwargs.pop("text_column", "hard_text" if rows and "hard_text" in rows[0] else "text")
    label_col = kwargs.pop("label_column", "profession" if rows and "profession" in rows[0] else "label")
    return text_classes_from_rows(rows, text_column=text_col, label_column=label_col, classes=classes,
                                  n_train=n_train, n_test=n_test, seed=seed, source=str(path), **kwargs)


def load_amazon_reviews(path: str | Path | None = None, *, classes: Sequence[str] = AMAZON_CLASSES,
                        n_train: int = 2000, n_test: int = 500, seed: int = 42, **kwargs: Any) -> TextClasses:
    """Amazon reviews (product categories), SAEBench's class set by default.

    path: a local CSV/JSONL export (columns ``text``, ``category`` or ``label``, optional
    ``split``); without it, ``canrager/amazon_reviews_mcauley_1and5`` from the HF hub.
    """
    if path is None:
        rows = _hub_rows(AMAZON_REVIEWS, {"text": "text", "label": "category"})
        return text_classes_from_rows(rows, classes=classes, n_train=n_train, n_test=n_test, seed=seed,
                                      source=AMAZON_REVIEWS, **kwargs)
    rows = read_rows(path)
    label_col = kwargs.pop("label_column", "category" if rows and "category" in rows[0] else "label")
    return text_classes_from_rows(rows, text_column=kwargs.pop("text_column", "text"), label_column=label_col,
                                  classes=classes, n_train=n_train, n_test=n_test, seed=seed, source=str(path),
                                  **kwargs)


def toy_topics(n_train: int = 60, n_test: int = 24, seed: int = 0) -> TextClasses:
    """The toy world's topic sentences (corpus ``TOPICS``), without the ``Topic :`` suffix."""
    from ..toy import corpus

    def split(n: int, s: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {c: [] for c in corpus.TOPIC_LABELS}
        for e in corpus.topic_examples(n * len(corpus.TOPIC_LABELS), seed=s):  # type: ignore[arg-type]
            out[e.label].append(e.sentence)
        return out

    return TextClasses(train=split(n_train, f"{seed}-train"), test=split(n_test, f"{seed}-test"),
                       source="toy:topics")


# ----------------------------------------------------------------------------------------------
# tokens, pooling, the residual at the site


def tokenize(tokenizer: Any, texts: Sequence[str],
             context_length: int = CONTEXT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), special tokens added, truncated to
    ``context_length`` tokens (keeping the beginning, as SAEBench does)."""
    seqs = [list(tokenizer(t, add_special_tokens=True)["input_ids"])[:context_length] for t in texts]
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    return pad_right(seqs, int(pad))


def special_ids(tokenizer: Any) -> tuple[int, ...]:
    return tuple(sorted({int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}))


def pool_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, specials: Sequence[int]) -> torch.Tensor:
    """(n, seq) float mask of the pooled tokens: real tokens that are not special tokens."""
    keep = attention_mask.bool()
    if specials:
        keep = keep & ~torch.isin(input_ids, torch.as_tensor(list(specials), device=input_ids.device))
    return keep.float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of x (n, seq, ...) weighted by mask (n, seq); rows with no token give 0."""
    m = mask.to(x.dtype)
    while m.ndim < x.ndim:
        m = m.unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class _StopAtSite(Exception):
    """Raised from the edit at the probe site once its residual is read (nothing later matters)."""


def run_to_site(model: Any, hook_name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                edits: Mapping[str, Any] | None = None, capture: tuple[str, ...] = ()
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The residual at ``hook_name`` after that site's edit, (n, seq, d_model), attached to the
    graph. The forward pass stops there unless an edit or capture needs a later site."""
    order = {name: i for i, name in enumerate(model.site_names())}
    if hook_name not in order:
        raise ValueError(f"unknown hook name {hook_name!r}; valid sites: {list(order)}")
    edits = dict(edits or {})
    stop = not capture and all(order.get(n, -1) <= order[hook_name] for n in edits)
    inner = edits.get(hook_name)
    store: dict[str, torch.Tensor] = {}

    def read(h: torch.Tensor) -> torch.Tensor:
        out = inner(h) if inner is not None else h
        store["h"] = out
        if stop:
            raise _StopAtSite
        return out

    edits[hook_name] = read
    captured: dict[str, torch.Tensor] = {}
    try:
        _, captured = model.forward(input_ids, attention_mask, edits=edits, capture=capture)
    except _StopAtSite:
        pass
    return store["h"], captured


# ----------------------------------------------------------------------------------------------
# probes


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
    nonzero = int((scores != 0).sum())
    k = min(n, nonzero)
    if k == 0:
        raise ValueError("no latent has a non-zero TPP effect for this class")
    return torch.topk(scores, k).indices.sort().values


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


@dataclass
class TPPResult:
    """Per-class runs and the combined summary (``OUT/summary.json``)."""

    summary: dict[str, Any]
    runs: dict[str, Any]  # class -> RunResult
    setup: TPPSetup
    path: Path | None = None

    def table(self) -> str:
        return tpp_table(self.summary)


#: TPP recovery defaults: the engine's (paper IOI) optimiser with delta on every pooled row.
TPP_RECOVERY: dict[str, Any] = {"steps": 100, "lr": 0.1, "budget": 20.0, "positions": "all"}


def run_tpp(model: Any, site: Any, data: TextClasses, *, out: str | Path, classes: Sequence[str] | None = None,
            top_n: int = 10, projection: str | Sequence[str] = ("none", "encoder"),
            context_length: int = CONTEXT_LENGTH, probe: Mapping[str, Any] | None = None, seed: int = 0,
            loss: str = "logit", batch_size: int = 32, progress: bool = False, overwrite: bool = False,
            report: bool = True, setup: TPPSetup | None = None, **overrides: Any) -> TPPResult:
    """TPP end to end: fit probes and latents, then per target class zero-ablate its top-N latents
    (all positions, SAE error kept) and recover the probe with delta at the pooled rows.

    Writes ``OUT/class-<c>/`` (one run directory per class), ``OUT/probes.safetensors`` and the
    combined ``OUT/summary.json`` / ``report.md`` (per class and pooled over classes, per mode).
    overrides: RecoveryConfig fields (defaults :data:`TPP_RECOVERY`).
    """
    from .. import collection
    from ..clamp import Clamp
    from ..pipeline import recover
    from ..stats import summarize

    root = collection.prepare(out)
    setup = setup or fit(model, site, data, classes=classes, top_n=top_n, context_length=context_length,
                         probe=probe, seed=seed, loss=loss, batch_size=batch_size)
    setup.probes.save(root / "probes.safetensors")
    modes = [projection] if isinstance(projection, str) else list(projection)
    cfg = {**TPP_RECOVERY, "seed": seed, **overrides}
    runs: dict[str, Any] = {}
    per_class: dict[str, Any] = {}
    all_records: list[dict[str, Any]] = []
    for c, task in setup.tasks.items():
        clamp = Clamp({site: setup.latents[c]}, mode="zero", where="all")
        res = recover(setup.probed, clamp, task, projection=modes, out=root / collection.member_name("class", c),
                      batch_size=batch_size, progress=progress, overwrite=overwrite, report=report,
                      extra_config={"tpp": {"class": c, "top_n": top_n, "latents": setup.latents[c].tolist()}},
                      **cfg)
        runs[c] = res
        flips = res.flips
        per_class[c] = {
            "run_dir": str(Path(res.path).relative_to(root)) if res.path else None,
            "n_examples": len(task.ex),
            "latents": setup.latents[c].tolist(),
            "probe_test_accuracy": setup.probes.test_accuracy.get(c),
            "clean_positive_rate": float((flips.base > 0).float().mean()) if flips is not None else None,
            "ablated_positive_rate": float((flips.defended > 0).float().mean()) if flips is not None else None,
            "modes": {m: collection.mode_row(res.summary["modes"][m]) for m in modes},
        }
        all_records += res.records
    pooled = summarize(all_records, task="tpp", modes=modes)
    summary = {
        "collection": "tpp",
        "task": "tpp",
        "hook_name": site.hook_name,
        "top_n": top_n,
        "classes": list(setup.tasks),
        "probes": setup.probes.describe(),
        "data": setup.data.describe(),
        "recovery": cfg,
        "n_examples": pooled["n_examples"],
        "n_valid": pooled["n_valid"],
        "per_class": per_class,
        "modes": {m: collection.mode_row(pooled["modes"][m]) for m in modes},
        "intervals": pooled["intervals"],
    }
    collection.write(root, summary, _tpp_report(summary))
    return TPPResult(summary=summary, runs=runs, setup=setup, path=root)


def tpp_table(summary: Mapping[str, Any]) -> str:
    """Per class and mode, then pooled: valid flips, recovery [Wilson], drift, reactivation,
    zero-reactivation recovery [Wilson]."""
    from .. import collection

    rows = []
    for c, info in (summary.get("per_class") or {}).items():
        for m, s in (info.get("modes") or {}).items():
            rows.append([str(c), m, *collection.mode_cells(s)])
    for m, s in (summary.get("modes") or {}).items():
        rows.append(["all (pooled)", m, *collection.mode_cells(s)])
    return collection.markdown_table(["class", "mode", *collection.mode_header()], rows)


def _tpp_report(summary: Mapping[str, Any]) -> str:
    from .. import collection

    probe_rows = [[c, collection.num(summary["probes"]["train_accuracy"].get(c)),
                   collection.num(summary["probes"]["test_accuracy"].get(c)),
                   collection.num(info.get("clean_positive_rate")), collection.num(info.get("ablated_positive_rate")),
                   str(len(info.get("latents") or [])), info.get("run_dir") or ""]
                  for c, info in summary["per_class"].items()]
    return "\n".join([
        f"# saerecover TPP: {summary['hook_name']}, top-{summary['top_n']} latents zero-ablated", "",
        f"Data: {summary['data'].get('source')}; classes {', '.join(summary['classes'])}. "
        f"{summary['n_examples']} target-class test texts, {summary['n_valid']} valid flips "
        "(clean probe positive, ablated not).", "",
        "## Probes and the clamp", "",
        collection.markdown_table(["class", "probe train acc", "probe test acc", "clean positive rate",
                                   "ablated positive rate", "latents", "run directory"], probe_rows), "",
        "## Recovery", "",
        tpp_table(summary), "",
        "Rates are over valid flips with Wilson 95% intervals; drifts are means over valid examples. "
        "Zero-reactivation recovery: recovered with no ablated latent above eta.", "",
    ])
