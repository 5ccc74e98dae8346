"""What a task gives the recovery engine: examples, a behavior score, a loss, feature selection."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class Examples:
    """A right-padded batch of prompts.

    input_ids, attention_mask: (n, seq). answer_pos: (n,) the position whose next-token logits
    carry the behavior. targets: task-specific per-example tensors with leading dim n (for IOI,
    ``io`` and ``s`` token ids). ids: stable example ids (file-name safe).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_pos: torch.Tensor
    ids: list[str]
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: torch.Tensor | list[int]) -> "Examples":
        idx = torch.as_tensor(index, dtype=torch.long)
        keep = [int(i) for i in idx.tolist()]
        trimmed = int(self.attention_mask[idx].sum(dim=1).max().item()) if keep else 0
        trimmed = max(trimmed, 1)
        return Examples(
            input_ids=self.input_ids[idx][:, :trimmed],
            attention_mask=self.attention_mask[idx][:, :trimmed],
            answer_pos=self.answer_pos[idx],
            ids=[self.ids[i] for i in keep],
            targets={k: v[idx] for k, v in self.targets.items()},
            meta=[self.meta[i] for i in keep] if self.meta else [],
        )

    def to(self, device: torch.device | str) -> "Examples":
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            answer_pos=self.answer_pos.to(device),
            targets={k: v.to(device) for k, v in self.targets.items()},
        )

    def position_mask(self, positions: str = "answer") -> torch.Tensor:
        """(n, seq) bool mask of the rows where delta may act: "answer" or "all" real tokens."""
        if positions == "answer":
            mask = torch.zeros_like(self.attention_mask, dtype=torch.bool)
            mask[torch.arange(len(self), device=mask.device), self.answer_pos] = True
            return mask
        if positions == "all":
            return self.attention_mask.bool()
        raise ValueError(f"unknown positions {positions!r}; valid: 'answer', 'all'")


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (n, max_len) ids and an attention mask."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def answer_logits(logits: torch.Tensor, ex: Examples) -> torch.Tensor:
    """Next-token logits at each example's answer position: (n, vocab)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), ex.answer_pos.to(logits.device)]


@runtime_checkable
class Task(Protocol):
    """A behavior B to suppress and recover. B(x) holds iff ``score(...) > 0``."""

    name: str

    def examples(self) -> Examples: ...

    def score(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        """Behavior margin per example, (n,) float32; the behavior is present iff > 0."""
        ...

    def loss(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        """Per-example recovery loss to minimise, (n,)."""
        ...

    def describe(self) -> dict[str, Any]: ...
