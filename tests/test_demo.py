"""`saerecover demo` end to end, and the run directory format it writes: the keys of every
record, of the summary and of the config, the files, and the saved tensors are pinned in
tests/data/demo_run_keys.json (a change to the format must change that file on purpose)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from saerecover import cli

import browser

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEYS = json.loads((Path(__file__).parent / "data" / "demo_run_keys.json").read_text())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_recovers_in_both_modes(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert set(summary["modes"]) == {"none", "encoder"}
    assert summary["n_valid"] > 0
    for mode in ("none", "encoder"):
        assert summary["modes"][mode]["recovered"] > 0
    assert summary["modes"]["encoder"]["c1_residual_max"] <= 1e-5


def test_demo_run_directory_keeps_its_format(demo_run):
    records = [json.loads(line) for line in (demo_run / "records.jsonl").read_text().splitlines()]
    by_kind: dict[str, set[str]] = {}
    for rec in records:
        by_kind.setdefault("evaluated" if rec.get("recovered") is not None else "not_valid", set()).update(rec)
    assert {k: sorted(v) for k, v in by_kind.items()} == KEYS["records"]
    summary = json.loads((demo_run / "summary.json").read_text())
    assert sorted(summary) == KEYS["summary"]
    assert sorted(summary["modes"]["encoder"]) == KEYS["summary_mode"]
    assert sorted(json.loads((demo_run / "config.json").read_text())) == KEYS["config"]
    assert sorted(p.name for p in demo_run.iterdir() if not p.name.startswith(".")) == KEYS["files"]
    tensor_file = next((demo_run / "tensors").rglob("*.safetensors"))
    with safe_open(str(tensor_file), "pt") as f:
        assert sorted(f.keys()) == KEYS["tensors"]


def test_demo_report_html_in_a_headless_browser(demo_run, tmp_path):
    """report.html as a person opens it: no console error, the summary and per-example tables,
    every figure decoded, a screenshot that is not blank (tmp_path/demo_report.png); the toy
    SAE has no Neuronpedia id, so no feature links."""
    page = browser.check_report_page(demo_run / "report.html", tmp_path / "demo_report.png")
    assert "neuronpedia.org" not in page.dom
    summary = json.loads((demo_run / "summary.json").read_text())
    n_rows = sum(m["n_valid"] for m in summary["modes"].values())
    assert f"showing {n_rows} of {n_rows}" in page.dom
