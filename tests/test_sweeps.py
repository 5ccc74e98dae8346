"""Budget and feature-set sweeps: the robustness score, and both sweeps (API and CLI) on toy IOI
with a tiny grid."""

from __future__ import annotations

import json
import re

import pytest
from saerecover import toy
from saerecover.experiments import sweeps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rec(eid, mode, valid, recovered, failed=False):
    return {"example_id": eid, "mode": mode, "valid": valid, "recovered": recovered if valid else None,
            "failed": failed}


def test_robustness_smallest_recovering_budget():
    by_budget = {
        1.0: [_rec("a", "m", True, True), _rec("b", "m", True, False), _rec("c", "m", True, False),
              _rec("d", "m", True, False), _rec("e", "m", False, None)],
        2.0: [_rec("a", "m", True, True), _rec("b", "m", True, True), _rec("c", "m", True, False),
              _rec("d", "m", True, False), _rec("e", "m", True, True)],
        4.0: [_rec("a", "m", True, False), _rec("b", "m", True, True), _rec("c", "m", True, True, failed=True),
              _rec("d", "m", True, False), _rec("e", "m", True, True)],
    }
    r = sweeps.robustness(by_budget, ["m"])["m"]
    # e is not valid at every budget; c failed at 4 (not recovered); d never recovered
    assert r["per_example"] == {"a": 1.0, "b": 2.0, "c": None, "d": None}
    assert r["n"] == 4 and r["never"] == 2 and r["never_share"] == 0.5
    assert r["q1"] == 1.0 and r["median"] == 2.0 and r["q3"] is None
    assert r["nonmonotone"] == 1  # a: recovered at 1 and 2, not at 4
    assert r["recovered_min"] == 1.0
    lo, hi = r["never_share_ci95"]
    assert lo < 0.5 < hi


def test_grids_are_checked():
    with pytest.raises(ValueError, match="budget"):
        sweeps.budget_sweep(None, None, None, [1.0, 0.0], out="unused")
    with pytest.raises(ValueError, match="integer"):
        sweeps.feature_sweep(None, None, [2.5], make_clamp=lambda k: None, out="unused")
    with pytest.raises(ValueError, match="repeat"):
        sweeps.feature_sweep(None, None, [4, 4], make_clamp=lambda k: None, out="unused")


# ----------------------------------------------------------------------------------------------
# toy IOI


SETTING = {"n": 48, "steps": 25}


@pytest.fixture(scope="module")
def toy_ioi():
    from saerecover.toy import DEMO_OPTIONS

    world = toy.load()
    site = world.site(DEMO_OPTIONS["hook"])
    task = world.ioi_task(n=SETTING["n"], seed=0)
    make = sweeps.attribution_clamps(world.model, site, task, value=DEMO_OPTIONS["clamp_value"],
                                     mode=DEMO_OPTIONS["clamp_mode"], where=DEMO_OPTIONS["clamp_where"])
    return world, task, make


def test_toy_ioi_budget_sweep(toy_ioi, tmp_path):
    from saerecover.toy import DEMO_OPTIONS

    world, task, make = toy_ioi
    budgets = [0.25, 1.0, 4.0]
    res = sweeps.budget_sweep(world.model, make(DEMO_OPTIONS["top_k"]), task, budgets, out=tmp_path / "b",
                              steps=SETTING["steps"], report=False)
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["collection"] == "budget_sweep" and s["budgets"] == budgets
    want = {(m, b) for m in ("none", "encoder") for b in budgets}
    assert {(r["mode"], r["budget"]) for r in s["budget_sweep"]} == want
    for b in budgets:
        assert (tmp_path / "b" / f"budget-{b:g}" / "summary.json").is_file()
    assert (tmp_path / "b" / "plots" / "budget_sweep.png").stat().st_size > 0
    assert "Robustness" in (tmp_path / "b" / "report.md").read_text()
    assert s["n_valid"] > 0
    for m in ("none", "encoder"):
        rows = sorted((r for r in s["budget_sweep"] if r["mode"] == m), key=lambda r: r["budget"])
        assert all(r["n_valid"] == s["n_valid"] for r in rows)  # one clamp: the same valid set at every budget
        assert rows[-1]["recovery_rate"] >= rows[0]["recovery_rate"]
        rob = s["robustness"][m]
        assert rob["n"] == s["n_valid"]
        assert rob["never"] == sum(v is None for v in rob["per_example"].values())
    enc = [r for r in s["budget_sweep"] if r["mode"] == "encoder"]
    assert max(r["c1_residual_max"] for r in enc if r["c1_residual_max"] is not None) <= 1e-5
    assert res.table().count("\n") == 1 + 2 * len(budgets)


def test_toy_ioi_feature_sweep(toy_ioi, tmp_path):
    world, task, make = toy_ioi
    res = sweeps.feature_sweep(world.model, task, [4, 16], make_clamp=make, out=tmp_path / "k",
                               steps=SETTING["steps"], budget=4.0, report=False)
    rows = res.summary["feature_sweep"]
    assert {r["k"] for r in rows} == {4, 16}
    n_valid = {r["k"]: r["n_valid"] for r in rows if r["mode"] == "none"}
    assert n_valid[16] >= n_valid[4]  # nested feature sets, the valid set recomputed per K
    assert (tmp_path / "k" / "k-16" / "records.jsonl").is_file()
    assert (tmp_path / "k" / "plots" / "feature_sweep.png").is_file()


def test_sweep_cli_on_the_toy_world(tmp_path, capsys):
    from saerecover.cli import main

    rc = main(["sweep", "budget", "--toy", "--budgets", "0.5,4", "--n", "24", "--steps", "10", "--quiet",
               "--out", str(tmp_path / "cli")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "smallest recovering budget" in out
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["budgets"] == [0.5, 4.0]
    rc = main(["sweep", "budget", "--toy", "--budgets", "0,4", "--out", str(tmp_path / "bad")])
    assert rc == 2
    # `saerecover report` regenerates the combined report and plot of the sweep
    root = tmp_path / "cli"
    before = (root / "report.md").read_text()
    page = (root / "report.html").read_text()
    assert "<h2>Robustness of the clamp" in page and len(re.findall(r'<img src="data:image/png;base64,', page)) == 1
    (root / "report.md").unlink()
    (root / "report.html").unlink()
    (root / "plots" / "budget_sweep.png").unlink()
    assert main(["report", str(root)]) == 0
    assert (root / "report.md").read_text() == before and (root / "plots" / "budget_sweep.png").is_file()
    assert (root / "report.html").read_text() == page  # the figure is drawn the same, byte for byte
    printed = capsys.readouterr().out
    assert "| 0.5" in printed and f"report: {root / 'report.html'}" in printed
    # `analyze` on the sweep names its members instead of failing obscurely
    assert main(["analyze", str(root)]) == 2
    assert "it holds run directories (budget-0.5, budget-4)" in capsys.readouterr().err
