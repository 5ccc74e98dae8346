"""report.md and plots from a synthetic run directory."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from saerecover.report.run import summary_table, write_report
from saerecover.runs.directory import RunDirectory
from saerecover.runs.stats import CONTINUOUS_METRICS, summarize

CONFIG = {
    "task": {"name": "ioi", "n": 12, "seed": 0, "names": [f"N{i}" for i in range(40)]},
    "model": {"name": "toy-gpt", "backend": "hf", "dtype": "float32"},
    "clamp": [{"hook_name": "blocks.1.hook_resid_post", "features": list(range(16)),
               "mode": "set", "value": -5.0, "where": "active", "sae": "toy/layer1"}],
    "recovery": {"steps": 100, "lr": 0.1, "budget": 20.0, "optimizer": "adam"},
    "modes": ["none", "encoder"],
    "delta_site": "blocks.1.hook_resid_post",
}


def make_run(out: Path, *, n: int = 12, valid_every: int = 4, history: bool = False,
             summary: bool = True, extra: dict | None = None) -> Path:
    rng = random.Random(0)
    with RunDirectory(out, config=CONFIG) as run:
        for mode in CONFIG["modes"]:
            for i in range(n):
                eid = f"ex{i:03d}"
                valid = valid_every > 0 and i % valid_every != 0
                r = {"example_id": eid, "mode": mode, "valid": valid, "recovered": None,
                     "failed": False, "error": None, "base_score": 1.0, "defended_score": -1.0}
                if valid and i == 5 and mode == "none":
                    r.update(failed=True, error="non-finite loss or gradient: nan")
                elif valid:
                    run.save_tensors(mode, eid, {"delta": torch.randn(2, 8)})
                    r.update({m: rng.random() for m in CONTINUOUS_METRICS})
                    r.update(recovered=rng.random() < 0.8, zero_reactivation=rng.random() < 0.5,
                             steps=100, recovered_score=rng.random())
                    if mode == "encoder":
                        r.update(activation_drift=0.0, c1_residual=1e-7)
                    if history:
                        r["history"] = [{"step": s, "loss": 1.0 / (s + 1), "score": 0.1 * s}
                                        for s in range(rng.randint(5, 10))]
                run.append_record(r)
        if summary:
            run.write_summary(summarize(run.records(), task="ioi", modes=CONFIG["modes"],
                                        extra=extra))
    return out


def referenced_pngs(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report.read_text())


def test_report_references_existing_plots(tmp_path):
    out = make_run(tmp_path / "run")
    report = write_report(out)
    assert report == out / "report.md"
    text = report.read_text()
    assert text.startswith("# saerecover report: ioi")
    for needle in ("toy-gpt", "blocks.1.hook_resid_post", "16 features", "lr=0.1", "budget=20",
                   "optimizer=adam", "## Results", "| none", "| encoder", "Wilson"):
        assert needle in text, needle
    pngs = referenced_pngs(report)
    assert "plots/recovery_vs_drift.png" in pngs and "plots/delta_vs_drift.png" in pngs
    for rel in pngs:
        assert not Path(rel).is_absolute()
        p = out / rel
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Failures" in text and "non-finite loss" in text
    assert "history" not in " ".join(pngs)  # no per-step history recorded: no plot, no fuss
    assert "N39" not in text.split("Full config")[0]  # long lists are counted in the setup list


def test_report_optional_plots_history_and_budget_sweep(tmp_path):
    sweep = [{"mode": m, "budget": b, "recovery_rate": r,
              "recovery_rate_ci95": [max(0.0, r - 0.2), min(1.0, r + 0.2)]}
             for m in ("none", "encoder") for b, r in ((0, 0.0), (2, 0.1), (5, 0.6), (10, 1.0))]
    out = make_run(tmp_path / "run", history=True, extra={"budget_sweep": sweep})
    pngs = referenced_pngs(write_report(out))
    assert "plots/history.png" in pngs and "plots/budget_sweep.png" in pngs
    assert all((out / p).is_file() for p in pngs)


def test_report_bad_budget_sweep_is_skipped_with_a_note(tmp_path):
    out = make_run(tmp_path / "run", extra={"budget_sweep": "later"})
    text = write_report(out).read_text()
    assert "budget_sweep" in text and "skipped" in text
    assert all((out / p).is_file() for p in referenced_pngs(out / "report.md"))


def test_report_zero_valid_run(tmp_path):
    out = make_run(tmp_path / "run", valid_every=0)
    text = write_report(out).read_text()
    assert "0 valid flips" in text and "n/a" in text
    assert referenced_pngs(out / "report.md") == []
    assert "skipped" in text


def test_report_without_summary_falls_back_to_records(tmp_path):
    out = make_run(tmp_path / "run", summary=False)
    text = write_report(out).read_text()
    assert "summary.json is missing" in text and "| encoder" in text
    assert not (out / "summary.json").exists()  # the report does not write the summary


def test_report_refuses_a_non_run(tmp_path):
    from saerecover.runs.errors import RunDirectoryError

    with pytest.raises(RunDirectoryError):
        write_report(tmp_path)


def test_summary_table_rows_and_missing_values():
    s = {"modes": {
        "none": {"n_valid": 37, "recovered": 37, "recovery_rate": 1.0,
                 "recovery_rate_ci95": [0.906, 1.0], "activation_drift_mean": 0.094,
                 "relative_drift_mean": 0.05, "floor_violation_mean": 0.0,
                 "zero_reactivation_rate": 0.1, "zero_reactivation_rate_ci95": [0.04, 0.25],
                 "delta_norm_mean": 12.5, "c1_residual_max": 0.3, "n_failed": 0},
        "encoder": {"n_valid": 0, "recovered": 0, "recovery_rate": None},
    }}
    table = summary_table(s)
    lines = table.splitlines()
    assert len(lines) == 4
    assert all(line.count("|") == lines[0].count("|") for line in lines)  # no stray pipes
    assert "1.000 [0.906, 1.000]" in lines[2] and "37/37" in lines[2]
    assert "0.094" in lines[2] and "12.5" in lines[2]
    assert "n/a" in lines[3] and "0/0" in lines[3]
    assert summary_table({"modes": {}}) == "(no modes in this summary)"
    s["modes"]["encoder"]["n_failed"] = 2
    assert "failed" in summary_table(s).splitlines()[0]
