"""Labelled text classes for probes: local CSV/TSV/JSON(L) files, Bias in Bios and Amazon reviews
(SAEBench's class sets, from the hub or a local export) and the toy world's topic sentences."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saerecover.data import toy_corpus as corpus
from saerecover.data.files import read_rows
from saerecover.data.hub import hub_rows

#: SAEBench's TPP datasets and class sets (``dataset_info.chosen_classes_per_dataset``).
BIAS_IN_BIOS = "LabHC/bias_in_bios"


BIAS_IN_BIOS_CLASSES = ("0", "1", "2", "6", "9")  # accountant, architect, attorney, dentist, filmmaker


AMAZON_REVIEWS = "canrager/amazon_reviews_mcauley_1and5"


AMAZON_CLASSES = ("1", "2", "3", "5", "6")  # toys, cell phones, industrial/scientific, musical instr., electronics


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


def load_bias_in_bios(path: str | Path | None = None, *, classes: Sequence[str] = BIAS_IN_BIOS_CLASSES,
                      n_train: int = 2000, n_test: int = 500, seed: int = 42, **kwargs: Any) -> TextClasses:
    """Bias in Bios (professions), SAEBench class set 1 by default.

    path: a local CSV/JSONL export (columns ``hard_text`` or ``text``, ``profession`` or
    ``label``, optional ``split``); without it, ``LabHC/bias_in_bios`` from the HF hub.
    Per class, ``n_train`` / ``n_test`` texts (SAEBench balances 4000 / 1000 per binary probe).
    """
    if path is None:
        rows = hub_rows(BIAS_IN_BIOS, {"text": "hard_text", "label": "profession"})
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
        rows = hub_rows(AMAZON_REVIEWS, {"text": "text", "label": "category"})
        return text_classes_from_rows(rows, classes=classes, n_train=n_train, n_test=n_test, seed=seed,
                                      source=AMAZON_REVIEWS, **kwargs)
    rows = read_rows(path)
    label_col = kwargs.pop("label_column", "category" if rows and "category" in rows[0] else "label")
    return text_classes_from_rows(rows, text_column=kwargs.pop("text_column", "text"), label_column=label_col,
                                  classes=classes, n_train=n_train, n_test=n_test, seed=seed, source=str(path),
                                  **kwargs)


def toy_topics(n_train: int = 60, n_test: int = 24, seed: int = 0) -> TextClasses:
    """The toy world's topic sentences (corpus ``TOPICS``), without the ``Topic :`` suffix."""
    def split(n: int, s: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {c: [] for c in corpus.TOPIC_LABELS}
        for e in corpus.topic_examples(n * len(corpus.TOPIC_LABELS), seed=s):  # type: ignore[arg-type]
            out[e.label].append(e.sentence)
        return out

    return TextClasses(train=split(n_train, f"{seed}-train"), test=split(n_test, f"{seed}-test"),
                       source="toy:topics")
