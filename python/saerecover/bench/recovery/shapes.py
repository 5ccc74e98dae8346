"""The benchmarked shapes: a real architecture from its config (written here, random weights, no
download), a random SAE of the real width at a realistic layer, a clamp of features that fire at
a realistic rate, and IOI-length prompts of random tokens with a logit-difference task.

The SAE is random but calibrated on the benchmark's own residuals: decoder rows of unit norm,
encoder = decoder^T, and one threshold (the bias, or JumpReLU's theta) set so that each token
has about ``l0`` active features. The clamped features are the ``features`` whose firing rate
on the prompt rows is nearest ``feature_rate`` (features a task selects fire on some of its
tokens, not on all nor on none); they are set to 0 (ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.examples import Examples
from saerecover.core.sites import Site
from saerecover.tasks.ioi import IOI


@dataclass(frozen=True)
class Shape:
    """One benchmarked shape: the transformers config (``family`` + ``config``), the SAE's site,
    width and architecture, its calibrated L0, and the prompts' token lengths."""

    name: str
    family: str  # "toy" (the shipped toy world), "gpt2", "gpt_neox", "gemma2"
    hook: str
    width: int
    architecture: str = "standard"  # or "jumprelu"
    l0: int = 64
    config: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: tuple[int, int] = (15, 20)
    n: int = 16
    source: str = ""


#: The shapes by name. Sites: the layers public SAEs are most used at (gpt2-small-res-jb layer
#: 8, a Pythia-70M residual SAE mid-depth, Gemma Scope's layer 12 16k JumpReLU residual SAE).
SHAPES: dict[str, Shape] = {
    "toy": Shape("toy", "toy", "blocks.1.hook_resid_post", 0, prompt_tokens=(10, 14), n=8,
                 source="the shipped toy world (4 layers, d 96) and its trained SAE"),
    "pythia-70m": Shape(
        "pythia-70m", "gpt_neox", "blocks.3.hook_resid_post", 32768, l0=64,
        config=dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                    intermediate_size=2048, rotary_pct=0.25, max_position_embeddings=2048,
                    use_parallel_residual=True, layer_norm_eps=1e-5, tie_word_embeddings=False),
        source="EleutherAI/pythia-70m's config"),
    "gpt2-small": Shape(
        "gpt2-small", "gpt2", "blocks.8.hook_resid_pre", 24576, l0=64,
        config=dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
        source="gpt2's config (GPT-2 small)"),
    "gemma-2-2b": Shape(
        "gemma-2-2b", "gemma2", "blocks.12.hook_resid_post", 16384, architecture="jumprelu", l0=80,
        config=dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                    query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
        prompt_tokens=(16, 21), n=8, source="google/gemma-2-2b's config"),
}


class LogitDifference:
    """The IOI task's score and loss on random prompts: logit(io) - logit(s) at the answer
    position; the loss is its negative (the paper's)."""

    name = "logit_difference"

    def __init__(self, examples: Examples) -> None:
        self._examples = examples

    def examples(self) -> Examples:
        return self._examples

    score = IOI.score
    loss = IOI.loss

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n": len(self._examples)}


def build_model(shape: Shape, device: str, dtype: Any) -> Any:
    """The model adapter: the toy world's model, or the architecture of ``shape.config`` with
    random weights (seeded)."""
    from saerecover.models import from_hf, resolve_dtype

    if shape.family == "toy":
        from saerecover import toy

        return toy.load(device=device, dtype=dtype).model
    import transformers

    classes = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
               "gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[shape.family])
    torch.manual_seed(0)
    config = config_cls(**shape.config)
    if shape.family == "gemma2":
        config._attn_implementation = "eager"  # soft capping: SDPA would skip it
    # built in the weights' dtype directly: Gemma-2-2B's float32 copy alone is 10 GiB
    before = torch.get_default_dtype()
    torch.set_default_dtype(resolve_dtype(dtype) or torch.float32)
    try:
        model = model_cls(config)
    finally:
        torch.set_default_dtype(before)
    model = model.to(device=device)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-NeoX is not among the TransformerLens-checked architectures
        return from_hf(model)


def build_examples(shape: Shape, n: int, vocab: int, seed: int = 0) -> Examples:
    """``n`` prompts of random tokens, ``shape.prompt_tokens`` long (right-padded), answer at the
    last token, io / s two random tokens; delta may act on every prompt row."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = shape.prompt_tokens
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
    seq = int(lengths.max())
    ids = torch.randint(3, vocab, (n, seq), generator=gen)
    cols = torch.arange(seq).unsqueeze(0)
    mask = (cols < lengths.unsqueeze(1)).long()
    ids = ids * mask
    io_s = torch.randint(3, vocab, (n, 2), generator=gen)
    return Examples(input_ids=ids, attention_mask=mask, answer_pos=lengths - 1, ids=[f"p{i}" for i in range(n)],
                    targets={"io": io_s[:, 0], "s": io_s[:, 1], "prompt_len": lengths})


def random_site(shape: Shape, residuals: torch.Tensor, seed: int = 0) -> Site:
    """A random SAE of ``shape.width`` features calibrated to ``shape.l0`` active features per
    row of ``residuals`` (rows, d)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

    d = residuals.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(shape.width, d, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    pre = residuals.float() @ w_dec.T
    threshold = float(torch.quantile(pre.flatten()[torch.randperm(pre.numel(), generator=gen)[:2_000_000]],
                                     1.0 - shape.l0 / shape.width))
    if shape.architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=shape.width, device="cpu"))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=shape.width, device="cpu"))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_dec.zero_()
        if shape.architecture == "jumprelu":
            sae.b_enc.zero_()
            sae.threshold.fill_(threshold)
        else:
            sae.b_enc.fill_(-threshold)
    sae.to(residuals.device)
    return Site(shape.hook, sae, source=f"random {shape.architecture} SAE, width {shape.width}, L0 ~{shape.l0}")


def choose_clamp(site: Site, residuals: torch.Tensor, k: int, rate: float) -> tuple[Clamp, list[float]]:
    """A clamp of the ``k`` features whose firing rate on ``residuals`` is nearest ``rate``, set
    to 0; and their rates."""
    with torch.no_grad():
        fired = (site.encode(residuals) > 0).float().mean(dim=0).cpu()
    order = torch.argsort((fired - rate).abs())
    features = order[:k].sort().values
    return Clamp({site: features}, value=0.0), [float(fired[i]) for i in features]
