"""Text to tokens for the probe-based tasks: right-padded tokenization truncated to a context
length, the special tokens left out of pooling, and masked mean pooling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from saerecover.core.examples import pad_right

CONTEXT_LENGTH = 128


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
