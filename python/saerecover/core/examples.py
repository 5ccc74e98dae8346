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

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first inconsistency: shapes, dtypes, an answer
        position outside its sequence or on padding, ids that are missing or repeated."""
        ids, mask, pos = self.input_ids, self.attention_mask, self.answer_pos
        for name, t in (("input_ids", ids), ("attention_mask", mask), ("answer_pos", pos)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"examples.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_floating_point() or t.is_complex():
                raise TypeError(f"examples.{name} must hold integers, got {t.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"examples.input_ids must be 2-D (n, seq), got shape {tuple(ids.shape)}")
        n, seq = ids.shape
        if tuple(mask.shape) != (n, seq):
            raise ValueError(f"examples.attention_mask has shape {tuple(mask.shape)}; input_ids has {(n, seq)}")
        if tuple(pos.shape) != (n,):
            raise ValueError(f"examples.answer_pos must have shape ({n},), got {tuple(pos.shape)}")
        if len(self.ids) != n:
            raise ValueError(f"examples have {n} rows but {len(self.ids)} ids")
        if len(set(self.ids)) != n:
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})[:5]
            raise ValueError(f"example ids must be unique; repeated: {dup}")
        for k, v in self.targets.items():
            if not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[0] != n:
                raise ValueError(f"examples.targets[{k!r}] must be a tensor with leading dim {n}, got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if n and seq:
            lo, hi = int(pos.min()), int(pos.max())
            if lo < 0 or hi >= seq:
                i = int(((pos < 0) | (pos >= seq)).nonzero()[0])
                raise ValueError(f"answer position {int(pos[i])} of example {self.ids[i]!r} is outside its "
                                 f"sequence (valid: 0..{seq - 1})")
            on_pad = ~mask.gather(1, pos.long().unsqueeze(1)).squeeze(1).bool()
            if bool(on_pad.any()):
                i = int(on_pad.nonzero()[0])
                raise ValueError(f"answer position {int(pos[i])} of example {self.ids[i]!r} is a padding "
                                 f"token (attention_mask is 0 there)")
        elif n and not seq:
            raise ValueError("examples have no tokens (input_ids has 0 columns)")

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

    def position_mask(self, positions: str = "answer", response_rows: int | None = None) -> torch.Tensor:
        """(n, seq) bool mask of the rows where delta may act: "answer", "all" real tokens,
        "prompt" (before ``targets["prompt_len"]``) or "response" (the real tokens after the
        answer position, at most ``response_rows`` of them)."""
        if positions == "response":
            cols = torch.arange(self.attention_mask.shape[1], device=self.attention_mask.device).unsqueeze(0)
            after = cols - self.answer_pos.to(cols.device).unsqueeze(1)
            mask = self.attention_mask.bool() & (after >= 1)
            return mask & (after <= response_rows) if response_rows is not None else mask
        if positions == "answer":
            mask = torch.zeros_like(self.attention_mask, dtype=torch.bool)
            mask[torch.arange(len(self), device=mask.device), self.answer_pos] = True
            return mask
        if positions == "all":
            return self.attention_mask.bool()
        if positions == "prompt":
            if "prompt_len" not in self.targets:
                raise ValueError("positions='prompt' needs examples with a 'prompt_len' target")
            cols = torch.arange(self.attention_mask.shape[1], device=self.attention_mask.device)
            return self.attention_mask.bool() & (cols < self.targets["prompt_len"].unsqueeze(1))
        raise ValueError(f"unknown positions {positions!r}; valid: 'answer', 'all', 'prompt', 'response'")


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


class JudgedTask(Task, Protocol):
    """A task whose behavior is decided by its own judgement rather than ``score > 0``
    (for refusal: generate with the edits active and look for a refusal)."""

    def judge(self, defended: Any, ex: Examples, *, with_clamp: bool, deltas: dict | None = None,
              reclamp: bool = False) -> torch.Tensor:
        """(n,) float: > 0 where the behavior is present."""
        ...
