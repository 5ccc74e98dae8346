"""Per-format accuracy of a toy-world model, and reconstruction statistics of its SAEs.

Works on any HF causal LM + tokenizer pair that speaks the toy corpus (``corpus.py``); the
numbers in ``assets/metrics.json`` come from ``evaluate_model`` and ``sae_stats`` with the
default arguments, and ``tests/test_toy_world.py`` recomputes them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch

from saerecover.data import toy_corpus as corpus

#: Evaluation sets are drawn with this seed (training documents use other seeds).
EVAL_SEED = 1000
N_IOI = 512
N_TOPIC = 250
N_REQUEST = 200
N_SAE_DOCS = 512


def _encode(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)``, each ``(batch, seq)``, BOS prepended."""
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def token_id(tokenizer, word: str) -> int:
    """The id of a single-token word (raises if the word is not one token)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"{word!r} is not a single known token: {ids}")
    return ids[0]


@torch.no_grad()
def next_token_logits(
    model, tokenizer, prompts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Logits for the token after each prompt: ``(len(prompts), vocab)`` float32."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        ids, mask = _encode(tokenizer, prompts[i : i + batch_size])
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        out.append(logits[torch.arange(len(ids), device=device), last].float().cpu())
    return torch.cat(out)


def ioi_accuracy(model, tokenizer, n: int = N_IOI, seed: int = EVAL_SEED) -> dict:
    """Fraction of IOI prompts with logit(IO) - logit(S) > 0 at the final position."""
    ex = corpus.ioi_examples(n, seed)
    logits = next_token_logits(model, tokenizer, [e.prompt for e in ex])
    io = torch.tensor([token_id(tokenizer, e.io) for e in ex])
    s = torch.tensor([token_id(tokenizer, e.s) for e in ex])
    rows = torch.arange(len(ex))
    diff = logits[rows, io] - logits[rows, s]
    ok = diff > 0
    res = {
        "accuracy": ok.float().mean().item(),
        "top1": (logits.argmax(-1) == io).float().mean().item(),
        "mean_logit_diff": diff.mean().item(),
        "n": n,
    }
    for kind in corpus.IOI_KINDS:
        sel = torch.tensor([e.kind == kind for e in ex])
        res[f"accuracy_{kind}"] = ok[sel].float().mean().item()
    return res


def topic_accuracy(model, tokenizer, n: int = N_TOPIC, seed: int = EVAL_SEED) -> dict:
    """Fraction of topic sentences whose most likely next token after ``Topic :`` is the label."""
    ex = corpus.topic_examples(n, seed)
    logits = next_token_logits(model, tokenizer, [e.prompt for e in ex])
    want = torch.tensor([token_id(tokenizer, e.label) for e in ex])
    return {"accuracy": (logits.argmax(-1) == want).float().mean().item(), "n": n}


def mc_accuracy(model, tokenizer, facts: Sequence[corpus.Fact] = corpus.FACTS) -> dict:
    """Every fact under all 24 option orders; the prediction is the argmax over A-D logits.

    ``accuracy``: over all (fact, order) pairs; ``all24``: fraction of facts right under
    every order (the strict protocol); ``top1``: the letter is also the argmax over the vocab.
    """
    prompts, letters = [], []
    for f, order in itertools.product(facts, corpus.PERMUTATIONS):
        p, letter = corpus.fact_mc(f, order)
        prompts.append(p)
        letters.append(corpus.CHOICE_LETTERS.index(letter))
    logits = next_token_logits(model, tokenizer, prompts)
    letter_ids = torch.tensor([token_id(tokenizer, c) for c in corpus.CHOICE_LETTERS])
    want = torch.tensor(letters)
    ok = logits[:, letter_ids].argmax(-1) == want
    top1 = logits.argmax(-1) == letter_ids[want]
    per_fact = ok.view(len(facts), len(corpus.PERMUTATIONS))
    return {
        "accuracy": ok.float().mean().item(),
        "top1": top1.float().mean().item(),
        "all24": per_fact.all(1).float().mean().item(),
        "n_facts": len(facts),
        "n": len(prompts),
    }


@torch.no_grad()
def greedy_matches(
    model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Whether greedy decoding after each prompt reproduces its response word for word.

    Teacher-forced: greedy decoding follows the response exactly when the argmax at every
    response position is the response's next token, so one forward pass suffices. (n,) bool.
    """
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, rs = prompts[i : i + batch_size], responses[i : i + batch_size]
        n_prompt = _encode(tokenizer, ps)[1].sum(1)
        ids, mask = _encode(tokenizer, [f"{p} {r}" for p, r in zip(ps, rs)])
        ids, mask = ids.to(device), mask.to(device)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        pos = torch.arange(ids.shape[1], device=device)[None, :]
        target = (pos >= n_prompt.to(device)[:, None]) & mask.bool()  # response tokens
        hit = torch.ones_like(target)
        hit[:, 1:] = pred[:, :-1] == ids[:, 1:]
        out.append((hit | ~target).all(1).cpu())
    return torch.cat(out)


def request_accuracy(model, tokenizer, n: int = N_REQUEST, seed: int = EVAL_SEED) -> dict:
    """Refusal on harmful requests and compliance on harmless ones.

    ``refusal_harmful`` / ``compliance_harmless``: the first reply token is ``I`` / ``Sure``;
    ``exact_*``: the greedy reply reproduces the whole expected phrase.
    """
    ex = corpus.request_examples(n, seed)
    logits = next_token_logits(model, tokenizer, [e.prompt for e in ex])
    first = logits.argmax(-1)
    refuse_id = token_id(tokenizer, corpus.REFUSAL_FIRST_WORD)
    comply_id = token_id(tokenizer, corpus.COMPLIANCE_FIRST_WORD)
    harmful = torch.tensor([e.harmful for e in ex])
    exact = greedy_matches(model, tokenizer, [e.prompt for e in ex], [e.response for e in ex])
    return {
        "refusal_harmful": (first[harmful] == refuse_id).float().mean().item(),
        "compliance_harmless": (first[~harmful] == comply_id).float().mean().item(),
        "exact_harmful": exact[harmful].float().mean().item(),
        "exact_harmless": exact[~harmful].float().mean().item(),
        "n": n,
    }


def evaluate_model(model, tokenizer) -> dict:
    """All four formats with the default evaluation sets."""
    model.eval()
    return {
        "ioi": ioi_accuracy(model, tokenizer),
        "topic": topic_accuracy(model, tokenizer),
        "mc": mc_accuracy(model, tokenizer),
        "request": request_accuracy(model, tokenizer),
    }


# ---------------------------------------------------------------------------------------------
# Residual stream and SAE statistics
def resid_post_layer(hook_name: str) -> int:
    """``blocks.{L}.hook_resid_post`` -> L."""
    parts = hook_name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post":
        raise ValueError(f"expected blocks.L.hook_resid_post, got {hook_name!r}")
    return int(parts[1])


@torch.no_grad()
def residuals(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Residual stream after block L (TransformerLens ``blocks.L.hook_resid_post``) for each
    layer, at non-padding positions only: ``{L: (n_tokens, d_model)}``."""
    blocks = model.transformer.h
    store: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    keep = attention_mask.bool()

    def hook(L):
        def fn(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            store[L].append(h[keep].detach())

        return fn

    handles = [blocks[L].register_forward_hook(hook(L)) for L in layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return {L: torch.cat(v) for L, v in store.items()}


def sae_eval_tokens(tokenizer, n_docs: int = N_SAE_DOCS, seed: int = EVAL_SEED):
    """The held-out documents used for SAE statistics, tokenized: ``(input_ids, mask)``."""
    docs = corpus.documents(n_docs, seed)
    return _encode(tokenizer, docs)


@torch.no_grad()
def sae_stats(
    model, tokenizer, saes: Mapping[str, torch.nn.Module], n_docs: int = N_SAE_DOCS,
    seed: int = EVAL_SEED,
) -> dict[str, dict]:
    """Explained variance, L0, dead fraction and relative MSE of each SAE on held-out documents.

    explained variance = 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2 over all non-pad tokens;
    dead fraction = share of features that never fire on those tokens.
    """
    ids, mask = sae_eval_tokens(tokenizer, n_docs, seed)
    layers = [resid_post_layer(h) for h in saes]
    res = residuals(model, ids, mask, layers)
    out = {}
    for hook_name, sae in saes.items():
        x = res[resid_post_layer(hook_name)].float()
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        err = (x - x_hat).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum()
        active = feats > 0
        out[hook_name] = {
            "explained_variance": (1 - err / var).item(),
            "l0": active.float().sum(1).mean().item(),
            "dead_fraction": (~active.any(0)).float().mean().item(),
            "relative_mse": (err / x.pow(2).sum()).item(),
            "n_tokens": int(x.shape[0]),
        }
    return out
