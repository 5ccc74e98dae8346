"""Generation under intervention: the KV-cache path gives the same greedy tokens as re-running
the whole sequence, edits reach generated positions, padding and batching change nothing,
and each example stops at its EOS."""

from __future__ import annotations

import pytest
import torch
from saerecover import testing
from saerecover.models.generation import (
    GenerationResult,
    additive_edit,
    bind_positions,
    chain,
    generate,
    left_pack,
    static_edit,
)

CASES = [(f, "hf") for f in testing.FAMILIES] + [(f, "tlens") for f in testing.FAMILIES]
N_NEW = 10


def _prompts(seed: int = 0, lengths=(7, 5, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random prompts of the given lengths (no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(len(testing.SPECIAL_TOKENS), testing.tiny_vocab_size(), (len(lengths), width), generator=gen)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids * mask, mask


def _clamp(h: torch.Tensor) -> torch.Tensor:
    """A nonlinear, position-wise, clamp-like edit."""
    return h.clamp(-0.5, 0.5)


def _edits(d_model: int, batch: int, t_delta: int = 24, seed: int = 1, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(batch, t_delta, d_model, generator=gen) * scale
    return {
        "blocks.0.hook_resid_post": chain(static_edit(_clamp), additive_edit(delta)),
        "blocks.1.hook_resid_pre": static_edit(lambda h: torch.relu(h) * 1.5 - 0.1),
    }, delta


def _strip(r: GenerationResult) -> list[list[int]]:
    return [c.tolist() for c in r.continuations()]


# --- cache vs no cache -----------------------------------------------------------------------


@pytest.mark.parametrize("family,backend", CASES)
def test_cache_and_no_cache_give_identical_tokens_under_edits(tiny_adapters, family, backend):
    model = tiny_adapters(family, backend)
    ids, mask = _prompts()
    edits, _ = _edits(model.d_model, 3)  # delta covers prompt and generated positions
    kw = dict(edits=edits, max_new_tokens=N_NEW, eos_token_id=(), output_scores=True)
    cached = generate(model, ids, mask, use_cache=True, **kw)
    full = generate(model, ids, mask, use_cache=False, **kw)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.new_tokens.shape == (3, N_NEW)
    torch.testing.assert_close(cached.scores, full.scores, atol=1e-4, rtol=0)
    # the edits matter: without them the continuation differs
    plain = generate(model, ids, mask, max_new_tokens=N_NEW, eos_token_id=())
    assert not torch.equal(plain.new_tokens, cached.new_tokens)


@pytest.mark.parametrize("family,backend", [("llama", "hf"), ("gpt2", "tlens")])
def test_sampling_with_a_seeded_generator_matches_across_cache_modes(tiny_adapters, family, backend):
    model = tiny_adapters(family, backend)
    ids, mask = _prompts(seed=3)
    edits, _ = _edits(model.d_model, 3)
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator(device=model.device).manual_seed(7)
        runs.append(generate(model, ids, mask, edits=edits, max_new_tokens=N_NEW, use_cache=use_cache,
                             do_sample=True, temperature=1.5, top_k=20, generator=gen, eos_token_id=()))
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def test_generation_scores_equal_a_teacher_forced_forward(tiny_adapters):
    """Replaying the generated sequences right-padded through ``model.forward`` with the same
    edits (bound to column = position) gives the logits each decoding step saw."""
    model = tiny_adapters("gemma2", "hf")
    ids, mask = _prompts(seed=4)
    edits, _ = _edits(model.d_model, 3)
    res = generate(model, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=(), output_scores=True)
    full_ids, full_mask = res.right_padded()
    cols = torch.arange(full_ids.shape[1]).expand_as(full_ids)
    positions = torch.where(full_mask.bool(), cols, torch.full_like(cols, -1))
    logits, _ = model.forward(full_ids, full_mask, edits=bind_positions(edits, positions))
    for b in range(3):
        start = int(res.prompt_lengths[b]) - 1
        torch.testing.assert_close(logits[b, start : start + N_NEW], res.scores[b], atol=1e-4, rtol=0)
    for b, seq in enumerate(res.sequences()):
        assert seq.tolist() == full_ids[b, : len(seq)].tolist()


def test_hf_and_tlens_generate_the_same_tokens(tiny_adapters):
    ids, mask = _prompts(seed=5)
    hf, tl = tiny_adapters("llama", "hf"), tiny_adapters("llama", "tlens")
    edits, _ = _edits(hf.d_model, 3)
    a = generate(hf, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=())
    b = generate(tl, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=())
    assert torch.equal(a.tokens, b.tokens)


# --- padding and batching --------------------------------------------------------------------


@pytest.mark.parametrize("family,backend", CASES)
def test_padded_batch_equals_per_example_generation(tiny_adapters, family, backend):
    model = tiny_adapters(family, backend)
    ids, mask = _prompts(seed=6, lengths=(8, 4, 6, 2))
    edits, delta = _edits(model.d_model, 4)
    batch = generate(model, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=())
    for b in range(4):
        n = int(mask[b].sum())
        one_edits = {
            "blocks.0.hook_resid_post": chain(static_edit(_clamp), additive_edit(delta[b : b + 1])),
            "blocks.1.hook_resid_pre": edits["blocks.1.hook_resid_pre"],
        }
        single = generate(model, ids[b : b + 1, :n], edits=one_edits, max_new_tokens=N_NEW, eos_token_id=())
        assert single.new_tokens[0].tolist() == batch.new_tokens[b].tolist(), f"example {b}"
        assert int(batch.prompt_lengths[b]) == n


def test_padding_side_and_list_input_do_not_matter(tiny_adapters):
    model = tiny_adapters("gemma2", "hf")
    ids, mask = _prompts(seed=7)
    edits, _ = _edits(model.d_model, 3)
    kw = dict(edits=edits, max_new_tokens=N_NEW, eos_token_id=())
    right = generate(model, ids, mask, **kw)
    left_ids, left_mask, lengths = left_pack(ids, mask)
    left = generate(model, left_ids, left_mask, **kw)
    as_list = generate(model, [ids[b, : int(mask[b].sum())].tolist() for b in range(3)], **kw)
    assert torch.equal(right.tokens, left.tokens) and torch.equal(right.tokens, as_list.tokens)
    assert lengths.tolist() == [7, 5, 3]
    # left packing: real tokens right-aligned, in order
    assert left_mask[2].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert left_ids[2, 4:].tolist() == ids[2, :3].tolist()


def test_result_layout(tiny_adapters):
    model = tiny_adapters("gpt2", "hf")
    ids, mask = _prompts(seed=8)
    res = generate(model, ids, mask, max_new_tokens=4, eos_token_id=())
    assert res.tokens.shape == (3, 7 + 4)
    assert res.positions[2].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5, 6]
    assert res.positions[0].tolist() == list(range(11))
    assert res.lengths.tolist() == [4, 4, 4] and not res.finished.any()
    assert [len(s) for s in res.sequences()] == [11, 9, 7]
    rp_ids, rp_mask = res.right_padded()
    assert rp_mask.sum(1).tolist() == [11, 9, 7]
    texts = res.decode(model.tokenizer)
    assert len(texts) == 3 and all(len(t.split()) <= 4 for t in texts)


# --- edits at generated positions ------------------------------------------------------------


@pytest.mark.parametrize("family,backend", [("gpt2", "hf"), ("llama", "hf"), ("gemma2", "hf"), ("gpt2", "tlens")])
def test_additive_edit_at_a_generated_position_acts_from_there_on(tiny_adapters, family, backend):
    """delta only at absolute position L + k (the k-th generated token's row) leaves the
    first k + 1 generated tokens alone (they were chosen before that row existed) and changes
    the continuation after it, identically with and without the cache."""
    model = tiny_adapters(family, backend)
    ids, mask = _prompts(seed=9, lengths=(6, 4))
    lengths = mask.sum(1)
    site = "blocks.1.hook_resid_pre"
    base = generate(model, ids, mask, edits={site: static_edit(_clamp)}, max_new_tokens=N_NEW, eos_token_id=())
    k = 3
    gen = torch.Generator().manual_seed(10)
    delta = torch.zeros(2, 6 + N_NEW, model.d_model)
    for b in range(2):
        delta[b, int(lengths[b]) + k] = torch.randn(model.d_model, generator=gen) * 40.0
    edits = {site: chain(static_edit(_clamp), additive_edit(delta))}
    cached = generate(model, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=())
    full = generate(model, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=(), use_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.new_tokens[:, : k + 1], base.new_tokens[:, : k + 1])
    for b in range(2):
        assert cached.new_tokens[b, k + 1 :].tolist() != base.new_tokens[b, k + 1 :].tolist(), b


def test_additive_edit_rows_positions_and_masks():
    d = 3
    delta = torch.arange(2 * 4 * d, dtype=torch.float32).reshape(2, 4, d)
    h = torch.zeros(2, 3, d)
    positions = torch.tensor([[-1, 0, 3], [2, 4, 5]])
    out = additive_edit(delta)(h, positions)
    assert torch.equal(out[0, 0], torch.zeros(d))  # padding
    assert torch.equal(out[0, 1], delta[0, 0]) and torch.equal(out[0, 2], delta[0, 3])
    assert torch.equal(out[1, 0], delta[1, 2])
    assert torch.equal(out[1, 1:], torch.zeros(2, d))  # beyond delta's length
    masked = additive_edit(delta, positions_mask=torch.tensor([True, True, True, False]))(h, positions)
    assert torch.equal(masked[0, 2], torch.zeros(d)) and torch.equal(masked[0, 1], delta[0, 0])
    shared = additive_edit(delta[0])(h, positions)  # (T, d): the same rows for every example
    assert torch.equal(shared[1, 0], delta[0, 2])
    bf16 = additive_edit(delta)(h.bfloat16(), positions)
    assert bf16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="batch"):
        additive_edit(delta)(torch.zeros(3, 1, d), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="positions_mask"):
        additive_edit(delta, positions_mask=torch.ones(5, dtype=torch.bool))


# --- stopping --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["hf", "tlens"])
def test_each_example_stops_at_its_eos(tiny_adapters, backend):
    model = tiny_adapters("llama", backend)
    ids, mask = _prompts(seed=11)
    edits, _ = _edits(model.d_model, 3)
    free = generate(model, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=())
    row0 = free.new_tokens[0].tolist()
    j = next(i for i in range(1, N_NEW) if row0[i] not in row0[:i])  # first new token seen at step j
    eos = row0[j]
    stop = generate(model, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    for b in range(3):
        row = free.new_tokens[b].tolist()
        n = row.index(eos) + 1 if eos in row else N_NEW
        assert int(stop.lengths[b]) == n and bool(stop.finished[b]) == (eos in row)
        assert stop.new_tokens[b, :n].tolist() == row[:n]
        assert (stop.new_tokens[b, n:] == 0).all()
        assert stop.attention_mask[b, 7:].sum() == n
    assert int(stop.lengths[0]) == j + 1
    # the cache path and the reference agree on stopping too
    ref = generate(model, ids, mask, edits=edits, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0, use_cache=False)
    assert torch.equal(stop.tokens, ref.tokens)


def test_generation_ends_when_all_examples_finished(tiny_adapters):
    model = tiny_adapters("gpt2", "hf")
    ids, mask = _prompts(seed=12, lengths=(5,))
    first = generate(model, ids, mask, max_new_tokens=1, eos_token_id=())
    res = generate(model, ids, mask, max_new_tokens=N_NEW, eos_token_id=int(first.new_tokens[0, 0]))
    assert res.new_tokens.shape == (1, 1) and bool(res.finished[0])


# --- errors and dtypes -----------------------------------------------------------------------


def test_errors_are_clear(tiny_adapters):
    model = tiny_adapters("gpt2", "hf")
    ids, mask = _prompts()
    with pytest.raises(TypeError, match="static_edit"):
        generate(model, ids, mask, edits={"blocks.0.hook_resid_post": lambda h: h})
    with pytest.raises(ValueError, match="hook name"):
        generate(model, ids, mask, edits={"blocks.9.hook_resid_post": static_edit(_clamp)})
    with pytest.raises(ValueError, match="positions"):
        generate(model, ids, mask, max_new_tokens=100)  # GPT-2's 64 learned positions
    with pytest.raises(ValueError, match="real token"):
        generate(model, ids, torch.zeros_like(mask))


def test_bf16_model_generates_with_float32_delta(tiny_gemma2_dir):
    from saerecover.models import load_model

    model = load_model(tiny_gemma2_dir, backend="hf", device="cpu", dtype="bf16")
    ids, mask = _prompts(seed=13)
    edits, _ = _edits(model.d_model, 3)
    res = generate(model, ids, mask, edits=edits, max_new_tokens=4, eos_token_id=(), output_scores=True)
    assert res.new_tokens.shape == (3, 4) and res.scores.dtype == torch.float32
    assert torch.isfinite(res.scores).all()


@pytest.mark.parametrize("backend", ["hf", "tlens"])
def test_no_hooks_outlive_generation(tiny_adapters, backend):
    model = tiny_adapters("gpt2", backend)
    ids, mask = _prompts()

    def hooks_left() -> bool:
        if backend == "hf":
            return any(m._forward_hooks or m._forward_pre_hooks for m in model.model.modules())
        return any(hp.fwd_hooks for hp in model.model.hook_dict.values())

    def broken(h, positions):
        raise RuntimeError("boom")

    generate(model, ids, mask, edits={"blocks.0.hook_resid_post": static_edit(_clamp)}, max_new_tokens=3)
    assert not hooks_left()
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, ids, mask, edits={"blocks.1.hook_resid_post": broken}, max_new_tokens=3)
    assert not hooks_left()
