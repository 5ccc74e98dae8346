"""Tiny random-weight causal LMs for tests: GPT-2, Llama and Gemma-2 families, saved with
``save_pretrained`` (weights + a small word-level tokenizer) into a local directory, so that
every loading path runs exactly as it does for a downloaded checkpoint, with no download.

Each builder returns the saved directory; load it with ``saerecover.models.load_model``
(or ``AutoModelForCausalLM.from_pretrained``). Builds are deterministic in ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: The tokenizer's words. Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then these in order.
TINY_WORDS: tuple[str, ...] = tuple(
    """the a an and or but of to in on at with from by for is was are were be been it he she
    they we you i this that these those cat dog bird fish tree house car road book pen cup
    red blue green big small old new fast slow mary john alice bob gave went said saw
    yes no not do did can will would sure sorry cannot help request answer question""".split()
)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
FAMILIES: tuple[str, ...] = ("gpt2", "llama", "gemma2")


def tiny_tokenizer(*, add_bos: bool = False):
    """A word-level fast tokenizer over ``TINY_WORDS`` (whitespace split, unknown words map to
    ``<unk>``), with pad/bos/eos/unk set and right padding. ``add_bos`` prepends ``<bos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="right",
    )


def tiny_vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(TINY_WORDS)


def _perturb_(model: torch.nn.Module, seed: int, noise: float) -> None:
    """Add N(0, noise) to every parameter (tied ones once), so that biases, norm gains and
    soft caps are all exercised; HF's own init leaves biases at 0 and norm gains at 1."""
    if noise <= 0:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * noise)


def _save(model, path: Path, add_bos: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(path)
    tiny_tokenizer(add_bos=add_bos).save_pretrained(path)
    return path


def _special_ids() -> dict:
    return {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_gpt2(
    root: str | Path,
    *,
    name: str = "tiny-gpt2",
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    n_ctx: int = 64,
    seed: int = 0,
    noise: float = 0.1,
) -> Path:
    """A GPT-2 (GPT2LMHeadModel, tied embeddings, learned positions) saved in ``root/name``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=tiny_vocab_size(),
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        **_special_ids(),
    )
    model = GPT2LMHeadModel(cfg)
    _perturb_(model, seed, noise)
    return _save(model, Path(root) / name, add_bos=False)


def tiny_llama(
    root: str | Path,
    *,
    name: str = "tiny-llama",
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 64,
    n_ctx: int = 64,
    seed: int = 0,
    noise: float = 0.1,
) -> Path:
    """A Llama (LlamaForCausalLM, grouped-query attention, untied unembedding, RoPE) saved in
    ``root/name``; its tokenizer prepends ``<bos>``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tiny_vocab_size(),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=n_ctx,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **_special_ids(),
    )
    model = LlamaForCausalLM(cfg)
    _perturb_(model, seed, noise)
    return _save(model, Path(root) / name, add_bos=True)


def tiny_gemma2(
    root: str | Path,
    *,
    name: str = "tiny-gemma-2",
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_head: int = 16,
    d_mlp: int = 64,
    n_ctx: int = 64,
    sliding_window: int = 4,
    query_pre_attn_scalar: int = 12,
    attn_softcap: float = 5.0,
    final_softcap: float = 3.0,
    seed: int = 0,
    noise: float = 0.1,
) -> Path:
    """A Gemma-2 (Gemma2ForCausalLM) saved in ``root/name``: embeddings scaled by
    sqrt(d_model) inside the model, pre+post norms, alternating sliding/global attention, a
    head size that is not d_model / n_heads, a non-default attention scale, and soft caps small
    enough to bite on random weights. Its tokenizer prepends ``<bos>``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=tiny_vocab_size(),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_head,
        max_position_embeddings=n_ctx,
        sliding_window=sliding_window,
        query_pre_attn_scalar=query_pre_attn_scalar,
        attn_logit_softcapping=attn_softcap,
        final_logit_softcapping=final_softcap,
        **_special_ids(),
    )
    model = Gemma2ForCausalLM(cfg)
    _perturb_(model, seed, noise)
    return _save(model, Path(root) / name, add_bos=True)


def tiny_model(family: str, root: str | Path, **kwargs) -> Path:
    """Build the tiny model of ``family`` (one of ``FAMILIES``) in ``root``."""
    builders = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma2": tiny_gemma2}
    if family not in builders:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {list(builders)}")
    return builders[family](root, **kwargs)


#: The tiny GGUF's chat template (ChatML-like, no default system prompt).
GGUF_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def tiny_llama_gguf(path: str | Path, *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
                    n_kv_heads: int = 2, d_mlp: int = 64, seed: int = 0) -> Path:
    """Write a tiny Llama GGUF file at ``path`` with the ``gguf`` package (the ``real`` extra):
    random F32 weights (tied embeddings), a byte-level BPE tokenizer of a few dozen tokens and a
    chat template, so that the GGUF loading path runs end to end with no download."""
    import gguf
    import numpy as np

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    merges = ("t h", "th e", "Ġ the", "a n", "Ġ a")
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", ",", "."]
    tokens = list(specials) + chars + [m.replace(" ", "") for m in merges]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(n_layers)
    w.add_context_length(64)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_mlp)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(d_model // n_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(list(merges))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(GGUF_CHAT_TEMPLATE)

    def rand(*shape: int, offset: float = 0.0) -> np.ndarray:
        return (offset + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    d_head = d_model // n_heads
    w.add_tensor("token_embd.weight", rand(len(tokens), d_model))  # tied: no output.weight
    w.add_tensor("output_norm.weight", rand(d_model, offset=1.0))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rand(d_model, offset=1.0))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(d_model, d_model))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(n_kv_heads * d_head, d_model))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(n_kv_heads * d_head, d_model))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(d_model, d_model))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rand(d_model, offset=1.0))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(d_mlp, d_model))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(d_mlp, d_model))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(d_model, d_mlp))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
