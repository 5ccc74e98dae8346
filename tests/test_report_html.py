"""report.html: one self-contained page with the numbers of report.md, the per-example table
(sorted and filtered by its script, checked in headless Chromium), feature links to Neuronpedia
exactly when the SAE has a Neuronpedia id, and the progress bars of long work."""

from __future__ import annotations

import html
import io
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from saerecover.report.html import HTML_FILE
from saerecover.report.run import summary_rows, write_report
from saerecover.runs.directory import RunDirectory
from saerecover.runs.history import history_tensors
from saerecover.runs.stats import CONTINUOUS_METRICS, summarize

import browser

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NP_ID = "toy-model/1-res-test"
FEATURES = [3, 17, 42, 99]


def _config(neuronpedia_id: str | None) -> dict:
    clamp = {"hook_name": "blocks.1.hook_resid_post", "features": FEATURES, "mode": "set", "value": -5.0,
             "where": "active", "sae": "toy/layer1", "center_input": False}
    if neuronpedia_id:
        clamp["neuronpedia_id"] = neuronpedia_id
    return {"task": {"name": "ioi", "n": 10}, "model": {"name": "toy-gpt", "backend": "hf", "dtype": "float32"},
            "clamp": [clamp], "recovery": {"steps": 6, "lr": 0.1, "budget": 20.0}, "modes": ["none", "encoder"],
            "delta_site": "blocks.1.hook_resid_post"}


def make_run(out: Path, *, neuronpedia_id: str | None = None, n: int = 10) -> Path:
    """A run directory written through the run-directory API: examples 0, 5 not valid, example 7
    failed in mode none, every other valid example evaluated with a history and top features."""
    rng = random.Random(1)
    with RunDirectory(out, config=_config(neuronpedia_id)) as run:
        for mode in ("none", "encoder"):
            for i in range(n):
                eid = f"ex{i:03d}"
                valid = i % 5 != 0
                r = {"example_id": eid, "mode": mode, "valid": valid, "recovered": None, "failed": False,
                     "error": None, "base_score": 1.0, "defended_score": -1.0}
                if valid and i == 7 and mode == "none":
                    r.update(failed=True, error="non-finite loss or gradient: nan")
                elif valid:
                    history = [{"step": s, "loss": 2.0 / (s + 1), "score": 0.2 * s,
                                "phi_relative_drift": 0.01 * s * (mode == "none")} for s in range(6)]
                    run.save_tensors(mode, eid, {"delta": torch.randn(2, 8), **history_tensors(history)})
                    r.update({m: rng.random() for m in CONTINUOUS_METRICS})
                    r.update(recovered=rng.random() < 0.7, zero_reactivation=False, steps=6,
                             recovered_score=rng.uniform(-1, 1), phi_relative_drift=rng.random(),
                             top_features=[[200 + i, 2.5], [300 + i, 1.25]])
                run.append_record(r)
        run.write_summary(summarize(run.records(), task="ioi", modes=["none", "encoder"]))
    return out


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("html")
    out = {"plain": make_run(root / "plain"), "linked": make_run(root / "linked", neuronpedia_id=NP_ID)}
    for path in out.values():
        write_report(path)
    return out


def _rows(dom: str) -> list[dict[str, str]]:
    """The example table's rows: mode, recovered, hidden, and the data-value of each cell."""
    body = dom.split('id="examples"', 1)[1].split("</tbody>", 1)[0]
    rows = []
    for m in re.finditer(r"<tr ([^>]*)>(.*?)</tr>", body, re.S):
        attrs, cells = m.group(1), m.group(2)
        rows.append({"mode": re.search(r'data-mode="([^"]*)"', attrs).group(1),
                     "recovered": re.search(r'data-recovered="([^"]*)"', attrs).group(1),
                     "hidden": " hidden" in f" {attrs}",
                     "id": re.search(r"<td>(ex\d+)</td>", cells).group(1),
                     "values": re.findall(r'<td data-value="([^"]*)"', cells)})
    return rows


def test_the_page_is_self_contained_and_has_the_numbers_of_report_md(run_dirs):
    out = run_dirs["plain"]
    page = (out / HTML_FILE).read_text()
    md = (out / "report.md").read_text()
    # nothing is fetched: no style sheet, script or image from elsewhere; every figure embedded
    assert "<link" not in page and "<script src" not in page and "@import" not in page
    imgs = re.findall(r'<img src="([^"]{0,40})', page)
    assert len(imgs) == 4 and all(s.startswith("data:image/png;base64,") for s in imgs)
    for png in ("recovery_vs_drift", "delta_vs_drift", "distributions", "history"):
        assert f"plots/{png}.png" in md and f'alt="{png.replace("_", " ")}"' in page
    # the summary table's cells, the same strings in both files
    summary = json.loads((out / "summary.json").read_text())
    table = summary_rows(summary)
    assert len(table.rows) == 2
    for row in table.rows:
        for cell in row:
            assert str(cell) in md and html.escape(str(cell)) in page
    # one row per valid example and mode (8 valid of 10, both modes), failures marked
    rows = _rows(page)
    assert len(rows) == 16 and not any(r["hidden"] for r in rows)
    assert [r["recovered"] for r in rows if r["mode"] == "none" and r["id"] == "ex007"] == ["failed"]
    assert "neuronpedia.org" not in page  # no Neuronpedia id: feature indices alone
    for f in FEATURES:
        assert f'<span class="feature">{f}</span>' in page
    assert '<span class="feature">201</span><span class="feature-value"> (2.5)</span>' in page


def test_feature_links_appear_exactly_when_the_sae_has_a_neuronpedia_id(run_dirs):
    page = (run_dirs["linked"] / HTML_FILE).read_text()
    links = set(re.findall(r'href="https://www\.neuronpedia\.org/([^"]+)"', page))
    clamped = {f"{NP_ID}/{f}" for f in FEATURES}
    carrying = {f"{NP_ID}/{200 + i}" for i in range(10) if i % 5} | {f"{NP_ID}/{300 + i}" for i in range(10) if i % 5}
    assert clamped <= links and carrying <= links and links == clamped | carrying
    assert "neuronpedia.org" not in (run_dirs["plain"] / HTML_FILE).read_text()


def test_sorting_and_filtering_by_the_address_in_a_browser(run_dirs):
    page_file = run_dirs["plain"] / HTML_FILE
    records = [json.loads(line) for line in (run_dirs["plain"] / "records.jsonl").read_text().splitlines()]
    want = [r for r in records if r["valid"] and r["mode"] == "encoder" and r["recovered"] is True]
    assert 0 < len(want) < 8

    page = browser.load(page_file, "sort=delta_norm:desc&mode=encoder&recovered=yes")
    assert page.console == [] and 'data-ready="yes"' in page.dom
    shown = [r for r in _rows(page.dom) if not r["hidden"]]
    assert {(r["mode"], r["recovered"]) for r in shown} == {("encoder", "yes")}
    assert sorted(r["id"] for r in shown) == sorted(r["example_id"] for r in want)
    norms = [float(r["values"][3]) for r in shown]  # data-values: score, relative drift, Phi drift, delta norm, steps
    assert norms == sorted((r["delta_norm"] for r in want), reverse=True)
    assert f"showing {len(want)} of 16" in page.dom
    assert 'data-key="delta_norm" aria-sort="descending"' in page.dom

    page = browser.load(page_file, "sort=example_id:asc&q=ex00")
    shown = [r for r in _rows(page.dom) if not r["hidden"]]
    assert [r["id"] for r in shown] == sorted(r["id"] for r in shown) and len(shown) == 16


def test_report_command_rebuilds_both_files_and_prints_where(run_dirs, capsys):
    from saerecover.cli import main

    out = run_dirs["plain"]
    (out / HTML_FILE).unlink()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [f"report: {out / HTML_FILE}  (open in a browser)", f"        {out / 'report.md'}"]
    assert (out / HTML_FILE).is_file() and (out / "report.md").is_file()


def test_a_local_sae_with_a_neuronpedia_id_links_its_features_end_to_end(tmp_path):
    """A copy of the toy SAE whose cfg.json metadata carries a Neuronpedia id: the site reads
    it, the run's config records it, report.html links every clamped and carrying feature;
    the toy SAE itself has none (and its clamp description stays as it was)."""
    import saerecover as sr
    from saerecover.toy import DEMO_OPTIONS

    sae_dir = tmp_path / "sae"
    shutil.copytree(DEMO_OPTIONS["sae"], sae_dir)
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg["metadata"]["neuronpedia_id"] = NP_ID
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))

    world = sr.toy.load()
    plain = world.site(DEMO_OPTIONS["hook"])
    site = sr.load_site(sae_dir, hook_name=DEMO_OPTIONS["hook"], model=world.model)
    assert plain.neuronpedia_id is None and site.neuronpedia_id == NP_ID
    assert "neuronpedia_id" not in sr.Clamp({plain: [1, 2]}).describe()[0]
    task = world.ioi_task(n=16)
    features = sr.select_by_attribution(world.model, site, task, task.examples(), top_k=DEMO_OPTIONS["top_k"])
    clamp = sr.Clamp({site: features}, value=DEMO_OPTIONS["clamp_value"], where="active")
    run = sr.recover(world.model, clamp, task, projection="encoder", steps=5, out=tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["clamp"][0]["neuronpedia_id"] == NP_ID
    page = (tmp_path / "run" / HTML_FILE).read_text()
    links = set(re.findall(r'href="https://www\.neuronpedia\.org/([^"]+)"', page))
    assert {f"{NP_ID}/{int(f)}" for f in features} <= links
    carrying = {f"{NP_ID}/{j}" for r in run.records if r.get("top_features") for j, _ in r["top_features"]}
    assert carrying and carrying <= links
    # the recorded features are the decomposition's top-k non-clamped features, with their ||dz_j||
    from saerecover.core.decomposition import decompose
    from saerecover.runs import open_run

    rec = next(r for r in run.records if r.get("top_features"))
    t = open_run(tmp_path / "run").load_tensors(rec["mode"], rec["example_id"])
    dec = decompose(site, features, t["h_def"], t["delta"], top_k=5)
    assert [j for j, _ in rec["top_features"]] == dec["topk_features"].tolist()
    assert [v for _, v in rec["top_features"]] == pytest.approx(
        dec["dz"][:, dec["topk_features"]].norm(dim=0).tolist(), rel=1e-6)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_rate_and_eta_on_a_terminal_only(monkeypatch):
    from saerecover.progress import progress_bar

    def run(stderr: io.StringIO, enabled: bool) -> str:
        monkeypatch.setattr("sys.stderr", stderr)
        with progress_bar(4, "recover [encoder]", enabled=enabled) as bar:
            for _ in range(4):
                bar.update(1)
        return stderr.getvalue()

    shown = run(_Terminal(), True)
    assert "recover [encoder]" in shown and "4/4" in shown and "ex/s" in shown and "<" in shown  # elapsed<eta
    assert run(io.StringIO(), True) == ""  # not a terminal: a pipe or a log file
    assert run(_Terminal(), False) == ""  # --quiet
