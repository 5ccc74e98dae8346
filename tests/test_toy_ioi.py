"""Toy IOI end to end: the demo's setting (reduced), the CLI on local directories, both backends."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

from saerecover import cli, toy

N, STEPS = 64, 12


def summary_of(path):
    return json.loads((path / "summary.json").read_text())


@pytest.mark.parametrize("backend", ["hf", "tlens"])
def test_cli_run_ioi_on_local_toy_dirs(tmp_path, backend):
    opts = toy.DEMO_OPTIONS
    out = tmp_path / f"run-{backend}"
    code = cli.main(["run", "ioi", "--model", opts["model"], "--sae", opts["sae"], "--backend", backend,
                     "--n", str(N), "--patterns", "BABA,ABBA", "--top-k", "16", "--clamp-value", "-5",
                     "--clamp-where", "active", "--steps", str(STEPS), "--out", str(out), "--quiet"])
    assert code == 0
    summary = summary_of(out)
    assert summary["n_valid"] >= 8
    enc = summary["modes"]["encoder"]
    assert enc["c1_residual_max"] <= 1e-5
    assert enc["activation_drift_mean"] <= 1e-4
    assert summary["modes"]["none"]["activation_drift_mean"] > 1e-3
    assert (out / "report.md").exists()
    assert cli.main(["analyze", str(out)]) == 0


def test_hf_and_tlens_backends_find_the_same_flips(tmp_path):
    runs = {}
    for backend in ("hf", "tlens"):
        out = tmp_path / backend
        cli.main(["run", "ioi", "--model", toy.DEMO_OPTIONS["model"], "--sae", toy.DEMO_OPTIONS["sae"],
                  "--backend", backend, "--n", "48", "--steps", "5", "--top-k", "16", "--modes", "none",
                  "--out", str(out), "--quiet"])
        runs[backend] = {json.loads(line)["example_id"]: json.loads(line)
                         for line in (out / "records.jsonl").read_text().splitlines()}
    assert runs["hf"].keys() == runs["tlens"].keys()
    for eid, rec in runs["hf"].items():
        assert rec["valid"] == runs["tlens"][eid]["valid"]
        assert rec["base_score"] == pytest.approx(runs["tlens"][eid]["base_score"], abs=1e-3)


def test_topk_sae_site(tmp_path):
    """A TopK SAE at the demo's site: the run completes and C1 holds (drift may be nonzero:
    other features can push a clamped one out of the top k)."""
    world = toy.load()
    site = world.site(toy.DEMO_OPTIONS["hook"])
    torch.manual_seed(0)
    topk = SAE.from_dict({"architecture": "topk", "k": 16, "d_in": site.d_in, "d_sae": site.d_sae,
                          "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                          "normalize_activations": "none", "metadata": {"hook_name": site.hook_name}})
    topk.load_state_dict({k: v for k, v in site.sae.state_dict().items() if k in topk.state_dict()}, strict=False)
    topk.save_model(tmp_path / "topk")
    out = tmp_path / "run"
    code = cli.main(["run", "ioi", "--model", toy.DEMO_OPTIONS["model"], "--sae", str(tmp_path / "topk"),
                     "--n", "64", "--steps", "10", "--top-k", "8", "--clamp-mode", "zero", "--out", str(out), "--quiet"])
    assert code == 0
    summary = summary_of(out)
    if summary["n_valid"]:
        assert summary["modes"]["encoder"]["c1_residual_max"] <= 1e-5
