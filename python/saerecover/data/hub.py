"""Datasets from the Hugging Face hub (needs the ``datasets`` package and network access or a
local HF cache)."""

from __future__ import annotations

from typing import Any


def hub_rows(name: str, columns: dict[str, str]) -> list[dict[str, Any]]:
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
