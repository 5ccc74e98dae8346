"""Train the toy world: a small GPT-2 on the synthetic corpus, then one SAE per layer.

    python -m saerecover.toy.train --out DIR [--seed 0]

writes ``DIR/model`` (HF ``save_pretrained`` + tokenizer), ``DIR/saes/<hook_name>``
(sae_lens format) and ``DIR/metrics.json``. Deterministic on CPU: fixed seeds, deterministic
algorithms and an explicit thread count, so the same command gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saerecover.data import toy_corpus as corpus
from saerecover.toy.evaluate import evaluate_model, residuals, sae_stats


@dataclass
class ModelSettings:
    n_layer: int = 4
    d_model: int = 96
    n_head: int = 4
    n_positions: int = 64
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass
class SAESettings:
    expansion: int = 4  # d_sae = expansion * d_model
    n_docs: int = 12000  # corpus documents whose residuals (all non-pad tokens) train the SAEs
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    l1: float = 1.0  # standard SAE: L1 weight (mse and penalty both per input dimension)
    l0: float = 0.3  # jumprelu SAE: L0 weight (same units)
    bandwidth: float = 0.05  # jumprelu straight-through bandwidth (normalized units)
    init_threshold: float = 0.05
    jumprelu_layers: tuple[int, ...] = (3,)  # every other layer gets a standard (ReLU) SAE


@dataclass
class Settings:
    seed: int = 0
    threads: int = 2
    model: ModelSettings = field(default_factory=ModelSettings)
    sae: SAESettings = field(default_factory=SAESettings)


# ---------------------------------------------------------------------------------------------
# Tokenizer
def build_tokenizer(n_positions: int = 64):
    """Word-level fast tokenizer over ``corpus.vocabulary()``; prepends BOS, no chat template.

    Pre-tokenization splits on whitespace and isolates every punctuation character, so
    ``"User: hi?"`` and ``"User : hi ?"`` give the same tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(corpus.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=corpus.UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    bos = vocab[corpus.BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{corpus.BOS_TOKEN} $A",
        pair=f"{corpus.BOS_TOKEN} $A {corpus.BOS_TOKEN} $B",
        special_tokens=[(corpus.BOS_TOKEN, bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=corpus.BOS_TOKEN,
        eos_token=corpus.EOS_TOKEN,
        pad_token=corpus.PAD_TOKEN,
        unk_token=corpus.UNK_TOKEN,
        model_max_length=n_positions,
        padding_side="right",
    )


def encode_documents(tokenizer, docs: list[str]) -> list[list[int]]:
    """``[BOS] words [EOS]`` ids per document (word lookup; checked against the tokenizer)."""
    vocab = tokenizer.get_vocab()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = [[bos, *(vocab[w] for w in d.split()), eos] for d in docs]
    for d, ids in zip(docs[:50], out[:50]):
        assert tokenizer(d)["input_ids"] == ids[:-1], d
    return out


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: ``(input_ids, attention_mask)``, each (batch, seq)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Model
def train_model(tokenizer, ms: ModelSettings, seed: int, log=print, device: str = "cpu"):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=ms.n_positions,
        n_embd=ms.d_model,
        n_layer=ms.n_layer,
        n_head=ms.n_head,
        n_inner=4 * ms.d_model,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(device)
    docs = encode_documents(tokenizer, corpus.documents(ms.steps * ms.batch_size, seed))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ms.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=ms.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < ms.warmup:
            return ms.lr * (step + 1) / ms.warmup
        t = (step - ms.warmup) / max(1, ms.steps - ms.warmup)
        return ms.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    t0 = time.time()
    for step in range(ms.steps):
        ids, mask = pad_batch(docs[step * ms.batch_size : (step + 1) * ms.batch_size],
                              tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ms.grad_clip)
        opt.step()
        if step % 250 == 0 or step == ms.steps - 1:
            log(f"model step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s")
    model.eval()
    return model, time.time() - t0


# ---------------------------------------------------------------------------------------------
# SAEs
class _JumpReLUFn(torch.autograd.Function):
    """f = pre * 1[pre > theta]; straight-through gradient to theta (rectangle kernel)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        box = ((pre - theta).abs() < bw / 2).to(pre) / bw
        return g * (pre > theta), (-(theta * box * g)).sum(0), None


class _StepFn(torch.autograd.Function):
    """1[pre > theta]; straight-through gradient to theta (rectangle kernel)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        box = ((pre - theta).abs() < bw / 2).to(pre) / bw
        return None, (-(box * g)).sum(0), None


def train_sae(x: torch.Tensor, d_sae: int, arch: str, ss: SAESettings, seed: int, log=print):
    """Train one SAE on residuals ``x: (n_tokens, d_in)``; returns sae_lens-layout weights.

    Trained on x / scale (scale = RMS of x per dimension) with unit-norm decoder rows; the
    scale is folded back so the saved SAE reads raw residuals and its features are in
    residual-norm units (pre_raw = scale * pre_norm). Standard: (|x - x_hat|^2 + l1 * sum f) / d.
    JumpReLU: (|x - x_hat|^2 + l0 * #active) / d, with the straight-through threshold estimator
    of Rajamanoharan et al. (2024). Returns ``(weights, scale)``.
    """
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    scale = x.pow(2).sum(1).mean().div(d).sqrt()
    xn = x / scale
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {
        "W_dec": W_dec,
        "W_enc": W_dec.T.clone(),
        "b_enc": torch.zeros(d_sae),
        "b_dec": xn.mean(0).clone(),
    }
    if arch == "jumprelu":
        params["log_threshold"] = torch.full((d_sae,), math.log(ss.init_threshold))
    params = {k: torch.nn.Parameter(v.to(x.device)) for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=ss.lr)
    p = params
    for step in range(ss.steps):
        idx = torch.randint(0, n, (ss.batch_size,), generator=g)
        xb = xn[idx]
        pre = (xb - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        if arch == "jumprelu":
            theta = p["log_threshold"].exp()
            f = _JumpReLUFn.apply(pre, theta, ss.bandwidth)
            sparsity = ss.l0 * _StepFn.apply(pre, theta, ss.bandwidth).sum(1).mean() / d
        else:
            f = torch.relu(pre)
            sparsity = ss.l1 * f.sum(1).mean() / d
        x_hat = f @ p["W_dec"] + p["b_dec"]
        mse = (x_hat - xb).pow(2).sum(1).mean() / d
        warm = min(1.0, (step + 1) / (ss.steps // 10))
        loss = mse + warm * sparsity
        frac = max(0.0, (step - 0.8 * ss.steps) / (0.2 * ss.steps))
        for group in opt.param_groups:
            group["lr"] = ss.lr * (1 - 0.9 * frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
        if step % 1000 == 0 or step == ss.steps - 1:
            l0 = (f > 0).float().sum(1).mean().item()
            log(f"  sae[{arch}] step {step:5d}  mse {mse.item():.4f}  l0 {l0:.1f}")
    with torch.no_grad():
        out = {
            "W_enc": p["W_enc"].detach().clone(),
            "W_dec": p["W_dec"].detach().clone(),
            "b_enc": (p["b_enc"] * scale).detach().clone(),
            "b_dec": (p["b_dec"] * scale).detach().clone(),
        }
        if arch == "jumprelu":
            out["threshold"] = (p["log_threshold"].exp() * scale).detach().clone()
    return out, scale.item()


def make_sae(hook_name: str, weights: dict, arch: str, metadata: dict):
    """Build a sae_lens SAE (``standard`` or ``jumprelu``) holding ``weights``."""
    from sae_lens import SAE

    d_sae, d_in = weights["W_dec"].shape
    cfg = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": hook_name, **metadata},
    }
    sae = SAE.from_dict(cfg)
    sae.load_state_dict({k: v.contiguous() for k, v in weights.items()})
    return sae


# ---------------------------------------------------------------------------------------------
def versions() -> dict:
    import sae_lens
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sae_lens": sae_lens.__version__,
    }


def run(out: Path, st: Settings, log=print) -> dict:
    torch.set_num_threads(st.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(st.seed)
    torch.manual_seed(st.seed)
    t_start = time.time()

    tokenizer = build_tokenizer(st.model.n_positions)
    model, t_model = train_model(tokenizer, st.model, st.seed, log)
    formats = evaluate_model(model, tokenizer)
    log(json.dumps(formats, indent=1))

    # residuals of held-out corpus documents at every layer, all non-pad positions
    t0 = time.time()
    docs = encode_documents(tokenizer, corpus.documents(st.sae.n_docs, st.seed + 1))
    layers = list(range(st.model.n_layer))
    acts: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for i in range(0, len(docs), 512):
        ids, mask = pad_batch(docs[i : i + 512], tokenizer.pad_token_id)
        for L, r in residuals(model, ids, mask, layers).items():
            acts[L].append(r)
    d_sae = st.sae.expansion * st.model.d_model
    saes, scales = {}, {}
    for L in layers:
        hook = f"blocks.{L}.hook_resid_post"
        arch = "jumprelu" if L in st.sae.jumprelu_layers else "standard"
        log(f"SAE {hook} ({arch}, d_sae={d_sae})")
        weights, scales[hook] = train_sae(torch.cat(acts[L]), d_sae, arch, st.sae,
                                          st.seed + 100 + L, log)
        saes[hook] = make_sae(hook, weights, arch, {
            "model_name": "saerecover-toy-gpt2",
            "model_class_name": "HookedTransformer",
            "hook_head_index": None,
            "context_size": st.model.n_positions,
            "prepend_bos": True,
            "dataset_path": "saerecover.toy.corpus",
            "model_from_pretrained_kwargs": {"center_writing_weights": False},
        })
    t_sae = time.time() - t0
    stats = sae_stats(model, tokenizer, saes)
    log(json.dumps(stats, indent=1))

    if out.exists():
        shutil.rmtree(out)
    (out / "saes").mkdir(parents=True)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    for hook, sae in saes.items():
        sae.save_model(out / "saes" / hook)
    metrics = {
        "formats": formats,
        "saes": {h: {**s, "architecture": saes[h].cfg.architecture(), "d_sae": d_sae,
                     "train_input_scale": scales[h]} for h, s in stats.items()},
        "model": {"n_params": sum(p.numel() for p in model.parameters()),
                  "vocab_size": len(tokenizer)},
        "settings": asdict(st),
        "seed": st.seed,
        "wall_time_s": {"model": round(t_model, 1), "saes": round(t_sae, 1),
                        "total": round(time.time() - t_start, 1)},
        "versions": versions(),
        "command": f"python -m saerecover.toy.train --out DIR --seed {st.seed}",
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"wrote {out} in {time.time() - t_start:.0f}s")
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads (fixed so results repeat)")
    ap.add_argument("--steps", type=int, default=None, help="model steps (default: settings)")
    ap.add_argument("--sae-steps", type=int, default=None)
    args = ap.parse_args(argv)
    st = Settings(seed=args.seed, threads=args.threads)
    if args.steps is not None:
        st.model.steps = args.steps
    if args.sae_steps is not None:
        st.sae.steps = args.sae_steps
    run(args.out, st)


if __name__ == "__main__":
    main()
