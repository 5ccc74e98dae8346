"""``saerecover compare defenses|saes`` end to end on the toy world with a tiny grid: one run per
(member, budget), a resumable collection, the ranked report and frontier plot, and the
SAEBench-layout export read back."""

from __future__ import annotations

import json

import pytest
from saerecover.cli import main
from saerecover.report.saebench import read_saebench

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--toy", "--task", "ioi", "--n", "16", "--steps", "3", "--budgets", "0.1,0.5", "--reference-texts", "4",
        "--quiet"]


def _records(root) -> int:
    return sum(len(p.read_text().splitlines()) for p in root.rglob("records.jsonl"))


def test_compare_defenses_runs_every_member_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "defenses", *TINY, "--defenses", "clamp,error-mean,dir-ablate,hardened:1", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = [m["name"] for m in summary["members"]]
    assert names == ["clamp", "error-mean", "dir-ablate", "hardened-1-r0", "hardened-1-r1"]
    for name in names:  # one run directory per (member, budget)
        assert sorted(p.name for p in (out / name).iterdir() if p.is_dir() and p.name.startswith("budget-")) == [
            "budget-0.1", "budget-0.5"]
        cfg = json.loads((out / name / "budget-0.1" / "config.json").read_text())
        assert cfg["recovery"]["budget_rel"] == 0.1 and cfg["compare"]["group"] in ("clamp", "error-mean",
                                                                                    "dir-ablate", "hardened:1")
    by = {m["name"]: m for m in summary["members"]}
    assert by["clamp"]["recovery"] == {"reclamp": False}
    assert all(by[n]["recovery"] == {"reclamp": True} for n in names[1:])
    # round 0 of the hardened clamp is no headline
    assert sorted(summary["ranking"]) == ["clamp", "dir-ablate", "error-mean", "hardened-1-r1"]
    assert [m["rank"] for m in summary["members"] if m.get("rank")] and by["hardened-1-r0"].get("rank") is None
    for m in summary["members"]:
        c = m["collateral"]
        assert c["kl_n_texts"] == 4 and c["kl_mean"] >= 0
        assert c["non_target"]["n"] == c["non_target"]["base"]["n"] == c["non_target"]["base"]["correct"]
        assert 0 <= m["robustness"]["encoder"]["score"] <= 1
    # the plain clamp leaves its own non-target examples alone by construction
    assert by["clamp"]["collateral"]["non_target"]["accuracy"] == 1.0
    report = (out / "report.md").read_text()
    assert "## Ranking of the defenses" in report and "## Hardening rounds" in report
    assert (out / "plots" / "frontier.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| rank | defense" in printed
    # a rerun resumes: nothing is recomputed, nothing appended
    before = _records(out)
    assert main(argv) == 0
    assert _records(out) == before
    assert json.loads((out / "summary.json").read_text())["ranking"] == summary["ranking"]


def test_compare_saes_ranks_two_layers_and_exports_saebench_json(tmp_path, capsys):
    out = tmp_path / "saes"
    assert main(["compare", "saes", *TINY, "--sae", "blocks.1.hook_resid_post", "--sae", "blocks.2.hook_resid_post",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "saes" and len(summary["ranking"]) == 2
    assert "SAEBench-layout export" in capsys.readouterr().out
    for member, rel in zip(summary["members"], summary["saebench_export"]):
        data = read_saebench(out / rel)
        metrics = data["eval_result_metrics"]["recovery_robustness"]
        assert metrics["robustness_score"] == member["robustness"]["encoder"]["score"]
        assert data["sae_lens_id"] == member["sae"]["hook_name"]
        assert data["sae_cfg_dict"]["d_sae"] == member["sae"]["d_sae"]
    assert "## Ranking of the SAEs" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv,match", [
    (["compare", "defenses", "--out", "x"], "give --toy"),
    (["compare", "defenses", "--toy", "--budgets", "0.1,-1", "--out", "x"], "budget"),
    (["compare", "defenses", "--toy", "--steps", "0", "--out", "x"], "--steps must be an integer >= 1"),
    (["compare", "defenses", "--toy", "--defenses", "clamp,nope", "--out", "x"], "unknown defense 'nope'"),
    (["compare", "saes", "--toy", "--sae", "blocks.1.hook_resid_post", "--sae", "blocks.1.hook_resid_post",
      "--out", "x"], "--sae repeats"),
])
def test_bad_compare_options_are_one_line_errors(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("saerecover: error: ") and match in err and err.count("\n") == 1
