"""The whole pipeline into a run directory: flips, modes, resume after interruption, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from saerecover.core.clamp import Clamp
from saerecover.core.examples import Examples, answer_logits, pad_right
from saerecover.core.sites import load_site
from saerecover.experiments.pipeline import recover
from saerecover.models import load_model
from saerecover.runs.directory import RunDirectory
from saerecover.testing import tiny_gpt2

HOOK = "blocks.0.hook_resid_post"


class MarginTask:
    """logit(a) - logit(b) at the last token, on fixed random prompts (importable by a subprocess)."""

    name = "margin"

    def __init__(self, n: int = 24, seed: int = 0, a: int = 5, b: int = 6) -> None:
        self.n, self.seed, self.a, self.b = n, seed, a, b

    def examples(self) -> Examples:
        g = torch.Generator().manual_seed(self.seed)
        seqs = [torch.randint(4, 60, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
                for _ in range(self.n)]
        ids, mask = pad_right(seqs, 0)
        return Examples(ids, mask, mask.sum(1) - 1, [f"ex-{i:03d}" for i in range(self.n)])

    def score(self, logits, ex):
        last = answer_logits(logits, ex).float()
        return last[:, self.a] - last[:, self.b]

    def loss(self, logits, ex):
        return -self.score(logits, ex)

    def describe(self):
        return {"name": self.name, "n": self.n, "seed": self.seed, "a": self.a, "b": self.b}


def build(root: Path):
    """A tiny model, an SAE saved to disk, and a clamp that flips some examples."""
    model_dir = root / "tiny-gpt2"
    if not model_dir.exists():
        tiny_gpt2(root, n_layers=2, d_model=32)
    sae_dir = root / "sae"
    if not sae_dir.exists():
        torch.manual_seed(0)
        sae = SAE.from_dict({"architecture": "standard", "d_in": 32, "d_sae": 96, "dtype": "float32",
                             "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                             "metadata": {"hook_name": HOOK}})
        with torch.no_grad():
            sae.b_enc.add_(0.05)
        sae.save_model(sae_dir)
    model = load_model(str(model_dir))
    site = load_site(sae_dir, model=model)
    task = MarginTask()
    # clamp the features that most support the margin, hard, so that flips exist
    from saerecover.core.selection import attribution_scores

    scores = attribution_scores(model, site, task, task.examples())
    feats = torch.argsort(scores, descending=True)[:24]
    clamp = Clamp({site: feats}, value=-3.0, where="all")
    return model, clamp, task


KW = dict(projection=["none", "encoder"], steps=12, lr=0.1, budget=4.0, batch_size=4, progress=False)


def strip(records):
    keys_volatile = {"seconds"}
    return sorted(({k: v for k, v in r.items() if k not in keys_volatile} for r in records),
                  key=lambda r: (r["mode"], r["example_id"]))


def assert_same_records(got, want):
    """Same examples, modes, flags and metrics (floats to round-off: resumed batches differ)."""
    got, want = strip(got), strip(want)
    assert [(r["mode"], r["example_id"]) for r in got] == [(r["mode"], r["example_id"]) for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key, wv in w.items():
            assert_close_value(g[key], wv, (w["example_id"], key))


def assert_close_value(got, want, where, rel=1e-3, abs=1e-4):
    """``got == want``, floats (also inside lists, e.g. top_features' norms) to round-off."""
    if isinstance(want, float):
        assert isinstance(got, (int, float)) and not isinstance(got, bool), where
        assert got == pytest.approx(want, rel=rel, abs=abs, nan_ok=True), where
    elif isinstance(want, list) and isinstance(got, list):
        assert len(got) == len(want), where
        for g, w in zip(got, want):
            assert_close_value(g, w, where, rel, abs)
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    return root, build(root)


@pytest.fixture(scope="module")
def reference(setup):
    root, (model, clamp, task) = setup
    return recover(model, clamp, task, out=root / "ref", **KW)


def test_run_directory_contract(reference):
    run = reference
    assert (run.path / "config.json").exists() and (run.path / "report.md").exists()
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["n_examples"] == 24
    assert summary["n_valid"] >= 2, "the test clamp should flip some examples"
    for mode in ("none", "encoder"):
        m = summary["modes"][mode]
        for key in ("recovered", "recovery_rate", "recovery_rate_ci95", "activation_drift_mean", "relative_drift_mean",
                    "floor_violation_mean", "zero_reactivation_rate", "delta_norm_mean", "c1_residual_max"):
            assert key in m, key
    assert summary["modes"]["encoder"]["c1_residual_max"] <= 1e-5
    assert summary["modes"]["encoder"]["activation_drift_mean"] <= 1e-4
    lines = (run.path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 24
    rec = json.loads(lines[-1])
    for key in ("example_id", "mode", "valid", "recovered"):
        assert key in rec


def test_resume_after_interruption_loses_and_duplicates_nothing(setup, reference, monkeypatch):
    root, (model, clamp, task) = setup
    out = root / "interrupted"
    calls = {"n": 0}
    original = RunDirectory.append_record

    def crashing(self, record):
        calls["n"] += 1
        if calls["n"] == 31:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, record)

    monkeypatch.setattr(RunDirectory, "append_record", crashing)
    with pytest.raises(KeyboardInterrupt):
        recover(model, clamp, task, out=out, **KW)
    monkeypatch.setattr(RunDirectory, "append_record", original)
    assert len((out / "records.jsonl").read_text().splitlines()) == 30
    resumed = recover(model, clamp, task, out=out, **KW)
    assert_same_records(resumed.records, reference.records)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_pipeline import build, KW
from pathlib import Path
from saerecover.experiments.pipeline import recover
model, clamp, task = build(Path({root!r}))
recover(model, clamp, task, out=Path({out!r}), **{{**KW, "batch_size": 1}})
"""


def test_sigkill_and_resume_gives_the_same_records(setup, reference):
    root, (model, clamp, task) = setup
    out = root / "killed"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), root=str(root), out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    records = out / "records.jsonl"
    while time.time() < deadline:
        if records.exists() and len(records.read_bytes().splitlines()) >= 30:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(records.read_bytes().splitlines())
    assert 0 < n_before < 48
    resumed = recover(model, clamp, task, out=out, **KW)
    assert_same_records(resumed.records, reference.records)
