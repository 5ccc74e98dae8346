"""Hand-made pieces for the exact-value tests (tests/test_exact_*.py): an SAE site whose weights
are chosen by hand, a linear stand-in for a ModelAdapter, a word-level tokenizer stand-in, and a
token-margin task. Everything is small enough that the expected numbers can be worked out by
hand in each test's comment; nothing here downloads or trains anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from sae_lens import SAE
from saerecover.core.examples import Examples, answer_logits
from saerecover.core.sites import Site


def hand_site(w_enc: Sequence[Sequence[float]], w_dec: Sequence[Sequence[float]] | None = None, *,
              hook: str = "blocks.0.hook_resid_post", b_enc: Sequence[float] | None = None) -> Site:
    """A standard (ReLU) SAE site with the given weights: E(h) = relu(h @ W_enc + b_enc),
    D(z) = z @ W_dec; b_dec = 0. w_enc: (d_in, d_sae); w_dec: (d_sae, d_in), default W_enc^T."""
    w_enc_t = torch.tensor(w_enc, dtype=torch.float32)
    d_in, d_sae = w_enc_t.shape
    sae = SAE.from_dict({"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
                         "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                         "metadata": {"hook_name": hook}})
    with torch.no_grad():
        sae.W_enc.copy_(w_enc_t)
        sae.W_dec.copy_(torch.tensor(w_dec, dtype=torch.float32) if w_dec is not None else w_enc_t.T)
        sae.b_enc.copy_(torch.tensor(b_enc, dtype=torch.float32) if b_enc is not None else torch.zeros(d_sae))
        sae.b_dec.zero_()
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return Site(hook_name=hook, sae=sae)


class LinearModel:
    """A ModelAdapter stand-in: h = embed[input_ids]; per layer L, the edit at
    ``blocks.L.hook_resid_pre``, h = h @ mix[L], the edit at ``blocks.L.hook_resid_post``;
    logits = h @ unembed. Every number it produces is a linear function of the weights given."""

    backend = "stub"

    def __init__(self, embed: torch.Tensor, unembed: torch.Tensor, mix: Sequence[torch.Tensor] | None = None,
                 tokenizer: object = None) -> None:
        self.embed = torch.as_tensor(embed, dtype=torch.float32)
        self.unembed = torch.as_tensor(unembed, dtype=torch.float32)
        d = self.embed.shape[1]
        self.mix = [torch.as_tensor(m, dtype=torch.float32) for m in (mix if mix is not None else [torch.eye(d)])]
        self.n_layers = len(self.mix)
        self.d_model = d
        self.tokenizer = tokenizer
        self.model = torch.nn.Module()
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def site_names(self) -> list[str]:
        return [f"blocks.{L}.hook_resid_{k}" for L in range(self.n_layers) for k in ("pre", "post")]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                edits: Mapping | None = None, capture: tuple[str, ...] = ()):
        self.calls += 1
        edits = dict(edits or {})
        captured: dict[str, torch.Tensor] = {}
        h = self.embed[input_ids]
        for L, m in enumerate(self.mix):
            for kind in ("pre", "post"):
                name = f"blocks.{L}.hook_resid_{kind}"
                if kind == "post":
                    h = h @ m
                if name in edits:
                    h = edits[name](h)
                if name in capture:
                    captured[name] = h
        return h @ self.unembed, captured

    __call__ = forward


class WordTokenizer:
    """A tokenizer stand-in: whitespace words, ids given by first appearance (0 is padding,
    1 a special token put first when ``add_special_tokens``)."""

    pad_token_id = 0
    eos_token_id = 0
    unk_token_id = None
    chat_template = None
    all_special_ids = [0, 1]

    def __init__(self, words: Sequence[str] = ()) -> None:
        self.vocab: dict[str, int] = {}
        for w in words:
            self.id(w)

    def id(self, word: str) -> int:
        return self.vocab.setdefault(word, len(self.vocab) + 2)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [self.id(w) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def __len__(self) -> int:
        return len(self.vocab) + 2


class TokenMargin:
    """Behavior: logit(a) - logit(b) at the answer position; loss = minus that."""

    name = "margin"

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b

    def score(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        last = answer_logits(logits, ex).float()
        return last[:, self.a] - last[:, self.b]

    def loss(self, logits: torch.Tensor, ex: Examples) -> torch.Tensor:
        return -self.score(logits, ex)

    def describe(self) -> dict:
        return {"name": self.name, "a": self.a, "b": self.b}


def examples(input_ids: Sequence[Sequence[int]], answer_pos: Sequence[int] | None = None,
             mask: Sequence[Sequence[int]] | None = None, **targets: torch.Tensor) -> Examples:
    """Examples from token lists of equal length (mask all ones unless given)."""
    ids = torch.tensor(input_ids, dtype=torch.long)
    m = torch.tensor(mask, dtype=torch.long) if mask is not None else torch.ones_like(ids)
    pos = torch.tensor(answer_pos, dtype=torch.long) if answer_pos is not None else m.sum(1) - 1
    ex = Examples(input_ids=ids, attention_mask=m, answer_pos=pos, ids=[f"ex-{i}" for i in range(len(ids))],
                  targets=dict(targets))
    ex.validate()
    return ex


class Scored:
    """A generation-judged task's score and loss without its judge (no generation): recovery only."""

    name = "scored"

    def __init__(self, task):
        self.task = task

    def score(self, logits, ex):
        return self.task.score(logits, ex)

    def loss(self, logits, ex):
        return self.task.loss(logits, ex)

    def describe(self):
        return {}
