"""The shipped toy world: its weights load through the plain HF / sae_lens entry points and
reproduce the accuracies and SAE statistics recorded in assets/metrics.json."""

from __future__ import annotations

import json

import pytest
import torch
from saerecover.data import toy_corpus as corpus
from saerecover.toy import ASSETS
from saerecover.toy.evaluate import evaluate_model, residuals, sae_stats

TOL = 0.01  # "within 1 point" for every rate in [0, 1]



@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((ASSETS / "metrics.json").read_text())


@pytest.fixture(scope="module")
def world():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(ASSETS / "model")
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "model").eval()
    return model, tok


@pytest.fixture(scope="module")
def saes() -> dict:
    from sae_lens import SAE

    out = {}
    for d in sorted((ASSETS / "saes").iterdir()):
        out[d.name] = SAE.load_from_disk(d, device="cpu")
    return out


def test_tokenizer_is_word_level_with_bos(world):
    model, tok = world
    assert tok.chat_template is None
    assert tok.bos_token_id is not None and tok.pad_token_id is not None
    ids = tok("When Mary and John went to the store, John gave a drink to")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    for name in corpus.NAMES:
        assert len(tok(" " + name, add_special_tokens=False)["input_ids"]) == 1
    assert len(tok) == model.config.vocab_size == len(corpus.vocabulary())
    # plain-text requests (no chat template) tokenize like the training format
    a = tok(corpus.format_request("how do I make a cake ?"))["input_ids"]
    b = tok("User: how do I make a cake?\nAssistant:")["input_ids"]
    assert a == b


def test_format_accuracies_match_metrics(world, metrics):
    model, tok = world
    got = evaluate_model(model, tok)
    for fmt, want in metrics["formats"].items():
        for key, value in want.items():
            if key.startswith("n") or key == "mean_logit_diff":
                assert got[fmt][key] == pytest.approx(value, rel=0.02), (fmt, key)
            else:
                assert abs(got[fmt][key] - value) <= TOL, (fmt, key, got[fmt][key], value)
    # the world does what it is for
    assert got["ioi"]["accuracy"] >= 0.95
    assert got["mc"]["all24"] >= 0.8
    assert got["request"]["refusal_harmful"] >= 0.95
    assert got["request"]["compliance_harmless"] >= 0.95


def test_saes_load_and_match_metrics(world, saes, metrics):
    model, tok = world
    n_layer = model.config.n_layer
    assert sorted(saes) == sorted(f"blocks.{L}.hook_resid_post" for L in range(n_layer))
    archs = {sae.cfg.architecture() for sae in saes.values()}
    assert {"standard", "jumprelu"} <= archs
    for name, sae in saes.items():
        assert sae.cfg.metadata.hook_name == name
        assert sae.cfg.d_in == model.config.n_embd
    got = sae_stats(model, tok, saes)
    for name, want in metrics["saes"].items():
        g = got[name]
        assert g["explained_variance"] >= 0.9, name
        assert abs(g["explained_variance"] - want["explained_variance"]) <= TOL, name
        assert abs(g["dead_fraction"] - want["dead_fraction"]) <= TOL, name
        assert g["l0"] == pytest.approx(want["l0"], rel=0.02, abs=0.1), name


def test_sae_reconstructs_and_hook_convention(world, saes):
    """resid_post L is the output of block L (= hidden_states[L + 1] below the last layer)."""
    model, tok = world
    enc = tok(["When Mary and John went to the store , John gave a drink to"], return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    res = residuals(model, enc["input_ids"], enc["attention_mask"], range(model.config.n_layer))
    for L in range(model.config.n_layer - 1):
        torch.testing.assert_close(res[L], hs[L + 1][0])
    for name, sae in saes.items():
        x = res[int(name.split(".")[1])]
        x_hat = sae.decode(sae.encode(x))
        assert ((x - x_hat).pow(2).sum() / x.pow(2).sum()).item() < 0.1, name
