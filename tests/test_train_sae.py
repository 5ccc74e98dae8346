"""``saerecover train-sae``: the attention-sink rule (exact), and the command end to end on a
tiny Llama (seconds): an SAE directory that --sae loads, with the rule and what it dropped in
its metadata."""

from __future__ import annotations

import json

import pytest
import torch

from saerecover import testing
from saerecover.cli import main
from saerecover.experiments.sae_training import Rows, SinkRule, quality_warnings, split_by_sequence

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.1.hook_resid_post"


def _rows(norms, positions, sequences):
    rows = torch.zeros(len(norms), 3)
    rows[:, 0] = torch.tensor(norms, dtype=torch.float32)
    return Rows(rows, torch.tensor(positions), torch.tensor(sequences))


def test_sink_rule_drops_position_zero_and_rows_far_above_the_median():
    # later rows (positions >= 1) have norms 1, 2, 50, 3 -> median (lower) 2 -> threshold 10 x 2 = 20:
    # dropped: both position-0 rows (100, 0.5: position 0 goes whatever its norm) and the row of norm 50
    rows = _rows([100.0, 1.0, 2.0, 50.0, 0.5, 3.0], [0, 1, 2, 3, 0, 1], [0, 0, 0, 0, 1, 1])
    kept, record = SinkRule().apply(rows)
    assert kept.rows[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert (record["median_norm"], record["norm_threshold"]) == (2.0, 20.0)
    assert (record["rows_total"], record["rows_kept"], record["rows_dropped_position0"],
            record["rows_dropped_norm"]) == (6, 3, 2, 1)
    assert record["position0_mean_norm"] == pytest.approx(50.25)
    kept, record = SinkRule(exclude_first=False, max_norm_ratio=None).apply(rows)
    assert len(kept.rows) == 6 and record["rows_dropped_norm"] == 0
    with pytest.raises(ValueError, match="at least two tokens"):
        SinkRule().apply(_rows([1.0], [0], [0]))


def test_split_keeps_whole_sequences_on_one_side():
    rows = _rows([1.0] * 8, [1, 2] * 4, [0, 0, 1, 1, 2, 2, 3, 3])
    rows.rows[:, 1] = rows.sequence.float()
    train, held = split_by_sequence(rows, 4, 0.25, seed=0)
    assert len(held) == 2 and len(train) == 6  # one sequence of four, both its rows
    assert held[0, 1] == held[1, 1] and held[0, 1] not in train[:, 1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_sae")
    model_dir = testing.tiny_llama(root)
    out = root / "sae"
    rc = main(["train-sae", "--model", str(model_dir), "--hook", HOOK, "--out", str(out), "--width", "64", "--k", "4",
               "--tokens", "4096", "--batch-size", "128", "--samples-per-opening", "2", "--new-tokens", "16",
               "--answer-tokens", "8", "--device", "cpu", "--quiet"])
    return rc, model_dir, out


def test_train_sae_writes_an_sae_that_sae_loads(trained, capsys):
    from saerecover.core.sites import load_site
    from saerecover.models import load_model

    rc, model_dir, out = trained
    assert rc == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 64 and cfg["metadata"]["hook_name"] == HOOK
    meta = cfg["metadata"]["saerecover"]
    sink, data = meta["sink_exclusion"], meta["training_data"]
    # every sequence has exactly one position-0 row, and that is all the rule drops on this model
    assert sink["rows_dropped_position0"] == data["n_sequences"] and sink["max_norm_ratio"] == 10.0
    assert sink["rows_total"] == data["n_tokens"]
    assert sink["rows_kept"] == sink["rows_total"] - sink["rows_dropped_position0"] - sink["rows_dropped_norm"]
    assert meta["rows"]["train"] + meta["rows"]["held_out"] == sink["rows_kept"]
    assert set(data["by_source"]) == {"generated-plain", "generated-chat", "requests"}  # no IOI names here
    assert meta["spec"] == {"architecture": "batchtopk", "width": 64, "k": 4.0, "l1": 5.0}
    assert set(meta["evaluation"]["held_out"]) == {"explained_variance", "l0", "dead_fraction", "n_rows"}
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 4096 // 128 and report["held_out"] == meta["evaluation"]["held_out"]
    assert report["warnings"] == quality_warnings(report["held_out"], report["steps"])
    model = load_model(str(model_dir), device="cpu")
    site = load_site(out, model=model)
    assert site.hook_name == HOOK and site.d_sae == 64


@pytest.mark.parametrize("extra, message", [
    (["--width", "0"], "--width must be >= 1, got 0"),
    (["--held-out", "1"], "--held-out must be in (0, 1), got 1.0"),
    (["--text-file", "/nonexistent/t.txt"], "--text-file /nonexistent/t.txt does not exist"),
])
def test_train_sae_bad_options_are_one_line(tmp_path, capsys, extra, message):
    assert main(["train-sae", "--model", str(tmp_path), "--hook", HOOK, "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_train_sae_refuses_a_used_out_directory(trained, capsys):
    _, model_dir, out = trained
    assert main(["train-sae", "--model", str(model_dir), "--hook", HOOK, "--out", str(out)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_a_poor_sae_is_said():
    """Too few optimizer steps leave BatchTopK's threshold unsettled (on SmolLM2, 117 steps gave a
    held-out explained variance of -1.47): under 0.5 (or NaN) the user is told, with the steps."""
    assert quality_warnings({"explained_variance": 0.5}, 100) == []
    for ev in (0.49, -1.47, float("nan")):
        (note,) = quality_warnings({"explained_variance": ev}, 117)
        assert note.startswith(f"the SAE explains {ev:.3f} of the held-out variance (under 0.5) after 117 optimizer "
                               "steps: train longer (--tokens)")
