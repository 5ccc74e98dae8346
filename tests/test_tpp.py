"""TPP (SAEBench targeted probe perturbation): the pieces on a tiny model, and the whole protocol
end to end on the shipped toy world's topic sentences."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE
from saerecover import toy
from saerecover.core.sites import load_site
from saerecover.data.text_classes import load_amazon_reviews, load_bias_in_bios, load_text_classes, toy_topics
from saerecover.experiments.tpp import run_tpp
from saerecover.models import load_model
from saerecover.tasks import tpp
from saerecover.tasks.probes import train_probe
from saerecover.testing import tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_gpt2(tmp_path_factory.mktemp("models"), n_layers=2, d_model=32)
    model = load_model(str(path))
    torch.manual_seed(0)
    sae = SAE.from_dict({"architecture": "standard", "d_in": 32, "d_sae": 96, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": True, "normalize_activations": "none",
                         "metadata": {"hook_name": HOOK}})
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    return model, load_site(sae, hook_name=HOOK, model=model)


def test_probed_model_reads_the_site_and_pools_like_the_probe(tiny):
    model, site = tiny
    tok = model.tokenizer
    ids, mask = tpp.tokenize(tok, ["the cat saw a dog", "a red car"])
    w = torch.randn(2, model.d_model)
    probes = tpp.Probes(classes=["x", "y"], weight=w, bias=torch.tensor([0.5, -0.25]))
    probed = tpp.ProbedModel(model, HOOK, probes)
    logits, _ = probed.forward(ids, mask)
    assert logits.shape == (2, ids.shape[1], 2)
    _, cap = model.forward(ids, mask, capture=(HOOK,))  # the full forward pass, no early stop
    pm = tpp.pool_mask(ids, mask, tpp.special_ids(tok))
    want = tpp.masked_mean(cap[HOOK].float(), pm) @ w.T + probes.bias
    task = tpp.make_task(tok, ["the cat saw a dog", "a red car"], "y", probes)
    got = task.score(logits, task.examples())
    assert torch.allclose(got, want[:, 1], atol=1e-5)
    # an edit at the site reaches the probe
    shift = torch.zeros_like(cap[HOOK])
    shift[..., :] = w[1] / w[1].norm()
    logits2, _ = probed.forward(ids, mask, edits={HOOK: lambda h: h + shift})
    assert bool((task.score(logits2, task.examples()) > got).all())


def test_latent_scores_follow_saebench(tiny):
    _, site = tiny
    z_pos, z_neg, w = torch.rand(96), torch.rand(96), torch.randn(32)
    scores = tpp.latent_scores(site, z_pos, z_neg, w)
    want = (z_pos - z_neg).clamp(min=0) * (site.sae.W_dec.detach() @ w)
    assert torch.allclose(scores, want, atol=1e-6)
    top = tpp.top_latents(scores, 5)
    assert top.tolist() == sorted(torch.topk(want, 5).indices.tolist())
    with pytest.raises(ValueError, match="non-zero"):
        tpp.top_latents(torch.zeros(96), 3)


def test_probe_training_is_seeded_and_separates():
    torch.manual_seed(0)
    x = torch.randn(80, 6)
    y = (x[:, 0] > 0).float()
    w1, b1 = train_probe(x, y, epochs=10, lr=0.05, seed=3)
    w2, b2 = train_probe(x, y, epochs=10, lr=0.05, seed=3)
    assert torch.equal(w1, w2) and b1 == b2
    assert float((((x @ w1 + b1) > 0).float() == y).float().mean()) > 0.9


def test_local_loaders(tmp_path):
    rows = [{"text": f"text {i} of {c}", "label": c, "split": "test" if i % 4 == 0 else "train"}
            for c in ("a", "b", "c") for i in range(12)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_text_classes(tmp_path / "d.jsonl", classes=["a", "b"])
    assert data.classes == ["a", "b"] and len(data.train["a"]) == 9 and len(data.test["b"]) == 3
    with open(tmp_path / "bios.csv", "w") as f:
        f.write("hard_text,profession\n" + "".join(f"bio {i},{i % 3}\n" for i in range(30)))
    bios = load_bias_in_bios(tmp_path / "bios.csv", classes=["0", "2"], n_train=5, n_test=2, seed=1)
    assert bios.classes == ["0", "2"] and len(bios.train["0"]) == 5 and len(bios.test["2"]) == 2
    assert bios.describe()["source"].endswith("bios.csv")
    with open(tmp_path / "amz.csv", "w") as f:
        f.write("text,category\n" + "".join(f"review {i},{i % 2 + 1}\n" for i in range(20)))
    amz = load_amazon_reviews(tmp_path / "amz.csv", classes=["1", "2"], n_train=4, n_test=2)
    assert amz.classes == ["1", "2"]
    with pytest.raises(ValueError, match="not found"):
        load_text_classes(tmp_path / "d.jsonl", classes=["zzz"])
    with pytest.raises(ValueError, match="no column"):
        load_text_classes(tmp_path / "d.jsonl", label_column="profession")


# ----------------------------------------------------------------------------------------------
# the toy world, end to end


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from saerecover.cli.options import TOY_TPP

    world = toy.load()
    site = world.site(TOY_TPP["hook"])
    data = toy_topics(n_train=40, n_test=10, seed=0)
    out = tmp_path_factory.mktemp("tpp") / "toy-tpp"
    res = run_tpp(world.model, site, data, out=out, classes=["sports", "music"], top_n=TOY_TPP["top_n"],
                      probe={"lr": TOY_TPP["probe_lr"]}, steps=30, budget=TOY_TPP["budget"], report=False)
    return res


def test_toy_tpp_has_valid_flips_and_exact_encoder_mode(toy_run):
    s = toy_run.summary
    assert s["n_valid"] > 0
    assert set(s["per_class"]) == {"sports", "music"}
    assert all(acc >= 0.9 for acc in s["probes"]["test_accuracy"].values())
    enc, none = s["modes"]["encoder"], s["modes"]["none"]
    assert enc["c1_residual_max"] <= 1e-5
    assert enc["activation_drift_mean"] <= 1e-4
    assert enc["reactivated_fraction_mean"] == 0
    assert none["recovered"] >= 1
    lo, hi = enc["recovery_rate_ci95"]
    assert lo <= enc["recovery_rate"] <= hi


def test_toy_tpp_writes_per_class_runs_and_tables(toy_run):
    root = toy_run.path
    summary = json.loads((root / "summary.json").read_text())
    assert summary["collection"] == "tpp"
    for c, info in summary["per_class"].items():
        run = root / info["run_dir"]
        assert (run / "summary.json").is_file() and (run / "records.jsonl").is_file()
        assert info["clean_positive_rate"] >= info["ablated_positive_rate"]
    report = (root / "report.md").read_text()
    assert "all (pooled)" in report and "zero-reactivation" in report
    page = (root / "report.html").read_text()  # the same tables, in the self-contained page
    assert "<td>all (pooled)</td>" in page and "<h2>Probes and the clamp</h2>" in page
    assert (root / "probes.safetensors").is_file()
    table = toy_run.table()
    # header, rule, 2 classes x 2 modes, 2 class-mean rows, 2 pooled rows
    assert table.count("\n") == 2 + 2 * 2 + 2 + 2 - 1
    assert table.count("| mean of 2 classes") == 2 and table.count("| all (pooled)") == 2


def test_cli_run_tpp_on_the_toy_world(tmp_path, capsys):
    from saerecover.cli import main

    rc = main(["run", "tpp", "--toy", "--classes", "food", "--n-train", "20", "--n-test", "6", "--steps", "10",
               "--quiet", "--out", str(tmp_path / "t")])
    assert rc == 0
    assert "all (pooled)" in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["classes"] == ["food"]
    report = (tmp_path / "t" / "report.md").read_text()
    (tmp_path / "t" / "report.md").unlink()
    assert main(["report", str(tmp_path / "t")]) == 0  # the combined report, regenerated
    assert (tmp_path / "t" / "report.md").read_text() == report and "all (pooled)" in capsys.readouterr().out
    assert main(["run", "tpp", "--toy", "--classes", "cooking", "--out", str(tmp_path / "u")]) == 2
    assert main(["run", "tpp", "--out", str(tmp_path / "v")]) == 2  # no model, no --toy
    assert "--model and --sae" in capsys.readouterr().err
