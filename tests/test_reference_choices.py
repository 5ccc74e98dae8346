"""The reference protocol's choices on the toy world and on constructed cases: one shared IOI delta,
relative budgets, reactivation within the eligible pairs, the unweighted TPP mean, SAEBench's
probe trainer and TPP metric."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import SAE
from saerecover import toy
from saerecover.core.clamp import Clamp
from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.metrics import SiteFeatures, example_metrics, residual_scales
from saerecover.core.selection import select_by_attribution
from saerecover.core.shared import optimise_shared
from saerecover.core.sites import load_site
from saerecover.experiments.pipeline import recover
from saerecover.experiments.tpp import class_mean
from saerecover.runs.stats import summarize
from saerecover.tasks import probes as pr
from saerecover.tasks.tpp import tpp_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = toy.DEMO_OPTIONS["hook"]


@pytest.fixture(scope="module")
def toy_ioi():
    """The toy world's IOI at the demo's site: 48 prompts, the top-16 features clamped to -5."""
    world = toy.load()
    site = world.site(HOOK)
    task = world.ioi_task(n=48, seed=0)
    feats = select_by_attribution(world.model, site, task, task.examples(), top_k=16)
    return world, site, task, Clamp({site: feats}, value=-5.0, where="active")


# ----------------------------------------------------------------------------------------------
# one delta shared by all IOI prompts


@pytest.fixture(scope="module")
def shared_run(toy_ioi):
    world, _, task, clamp = toy_ioi
    return recover(world.model, clamp, task, projection=["none", "encoder"], steps=15, budget=5.0, progress=False,
                   report=False, protocol="reference")


def test_reference_protocol_shares_one_delta(shared_run):
    """protocol="reference" on an IOI task: one vector for every prompt, at each prompt's answer
    row, within the budget; encoder mode keeps it in the null space (C1) to round-off."""
    s = shared_run.summary
    assert s["protocol"] == "reference" and s["delta"] == {"shared": True, "n_optimised": 48}
    for mode in ("none", "encoder"):
        outs = shared_run.outcomes[mode]
        assert len(outs) == s["n_valid"] > 0
        first = outs[0].tensors["delta"]
        assert first.shape == (1, first.shape[1])  # one row: the answer position
        for oc in outs:
            assert torch.equal(oc.tensors["delta"], first)  # the same vector for every prompt
            assert oc.steps == 15 and len(oc.history) == 15 and oc.metrics["budget"] == 5.0
        assert float(first.norm()) <= 5.0 * (1 + 1e-5)
    assert s["modes"]["encoder"]["c1_residual_max"] <= 1e-5
    assert s["modes"]["encoder"]["activation_drift_mean"] <= 1e-4
    assert not torch.equal(shared_run.outcomes["none"][0].tensors["delta"],
                           shared_run.outcomes["encoder"][0].tensors["delta"])


def test_shared_delta_optimises_the_mean_over_all_prompts(toy_ioi):
    """The shared delta's objective is the mean loss over all prompts (valid flips or not), so
    the chunk size does not change it; the mean logit difference rises."""
    world, _, task, clamp = toy_ioi
    defended = DefendedModel(world.model, clamp)
    cfg = RecoveryConfig(steps=6, budget=5.0, shared_delta=True)
    a = optimise_shared(defended, task, task.examples(), mode="none", cfg=cfg, batch_size=48)
    b = optimise_shared(defended, task, task.examples(), mode="none", cfg=cfg, batch_size=7)
    assert a.n == 48 and len(a.history) == 6
    assert torch.allclose(a.delta, b.delta, atol=1e-5)
    assert a.history[-1]["score"] > a.history[0]["score"]
    with pytest.raises(ValueError, match="per-row projection modes .* not 'jacobian'"):
        optimise_shared(defended, task, task.examples(), mode="jacobian", cfg=cfg)


def test_shared_delta_refuses_per_example_options():
    with pytest.raises(ValueError, match="shared_delta .* does not combine with early_stop, max_drift"):
        RecoveryConfig(shared_delta=True, early_stop=True, max_drift=0.03).validate()


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def test_reference_ioi_prompts_are_easy_transformers_draws():
    """IOI.reference draws what Easy-Transformer's gen_prompt_uniform draws after random.seed(0)
    with its first BABA template (prompts 0 and 63 below, computed with its own code at
    redwoodresearch/Easy-Transformer@ea15315); the prompt stops before the IO name."""
    from saerecover.tasks import ioi

    words = ("Then , and went to the . gave a".split() + list(ioi.REFERENCE_NAMES) + list(ioi.REFERENCE_PLACES)
             + list(ioi.REFERENCE_OBJECTS))
    task = ioi.IOI.reference(_word_tokenizer(words), n=64, seed=0)
    meta = task.examples().meta
    assert meta[0] == {"prompt": "Then, Benjamin and Bradley went to the hospital. Benjamin gave a snack to",
                       "io": "Bradley", "s": "Benjamin", "pattern": "BABA"}
    assert (meta[1]["io"], meta[1]["s"], meta[2]["io"]) == ("Kyle", "Patrick", "Jason")
    assert meta[63]["prompt"] == "Then, Eric and Jeffrey went to the restaurant. Eric gave a drink to"
    assert task.describe()["sampler"] == "reference" and len(ioi.REFERENCE_NAMES) == 99
    with pytest.raises(ValueError, match="every name to be one token"):
        ioi.IOI.reference(_word_tokenizer([w for w in words if w != "Samuel"]), n=4)
    with pytest.raises(ValueError, match="BABA only"):
        ioi.IOI(_word_tokenizer(words), sampler="reference", patterns=("ABBA",))


# ----------------------------------------------------------------------------------------------
# relative budgets


def test_residual_scale_ignores_attention_sinks():
    """sqrt(R) x the (lower) median row norm: a sink row 100x the others does not inflate it."""
    h = torch.zeros(1, 4, 3)
    h[0, 0, 0] = 100.0
    h[0, 1:, 1] = 1.0
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert residual_scales([h], mask).tolist() == [2.0]  # median 1, sqrt(4) = 2 (Frobenius: 100.015)
    mask[0, 0] = False
    assert residual_scales([h], mask).tolist() == pytest.approx([math.sqrt(3)])
    one = torch.tensor([[[3.0, 4.0]]])
    assert residual_scales([one], torch.ones(1, 1, dtype=torch.bool)).tolist() == [5.0]  # one row: its norm


def test_relative_budget_is_a_share_of_each_residual(toy_ioi):
    world, _, task, clamp = toy_ioi
    run = recover(world.model, clamp, task, projection="encoder", steps=10, budget_rel=0.1, progress=False,
                  report=False)
    outs = run.outcomes["encoder"]
    assert outs
    for oc in outs:
        scale = float(oc.tensors["h_def"].norm())  # one row (the answer position): the scale is its norm
        assert oc.metrics["budget"] == pytest.approx(0.1 * scale, rel=1e-5)
        assert oc.metrics["relative_budget"] == pytest.approx(0.1, rel=1e-5)
        assert oc.metrics["delta_norm"] <= oc.metrics["budget"] * (1 + 1e-5)
    assert run.summary["modes"]["encoder"]["relative_budget_mean"] == pytest.approx(0.1, rel=1e-5)


def test_budget_flag_takes_a_relative_value():
    from saerecover.cli.checks import budget_arg, split_budget

    assert budget_arg("0.25x") == "0.25x" and budget_arg("5") == 5.0
    assert split_budget({"budget": "0.25x", "lr": 0.1}) == {"budget_rel": 0.25, "lr": 0.1}
    assert split_budget({"budget": 5.0}) == {"budget": 5.0}
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="a number followed by x"):
        budget_arg("big")


# ----------------------------------------------------------------------------------------------
# reactivation: all pairs and the eligible pairs


@pytest.fixture(scope="module")
def small_site():
    torch.manual_seed(0)
    sae = SAE.from_dict({"architecture": "standard", "d_in": 6, "d_sae": 4, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": False, "normalize_activations": "none",
                         "metadata": {"hook_name": "blocks.0.hook_resid_post"}})
    return load_site(sae, hook_name="blocks.0.hook_resid_post")


def _metrics(site, z_def, z_rec, recovered=True):
    feats = SiteFeatures(z_def=torch.tensor(z_def), z_rec=torch.tensor(z_rec))
    d = torch.ones(len(z_def), 6)
    return example_metrics(site=site, features=torch.arange(4), feats=feats, delta_rows=d, h_def_rows=d,
                           a=site.encoder_columns(torch.arange(4)), recovered=recovered)


def test_reactivation_within_eligible_pairs(small_site):
    """Eligible = z_def <= 0: row 0 has features 0, 1, 3, row 1 features 0, 2, 3 (6 of 8 pairs).
    Reactivated = eligible and z_rec > 0: (row 0, f0) and (row 1, f2); (row 0, f2) rises from 2 to
    5 but was not silenced. All pairs: 2/8; eligible pairs (the paper's): 2/6."""
    m = _metrics(small_site, [[0.0, 0.0, 2.0, -1.0], [0.0, 3.0, 0.0, 0.0]],
                 [[0.5, 0.0, 5.0, 0.0], [0.0, 0.0, 0.1, 0.0]])
    assert m["reactivated_fraction"] == 0.25
    assert m["reactivated_fraction_eligible"] == pytest.approx(1 / 3)
    assert m["zero_reactivation"] is False
    # a feature the clamp left above 0 that rises further is not a reactivation (the reference
    # code's reading of "max_i z_i(h_rec) <= eta"): zero reactivation holds
    m = _metrics(small_site, [[2.0, 0.0, 0.0, 0.0]], [[5.0, 0.0, 0.0, 0.0]])
    assert (m["reactivated_fraction"], m["reactivated_fraction_eligible"], m["zero_reactivation"]) == (0.0, 0.0, True)
    # no eligible pair: the fraction is 0 (the reference divides by max(eligible, 1))
    m = _metrics(small_site, [[1.0, 1.0, 1.0, 1.0]], [[2.0, 2.0, 2.0, 2.0]])
    assert m["reactivated_fraction_eligible"] == 0.0
    # not recovered: never a zero-reactivation recovery
    assert _metrics(small_site, [[0.0] * 4], [[0.0] * 4], recovered=False)["zero_reactivation"] is False


def test_summary_averages_the_per_example_eligible_fraction():
    """The paper's 0.016 is the mean over valid examples of each one's within-eligible fraction
    (not a pooled ratio): (1/3 + 0 + 1/2) / 3 = 5/18; an invalid example does not count."""
    recs = [{"example_id": f"e{i}", "mode": "encoder", "valid": True, "recovered": True,
             "reactivated_fraction_eligible": v} for i, v in enumerate([1 / 3, 0.0, 0.5])]
    recs.append({"example_id": "e9", "mode": "encoder", "valid": False, "recovered": None})
    s = summarize(recs, task="t")["modes"]["encoder"]
    assert s["reactivated_fraction_eligible_mean"] == pytest.approx(5 / 18)
    assert s["reactivated_fraction_eligible_n"] == 3


# ----------------------------------------------------------------------------------------------
# TPP: the unweighted mean over target classes, SAEBench's metric and probe trainer


def test_class_mean_weighs_every_class_alike():
    """Class a: 2/2 recovered, class b: 4/8, class c: no valid flip. Unweighted mean 0.75 over
    the 2 classes with flips; pooled would be 6/10 = 0.6."""
    per_class = {
        "a": {"modes": {"none": {"n_valid": 2, "recovered": 2, "recovery_rate": 1.0, "activation_drift_mean": 0.2,
                                 "c1_residual_max": 0.1}}},
        "b": {"modes": {"none": {"n_valid": 8, "recovered": 4, "recovery_rate": 0.5, "activation_drift_mean": 0.4,
                                 "c1_residual_max": 0.3}}},
        "c": {"modes": {"none": {"n_valid": 0, "recovered": 0, "recovery_rate": None,
                                 "activation_drift_mean": None, "c1_residual_max": None}}},
    }
    row = class_mean(per_class, ["none"])["none"]
    assert (row["n_classes"], row["n_valid"], row["recovered"]) == (2, 10, 6)
    assert row["recovery_rate"] == 0.75 and row["activation_drift_mean"] == pytest.approx(0.3)
    assert row["c1_residual_max"] == 0.3 and row["zero_reactivation_rate"] is None


def test_tpp_metric_is_intended_minus_mean_unintended():
    """SAEBench's create_tpp_plotting_dict: ablating a's latents drops probe a by 0.4 and probes
    b, c by 0.1 and 0.0: 0.4 - 0.05 = 0.35; ablating b's: 0.2 - (0.0 + 0.1) / 2 = 0.15."""
    clean = {"a": 0.9, "b": 0.8, "c": 0.7}
    ablated = {"a": {"a": 0.5, "b": 0.7, "c": 0.7}, "b": {"a": 0.9, "b": 0.6, "c": 0.6}}
    out = tpp_scores(clean, ablated)
    assert out["per_class"]["a"]["total"] == pytest.approx(0.35)
    assert out["per_class"]["b"]["total"] == pytest.approx(0.15)
    assert out["mean"] == pytest.approx(0.25) and out["mean_intended"] == pytest.approx(0.3)


def test_saebench_negatives_come_in_equal_shares():
    """P = 8 positives, 3 other classes of 10: ceil(8/3) = 3 drawn from each, 8 of the 9 kept, so
    every other class gives 2 or 3."""
    labels = ["a"] * 8 + ["b"] * 10 + ["c"] * 10 + ["d"] * 10
    for seed in range(5):
        idx, y = pr.saebench_binary(labels, "a", torch.Generator().manual_seed(seed))
        assert sorted(i for i, t in zip(idx, y.tolist()) if t == 1) == list(range(8))
        neg = [labels[i] for i, t in zip(idx, y.tolist()) if t == 0]
        assert len(neg) == 8 and all(neg.count(c) in (2, 3) for c in "bcd")
    (i1, y1), (i2, y2) = pr.binary_set(labels, "a", 3, "saebench"), pr.binary_set(labels, "a", 3, "saebench")
    assert i1 == i2 and torch.equal(y1, y2)  # seeded


def test_saebench_trainer_keeps_the_best_test_epoch():
    """The epoch kept has the best test accuracy of all epochs (the first one reaching it), and
    training for exactly that many epochs gives the same weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    y = (x[:, 0] + 0.8 * torch.randn(40, generator=g) > 0).float()
    xt = torch.randn(30, 8, generator=g)
    yt = (xt[:, 0] + 0.8 * torch.randn(30, generator=g) > 0).float()
    w, b, epoch, acc = pr.train_probe_saebench(x, y, xt, yt, epochs=8, lr=1e-2, batch_size=8, seed=3)
    per_epoch = [pr.train_probe_saebench(x, y, xt, yt, epochs=e, lr=1e-2, batch_size=8, seed=3) for e in range(1, 9)]
    accs = [float((((xt @ p[0] + p[1]) > 0).float() == yt).float().mean()) for p in per_epoch]
    assert acc == max(accs) and epoch == accs.index(max(accs)) + 1
    assert torch.equal(w, per_epoch[epoch - 1][0]) and per_epoch[epoch - 1][2] == epoch
    w0, b0, _, _ = pr.train_probe_saebench(x, y, xt, yt, epochs=0, seed=3)  # nn.Linear's init
    assert 0 < float(w0.abs().max()) <= 1 / math.sqrt(8) and abs(b0) <= 1 / math.sqrt(8)
    decayed = pr.train_probe_saebench(x, y, xt, yt, epochs=3, lr=1e-2, batch_size=8, seed=3, weight_decay=0.0)[0]
    assert not torch.equal(decayed, pr.train_probe_saebench(x, y, xt, yt, epochs=3, lr=1e-2, batch_size=8,
                                                            seed=3)[0])


# ----------------------------------------------------------------------------------------------
# the commands under --protocol reference, end to end on the toy world


def test_cli_run_ioi_reference_on_the_toy_world(tmp_path):
    import json

    from saerecover.cli import main

    out = tmp_path / "ioi"
    assert main(["run", "ioi", "--toy", "--protocol", "reference", "--n", "24", "--steps", "5", "--quiet",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == {"name": "reference", "choices": {"shared_delta": True, "ioi_prompts": "toy"}}
    assert config["recovery"]["shared_delta"] is True and config["recovery"]["budget_rel"] == 0.25
    summary = json.loads((out / "summary.json").read_text())
    assert summary["delta"] == {"shared": True, "n_optimised": 24} and summary["protocol"] == "reference"
    assert "one vector shared by all 24 examples" in (out / "report.md").read_text()
    assert main(["run", "ioi", "--toy", "--ioi-prompts", "reference", "--out", str(tmp_path / "x")]) == 2


def test_cli_run_tpp_reference_on_the_toy_world(tmp_path):
    import json

    from saerecover.cli import main

    out = tmp_path / "tpp"
    assert main(["run", "tpp", "--toy", "--protocol", "reference", "--n-train", "12", "--n-test", "8",
                 "--classes", "sports", "--steps", "5", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "reference" and summary["top_n"] == 16  # the toy preset's size
    assert summary["probes"]["trainer"] == "saebench" and set(summary["probes"]["epoch_kept"]) == set(
        summary["probes"]["classes"])
    assert summary["class_mean"]["none"]["n_classes"] in (0, 1)
    metric = summary["tpp_metric"]
    assert set(metric["per_class"]) == {"sports"} and metric["mean"] == metric["per_class"]["sports"]["total"]
    assert set(metric["clean_accuracy"]) == set(summary["probes"]["classes"])
    member = json.loads((out / "class-sports" / "config.json").read_text())
    assert member["protocol"]["choices"] == {"top_n": 16, "probe_trainer": "saebench"}
    assert "SAEBench's TPP metric" in (out / "report.md").read_text()
