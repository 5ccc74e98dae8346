"""Generation with residual edits active, correct with a KV cache.

DESIGN, "Generation under intervention is KV-cache correct": an edit aimed at a generated
position must reach that position when decoding runs one token at a time. So edits here are
*positional*: ``edit(h, positions) -> h'`` with ``h`` the residual of the chunk being run
``(batch, chunk, d_model)`` and ``positions`` the absolute position of each of its rows
``(batch, chunk)`` (long). The prompt is one chunk, each decoding step another of length 1;
without a cache every step re-runs the whole sequence as one chunk.

Positions count real tokens of each example: position 0 is its first prompt token, its prompt
fills ``0 .. L_b - 1`` and its k-th generated token (k = 0, 1, ...) sits at ``L_b + k``. This is
the column index of a right-padded batch (``tasks.Examples``), so a delta found by the
recovery engine on right-padded prompts indexes the same rows here. Padding rows get
position -1. Edits must act row by row (position-wise), as clamps and deltas do; an edit that
mixes rows cannot give the same result with and without a cache.

Internally prompts are re-packed to the left (real tokens right-aligned), so every example's
tokens stay contiguous and sliding-window attention (Gemma-2) sees the same distances as for a
single unpadded prompt. Positions per backend: HF gets ``position_ids`` = the positions above
(padding clamped to 0) and a DynamicCache, TransformerLens derives the same numbers from the
attention mask it keeps in its ``TransformerLensKeyValueCache``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from saerecover.models.base import ModelAdapter, apply_edit, plan_sites
from saerecover.models.hf import layer_post_hook, layer_pre_hook

#: ``edit(h, positions) -> h'``: h (batch, chunk, d_model), positions (batch, chunk) long,
#: -1 on padding. Returns a tensor of h's shape.
PositionalEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- edits -----------------------------------------------------------------------------------


class StaticEdit:
    """A position-independent edit (e.g. a clamp ``h -> site_clamp.defend(h)``)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"static_edit needs a callable h -> h', got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.fn(h)

    def __repr__(self) -> str:
        return f"static_edit({getattr(self.fn, '__qualname__', self.fn)!r})"


class AdditiveEdit:
    """Adds ``delta[b, p]`` to the row at absolute position ``p`` of example ``b``.

    delta: (batch, T_delta, d_model), or (T_delta, d_model) for every example; row p of delta
    is position p (the right-padded column). Positions at or beyond T_delta, and padding, get
    nothing. positions_mask: optional (batch, T_delta) or (T_delta,) bool; where False the row
    of delta is not applied. The sum is formed in float32 and cast back to h's dtype, as in
    ``DefendedModel`` (h_rec = h_def + delta).
    """

    def __init__(self, delta: torch.Tensor, positions_mask: torch.Tensor | None = None) -> None:
        delta = torch.as_tensor(delta).detach()
        if delta.ndim == 2:
            delta = delta.unsqueeze(0)
        if delta.ndim != 3:
            raise ValueError(
                f"additive_edit: delta must be (batch, T, d_model) or (T, d_model); got shape "
                f"{tuple(delta.shape)}"
            )
        delta = delta.float()
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(f"additive_edit: delta of shape {tuple(delta.shape)} contains NaN or infinity")
        if positions_mask is not None:
            m = torch.as_tensor(positions_mask, dtype=torch.bool, device=delta.device)
            if m.ndim == 1:
                m = m.unsqueeze(0)
            if m.ndim != 2 or m.shape[-1] != delta.shape[1] or m.shape[0] not in (1, delta.shape[0]):
                raise ValueError(
                    f"additive_edit: positions_mask has shape {tuple(m.shape)}; delta has shape "
                    f"{tuple(delta.shape)}, so the mask must be ({delta.shape[0]}, "
                    f"{delta.shape[1]}) or ({delta.shape[1]},)"
                )
            delta = delta * m.unsqueeze(-1).to(delta.dtype)
        self.delta = delta
        self._on: dict[torch.device, torch.Tensor] = {}

    def _delta_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.delta.to(device)
        return self._on[device]

    def __call__(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        delta = self._delta_on(h.device)
        n, t_delta, d = delta.shape
        b, _, d_h = h.shape
        if d != d_h:
            raise ValueError(f"additive_edit: delta has d_model {d}, the residual has {d_h}")
        if n not in (1, b):
            raise ValueError(f"additive_edit: delta has batch {n}, the residual has batch {b}")
        positions = positions.to(h.device)
        valid = (positions >= 0) & (positions < t_delta)  # (b, chunk)
        index = positions.clamp(0, max(t_delta - 1, 0))
        rows = delta.expand(b, t_delta, d).gather(1, index.unsqueeze(-1).expand(-1, -1, d))
        rows = rows * valid.unsqueeze(-1).to(rows.dtype)
        return (h.float() + rows).to(h.dtype)

    def __repr__(self) -> str:
        return f"additive_edit(delta={tuple(self.delta.shape)})"


class ChainedEdit:
    """Edits applied one after another at the same site."""

    def __init__(self, edits: Sequence[PositionalEdit]) -> None:
        self.edits = tuple(edits)

    def __call__(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for edit in self.edits:
            h = edit(h, positions)
        return h

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.edits))})"


def static_edit(fn: Callable[[torch.Tensor], torch.Tensor]) -> PositionalEdit:
    """A position-independent edit, e.g. ``static_edit(site_clamp.defend)``."""
    return StaticEdit(fn)


def additive_edit(delta: torch.Tensor, positions_mask: torch.Tensor | None = None) -> PositionalEdit:
    """``h[b, row] += delta[b, p]`` where the row is at absolute position p (see AdditiveEdit).
    delta: (batch, T_total or T_prompt, d_model) or (T, d_model)."""
    return AdditiveEdit(delta, positions_mask)


def chain(*edits: PositionalEdit) -> PositionalEdit:
    """Apply ``edits`` in order at one site: ``chain(static_edit(sc.defend), additive_edit(delta))``
    is the defended state plus delta (add ``static_edit(sc.defend)`` again to re-clamp)."""
    return ChainedEdit(edits)


def bind_positions(edits: Mapping[str, PositionalEdit], positions: torch.Tensor) -> dict[str, Any]:
    """Plain ``h -> h'`` edits (``models.base.Edit``) for one forward pass whose rows are at
    ``positions`` (batch, seq)."""
    return {name: _bound(edit, positions) for name, edit in edits.items()}


def _bound(edit: PositionalEdit, positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: edit(h, positions)


def _check_positional(name: str, edit: Any) -> None:
    """A clear error for the easy mistake of passing a one-argument ``h -> h'`` edit."""
    if not callable(edit):
        raise TypeError(f"the edit for {name!r} is {type(edit).__name__}, not a callable")
    try:
        sig = inspect.signature(edit)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, None)
    except TypeError:
        raise TypeError(
            f"the edit for {name!r} does not take (h, positions); wrap a position-independent "
            "h -> h' function with static_edit(fn), or a delta with additive_edit(delta)"
        ) from None


# --- the result ------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """What ``generate`` returns. Prompts are left-padded (real tokens right-aligned) and
    followed by the generated tokens; after an example's EOS its slots hold ``pad_token_id``.

    tokens, attention_mask, positions: (batch, P + N) with P the longest prompt and N the
    number of decoding steps run (<= max_new_tokens). attention_mask is 1 on real prompt tokens
    and on generated tokens up to and including EOS; positions are the absolute positions
    (-1 where the mask is 0). new_tokens: (batch, N). lengths: (batch,) generated tokens per
    example, EOS included. prompt_lengths: (batch,). finished: (batch,) bool, EOS reached.
    scores: (batch, N, vocab) float32 next-token logits of every step (``output_scores``).
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    new_tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    finished: torch.Tensor
    pad_token_id: int
    scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def continuations(self) -> list[torch.Tensor]:
        """The generated tokens of each example, EOS included, without padding."""
        return [self.new_tokens[i, : int(n)] for i, n in enumerate(self.lengths.tolist())]

    def sequences(self) -> list[torch.Tensor]:
        """Prompt followed by generated tokens for each example, without padding."""
        return [self.tokens[i][self.attention_mask[i].bool()] for i in range(len(self))]

    def right_padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the full sequences right-padded, so that column j is
        absolute position j (the layout of ``tasks.Examples`` and of deltas)."""
        seqs = self.sequences()
        width = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=self.tokens.dtype,
                         device=self.tokens.device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.tokens.device)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return ids, mask

    def decode(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> list[str]:
        """The generated text of each example (continuations only)."""
        return [
            tokenizer.decode(c.tolist(), skip_special_tokens=skip_special_tokens)
            for c in self.continuations()
        ]


# --- runners: one per backend, plus the no-cache reference --------------------------------


class _Runner:
    """Runs chunks of a growing left-padded batch and returns the last row's logits (B, V)."""

    def __init__(self, model: ModelAdapter, edits: Mapping[str, PositionalEdit]) -> None:
        self.model = model
        self.edits = dict(edits)

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _NoCacheRunner(_Runner):
    """Re-runs the whole sequence through ``model.forward`` at every step: the same code path
    as the recovery engine, hence the reference the cached runners must match."""

    def prefill(self, ids, mask, positions):
        self.ids, self.mask, self.positions = ids, mask, positions
        return self._run()

    def step(self, ids, positions):
        self.ids = torch.cat([self.ids, ids], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        self.positions = torch.cat([self.positions, positions], dim=1)
        return self._run()

    def _run(self):
        logits, _ = self.model.forward(
            self.ids, self.mask, edits=bind_positions(self.edits, self.positions)
        )
        return logits[:, -1]


class _HFCachedRunner(_Runner):
    """Drives the transformers model with a DynamicCache; decoder-layer hooks (the HF
    backend's own ``layer_pre_hook`` / ``layer_post_hook``) apply the edits with the chunk's positions."""

    def __enter__(self):
        from transformers import DynamicCache

        hf = self.model.model
        params = inspect.signature(hf.forward).parameters
        # transformers >= 5.2x renamed past_key_values to cache
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" in params
        self.cache = DynamicCache(config=hf.config)
        self.positions: torch.Tensor | None = None
        self.handles = []
        plan = plan_sites(self.edits, (), self.model.n_layers)
        try:
            for name, (layer, kind) in plan.items():
                module = self.model.layers[layer]
                visit = partial(self._visit, name)
                if kind == "pre":
                    hook = partial(layer_pre_hook, visit)
                    self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    hook = partial(layer_post_hook, visit)
                    self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _visit(self, name: str, resid: torch.Tensor) -> torch.Tensor:
        edit, positions = self.edits[name], self.positions
        return apply_edit(name, lambda h: edit(h, positions), resid)

    def _run(self, ids, positions):
        self.positions = positions
        kwargs = {
            "input_ids": ids,
            "attention_mask": self.mask,
            "position_ids": positions.clamp(min=0),
            self.cache_kw: self.cache,
            "use_cache": True,
        }
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1].float()

    def prefill(self, ids, mask, positions):
        self.mask = mask
        return self._run(ids, positions)

    def step(self, ids, positions):
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        return self._run(ids, positions)


def _tl_cache_class():
    try:  # TransformerLens 3.x
        from transformer_lens import TransformerLensKeyValueCache

        return TransformerLensKeyValueCache
    except ImportError:  # older releases
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache

        return HookedTransformerKeyValueCache


class _TLCachedRunner(_Runner):
    """HookedTransformer with its key-value cache; the cache keeps the attention mask, from
    which TransformerLens derives the same positions (cumsum of the mask - 1)."""

    def __enter__(self):
        plan = plan_sites(self.edits, (), self.model.n_layers)
        self.positions: torch.Tensor | None = None
        fwd_hooks = [(name, partial(self._hook, name)) for name in plan]
        self._ctx = self.model.model.hooks(fwd_hooks=fwd_hooks)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*(exc or (None, None, None)))

    def _hook(self, name: str, resid: torch.Tensor, hook: Any) -> torch.Tensor:
        edit, positions = self.edits[name], self.positions
        return apply_edit(name, lambda h: edit(h, positions), resid)

    def _run(self, ids, mask, positions):
        self.positions = positions
        logits = self.model.model(
            ids, return_type="logits", attention_mask=mask, past_kv_cache=self.cache
        )
        return logits[:, -1].float()

    def prefill(self, ids, mask, positions):
        tl = self.model.model
        self.cache = _tl_cache_class().init_cache(tl.cfg, tl.cfg.device, ids.shape[0])
        return self._run(ids, mask, positions)

    def step(self, ids, positions):
        return self._run(ids, torch.ones_like(ids), positions)


def _runner(model: ModelAdapter, edits: Mapping[str, PositionalEdit], use_cache: bool) -> _Runner:
    if not use_cache:
        return _NoCacheRunner(model, edits)
    backend = getattr(model, "backend", None)
    if backend == "hf":
        return _HFCachedRunner(model, edits)
    if backend == "tlens":
        return _TLCachedRunner(model, edits)
    raise ValueError(
        f"no KV-cache generation for backend {backend!r}; use use_cache=False, or one of "
        "'hf', 'tlens'"
    )


# --- generate --------------------------------------------------------------------------------


def left_pack(
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-pack prompts (any padding side, or a list of token lists) to the left.

    Returns (ids, mask, prompt_lengths): (B, P), (B, P), (B,) with P the longest prompt and
    each example's real tokens, in order, right-aligned."""
    if not isinstance(input_ids, torch.Tensor):
        rows = [torch.as_tensor(list(r), dtype=torch.long) for r in input_ids]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, width - len(r):] = r
                mask[i, width - len(r):] = 1
        return ids, mask, mask.sum(dim=1)
    ids = input_ids if input_ids.ndim == 2 else input_ids.unsqueeze(0)
    if attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.long)
    else:
        mask = attention_mask if attention_mask.ndim == 2 else attention_mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; input_ids has {tuple(ids.shape)}"
            )
        mask = mask.to(device=ids.device).long().clamp(0, 1)
    lengths = mask.sum(dim=1)
    width = int(lengths.max()) if ids.numel() else 0
    # a stable sort on the mask puts padding first and keeps the real tokens in order
    order = torch.sort(mask, dim=1, stable=True).indices
    ids = ids.gather(1, order)[:, ids.shape[1] - width:]
    mask = mask.gather(1, order)[:, mask.shape[1] - width:]
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token_id))
    return ids, mask, lengths


def _eos_ids(eos_token_id: int | Sequence[int] | None, tokenizer: Any) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def _pad_id(pad_token_id: int | None, tokenizer: Any, eos: list[int]) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return eos[0] if eos else 0


def _max_positions(model: ModelAdapter) -> int | None:
    """The hard limit on positions: a learned position table (GPT-2) or TransformerLens' n_ctx
    (it also precomputes rotary tables of that length)."""
    if getattr(model, "backend", None) == "tlens":
        return int(model.model.cfg.n_ctx)
    config = getattr(model.model, "config", None)
    return getattr(config, "n_positions", None)


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    scaled = logits / temperature
    if top_k is not None and 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: ModelAdapter,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    *,
    edits: Mapping[str, PositionalEdit] | None = None,
    max_new_tokens: int = 32,
    use_cache: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    output_scores: bool = False,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens per prompt with ``edits`` active at their sites.

    input_ids: (batch, seq) with ``attention_mask`` marking real tokens (either padding side),
    or a list of token-id lists. edits: hook name -> PositionalEdit (``static_edit``,
    ``additive_edit``, ``chain``). use_cache=True decodes one token at a time with the
    backend's KV cache; use_cache=False re-runs the whole sequence through ``model.forward``
    each step (the reference: greedy tokens are identical). do_sample=False is greedy; with
    sampling, ``temperature``, ``top_k`` and a ``generator`` on the model's device apply.
    eos_token_id: id or ids that end an example (default: the tokenizer's EOS; ``()`` never
    stops early). pad_token_id: fills finished and padded slots (default: the tokenizer's pad,
    else EOS, else 0). Runs under ``torch.no_grad``.
    """
    tokenizer = getattr(model, "tokenizer", None)
    eos = _eos_ids(eos_token_id, tokenizer)
    pad = _pad_id(pad_token_id, tokenizer, eos)
    edits = dict(edits or {})
    for name, edit in edits.items():
        _check_positional(name, edit)
    plan_sites(edits, (), model.n_layers)  # validates hook names
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")

    device = model.device
    ids, mask, prompt_lengths = left_pack(input_ids, attention_mask, pad)
    ids, mask, prompt_lengths = ids.to(device), mask.to(device), prompt_lengths.to(device)
    batch = ids.shape[0]
    if batch == 0 or ids.shape[1] == 0 or bool((prompt_lengths == 0).any()):
        raise ValueError("every prompt needs at least one real token")
    limit = _max_positions(model)
    if limit is not None and int(prompt_lengths.max()) + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({int(prompt_lengths.max())} tokens) plus max_new_tokens "
            f"({max_new_tokens}) exceeds the model's {limit} positions"
        )
    positions = torch.where(mask.bool(), mask.cumsum(dim=1) - 1, torch.full_like(mask, -1))
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)

    new_tokens: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad(), _runner(model, edits, use_cache) as runner:
        logits = runner.prefill(ids, mask, positions) if max_new_tokens > 0 else None
        for k in range(max_new_tokens):
            if output_scores:
                scores.append(logits)
            token = _choose(logits, do_sample, temperature, top_k, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            lengths += (~finished).long()
            new_tokens.append(token)
            if eos:
                finished = finished | torch.isin(token, eos_t)
            if k + 1 == max_new_tokens or bool(finished.all()):
                break
            step_positions = (prompt_lengths + k).unsqueeze(1)
            logits = runner.step(token.unsqueeze(1), step_positions)

    steps = len(new_tokens)
    new = torch.stack(new_tokens, dim=1) if steps else ids.new_zeros((batch, 0))
    gen_mask = (torch.arange(steps, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    gen_positions = prompt_lengths.unsqueeze(1) + torch.arange(steps, device=device).unsqueeze(0)
    gen_positions = torch.where(gen_mask.bool(), gen_positions, torch.full_like(gen_positions, -1))
    return GenerationResult(
        tokens=torch.cat([ids, new], dim=1),
        attention_mask=torch.cat([mask, gen_mask], dim=1),
        positions=torch.cat([positions, gen_positions], dim=1),
        new_tokens=new,
        lengths=lengths,
        prompt_lengths=prompt_lengths,
        finished=finished,
        pad_token_id=pad,
        scores=torch.stack(scores, dim=1) if output_scores and scores else None,
    )


__all__ = [
    "AdditiveEdit",
    "ChainedEdit",
    "GenerationResult",
    "PositionalEdit",
    "StaticEdit",
    "additive_edit",
    "bind_positions",
    "chain",
    "generate",
    "left_pack",
    "static_edit",
]
