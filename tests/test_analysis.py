"""CPU-side analysis of saved runs: recomputed metrics, tamper detection, no model loading,
the recovery-path decomposition, centring conventions and the locked-run rule."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from saerecover.cli.runs import add_analyze_parser, cmd_analyze
from saerecover.core.clamp import Clamp
from saerecover.core.decomposition import COMPONENTS, decompose
from saerecover.core.metrics import clamped_features, example_metrics
from saerecover.core.sites import Site, load_site
from saerecover.experiments.analysis import analyze_run, compare_value
from saerecover.runs.directory import RunDirectory, open_run

HOOK = "blocks.0.hook_resid_post"
D_IN, D_SAE = 16, 48
FEATURES = [1, 4, 7, 10, 13]
MODES = ("none", "encoder")


def save_sae(root: Path, *, seed: int = 0, center: bool = False, arch: str = "standard") -> Path:
    """A tiny sae_lens SAE saved to ``root`` (cfg.json + sae_weights.safetensors)."""
    torch.manual_seed(seed)
    meta = {"hook_name": HOOK}
    if center:
        meta["model_from_pretrained_kwargs"] = {"center_writing_weights": True}
    sae = SAE.from_dict({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
                         "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                         "metadata": meta})
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        sae.b_enc.add_(0.2)  # many features active, so deltas move them
    root.mkdir(parents=True, exist_ok=True)
    sae.save_model(root)
    return root


def null_space_rows(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x with its component in span(A) removed, row-wise (C1: A^T x = 0), in float64."""
    u, _, _ = torch.linalg.svd(a.double(), full_matrices=False)
    x64 = x.double()
    return (x64 - (x64 @ u) @ u.T).float()


def build_run(out: Path, sae_dir: Path, *, n: int = 6, rows: int = 3, center_input: bool | None = None,
              model_dtype: str = "float32", seed: int = 1, sae_source: str | None = None) -> Path:
    """A run directory as pipeline.recover writes it, from random h_def and delta: records
    filled by saerecover.metrics exactly as recovery.recover_batch does."""
    site = load_site(sae_dir)
    if center_input is not None:
        site.center_input = center_input
    features = torch.tensor(FEATURES)
    clamp = Clamp({site: FEATURES}, value=-1.0, where="all")
    clamp_cfg = clamp.describe()
    if sae_source is not None:
        clamp_cfg[0]["sae"] = sae_source
    config = {
        "task": {"name": "synthetic"},
        "model": {"name": "none", "backend": "hf", "dtype": model_dtype, "n_layers": 1, "d_model": D_IN},
        "clamp": clamp_cfg,
        "recovery": {"steps": 10, "lr": 0.1, "budget": 20.0, "eta": 0.0, "reclamp": False, "rcond": None},
        "modes": list(MODES),
        "delta_site": HOOK,
    }
    a = site.encoder_columns(features)
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, model_dtype)
    with RunDirectory(out, config=config) as run:
        for mode in MODES:
            for i in range(n):
                eid = f"ex{i:02d}"
                rec = {"schema": 1, "example_id": eid, "mode": mode, "valid": i != 0, "base_score": 1.0,
                       "defended_score": -1.0, "recovered": None, "failed": False, "error": None}
                if i == 1:
                    rec.update(failed=True, error="non-finite loss or gradient: nan")
                if rec["valid"] and not rec["failed"]:
                    h_def = (torch.randn(rows, D_IN, generator=g) * 2.0).to(dt).float()
                    delta = torch.randn(rows, D_IN, generator=g) * 0.7
                    if mode == "encoder":
                        delta = null_space_rows(a, delta)
                    h_rec = (h_def + delta).to(dt).float()
                    feats = clamped_features(site, features, h_def, h_rec)
                    recovered = bool(i % 3)
                    metrics = example_metrics(site=site, features=features, feats=feats, delta_rows=delta,
                                              h_def_rows=h_def, a=a, recovered=recovered, eta=0.0)
                    rec.update(recovered=recovered, recovered_score=0.5, steps=10, **metrics)
                    run.save_tensors(mode, eid, {"delta": delta, "rows": torch.arange(rows), "h_def": h_def,
                                                 "z_def": feats.z_def, "z_rec": feats.z_rec})
                run.append_record(rec)
        from saerecover.runs.stats import summarize

        run.write_summary(summarize(run.records(), task="synthetic", modes=list(MODES)))
    return out


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    return save_sae(tmp_path_factory.mktemp("sae") / "sae")


@pytest.fixture()
def run_dir(tmp_path, sae_dir) -> Path:
    return build_run(tmp_path / "run", sae_dir)


def analyze_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_analyze_parser(parser.add_subparsers(dest="command"))
    return cmd_analyze(parser.parse_args(["analyze", *argv]))


def no_model(monkeypatch) -> None:
    """Any attempt to load a model fails the test."""
    import saerecover.models
    import transformers

    def boom(*a, **k):
        raise AssertionError("the analysis must not load a model")

    monkeypatch.setattr(saerecover.models, "load_model", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    try:
        import transformer_lens

        monkeypatch.setattr(transformer_lens.HookedTransformer, "from_pretrained", boom)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------------------------


def test_analyze_reproduces_recorded_metrics_without_loading_the_model(run_dir, monkeypatch):
    no_model(monkeypatch)
    result = analyze_run(run_dir)
    assert result.ok, result.mismatches
    assert result.n_examples == 2 * 4  # ex00 invalid, ex01 failed
    assert [s["example_id"] for s in result.skipped] == ["ex01", "ex01"]
    names = {"activation_drift", "decode_drift", "relative_drift", "floor_violation", "reactivated_fraction",
             "reactivated_fraction_eligible", "zero_reactivation", "delta_norm", "relative_delta_norm", "c1_residual", "z_def", "z_rec"}
    for mode in MODES:
        checks = result.modes[mode]["checks"]
        assert set(checks) == names
        for name, c in checks.items():
            assert c["n"] == 4 and c["n_mismatch"] == 0
            assert c["max_abs"] <= 1e-5 or c["max_rel"] <= 1e-5, (mode, name, c)
    # the encoder-mode deltas satisfy C1; the unprojected ones do not
    enc = [ex for ex in result.examples if ex["mode"] == "encoder"]
    assert max(ex["checks"]["c1_residual"]["recomputed"] for ex in enc) < 1e-5
    assert max(ex["checks"]["activation_drift"]["recomputed"] for ex in enc) < 1e-4
    assert json.loads(json.dumps(result.to_dict()))["ok"] is True


def test_encoder_null_share_uses_the_rust_core(run_dir):
    result = analyze_run(run_dir)
    assert result.modes["encoder"]["encoder_null_share_min"] == pytest.approx(1.0, abs=1e-5)
    assert result.modes["none"]["encoder_null_share_mean"] < 0.999


def test_cli_ok_writes_analysis_json(run_dir, capsys, monkeypatch):
    no_model(monkeypatch)
    assert analyze_cli([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "recovery-path decomposition" in out
    data = json.loads((run_dir / "analysis.json").read_text())
    assert data["ok"] is True
    assert set(data["modes"]) == set(MODES)
    dec = data["modes"]["none"]["decomposition"]
    assert set(dec) == set(COMPONENTS)
    assert dec["delta"]["share_mean"] == pytest.approx(1.0, rel=1e-6)


def tamper(run_dir: Path, eid: str, mode: str, key: str, factor: float) -> None:
    path = run_dir / "records.jsonl"
    lines = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["example_id"] == eid and rec["mode"] == mode:
            rec[key] = rec[key] * factor
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")


def test_tampered_record_is_detected_and_named(run_dir, tmp_path, capsys):
    tamper(run_dir, "ex03", "none", "decode_drift", 1.001)
    result = analyze_run(run_dir)
    assert not result.ok
    assert [(m["example_id"], m["mode"], m["name"]) for m in result.mismatches] == [("ex03", "none", "decode_drift")]
    report = tmp_path / "a.json"
    assert analyze_cli([str(run_dir), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: decode_drift of example 'ex03' (mode none)" in out
    assert "FAILED" in out
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["mismatches"][0]["name"] == "decode_drift"
    assert json.loads((run_dir / "analysis.json").read_text())["ok"] is False
    # a looser tolerance accepts the 0.1% change
    assert analyze_cli([str(run_dir), "--atol", "1e-2", "--no-save"]) == 0


def test_tampered_tensor_and_boolean_are_detected(run_dir):
    from safetensors.torch import load_file, save_file

    path = run_dir / "tensors" / "none" / "ex02.safetensors"
    t = load_file(path)
    t["z_rec"] = t["z_rec"] + 0.01
    save_file(t, path)
    recs = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]
    target = next(r for r in recs if r["example_id"] == "ex05" and r["mode"] == "none")
    target["zero_reactivation"] = not target["zero_reactivation"]
    (run_dir / "records.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    bad = {(m["example_id"], m["name"]) for m in analyze_run(run_dir).mismatches}
    assert bad == {("ex02", "z_rec"), ("ex05", "zero_reactivation")}


def test_missing_tensors_fail_the_analysis(run_dir, capsys):
    (run_dir / "tensors" / "encoder" / "ex02.safetensors").unlink()
    result = analyze_run(run_dir)
    assert not result.ok and "ex02" in result.problems[0]
    assert analyze_cli([str(run_dir), "--no-save"]) == 1
    assert "PROBLEM" in capsys.readouterr().out


def test_sae_source_override_and_missing_source(tmp_path, sae_dir, capsys):
    run = build_run(tmp_path / "run", sae_dir, sae_source="")
    assert analyze_cli([str(run), "--no-save"]) == 2
    assert "--sae" in capsys.readouterr().err
    assert analyze_cli([str(run), "--no-save", "--sae", str(sae_dir)]) == 0
    moved = build_run(tmp_path / "run2", sae_dir, sae_source=str(tmp_path / "gone" / "sae"))
    assert analyze_cli([str(moved), "--no-save"]) == 2  # a local path that is gone: never a download
    assert "does not exist here" in capsys.readouterr().err


def test_bf16_model_rounding_is_reproduced(tmp_path, sae_dir):
    run = build_run(tmp_path / "run", sae_dir, model_dtype="bfloat16")
    assert analyze_run(run).ok


@pytest.mark.parametrize("run_centred", [True, False])
def test_center_input_sae(tmp_path, run_centred):
    """An SAE that expects centred residuals: the run centred (HF backend) or the backend had
    centred the weights (center_input False); the analysis finds which from the saved z_def."""
    sae_dir = save_sae(tmp_path / "sae_c", seed=3, center=True)
    assert load_site(sae_dir).center_input
    run = build_run(tmp_path / "run", sae_dir, center_input=run_centred)
    result = analyze_run(run)
    assert result.ok, result.mismatches
    assert result.site["center_input"]["value"] is run_centred
    # C1 holds for the centred encoder columns the run used
    enc = [ex for ex in result.examples if ex["mode"] == "encoder"]
    assert max(ex["checks"]["c1_residual"]["recomputed"] for ex in enc) < 1e-5


def test_recorded_center_input_wins(tmp_path):
    sae_dir = save_sae(tmp_path / "sae_c", seed=3, center=True)
    run = build_run(tmp_path / "run", sae_dir, center_input=False)
    cfg = json.loads((run / "config.json").read_text())
    cfg["clamp"][0]["center_input"] = True  # claims the opposite of what the run did
    (run / "config.json").write_text(json.dumps(cfg))
    result = analyze_run(run)
    assert result.site["center_input"] == {"value": True, "from": "config"}
    assert not result.ok  # so z_def no longer matches


def test_locked_run_writes_only_to_json(run_dir, tmp_path, capsys):
    cfg = {k: v for k, v in json.loads((run_dir / "config.json").read_text()).items()
           if k not in ("run_schema", "saerecover_version", "versions", "created", "config_hash", "resumed")}
    with RunDirectory(run_dir, config=cfg):  # a "running" writer holds the lock
        assert analyze_cli([str(run_dir)]) == 2
        assert "being written" in capsys.readouterr().err
        side = tmp_path / "side.json"
        assert analyze_cli([str(run_dir), "--json", str(side)]) == 0
        assert side.is_file() and not (run_dir / "analysis.json").exists()
        result = analyze_run(run_dir)
        with pytest.raises(Exception, match="running process"):
            result.write()
    result.write()
    assert (run_dir / "analysis.json").is_file()


# --------------------------------------------------------------------------------------------
# the decomposition


@pytest.fixture()
def site(sae_dir) -> Site:
    return load_site(sae_dir)


def test_decomposition_identities(site):
    g = torch.Generator().manual_seed(0)
    h_def = torch.randn(4, D_IN, generator=g) * 2
    delta = torch.randn(4, D_IN, generator=g)
    d = decompose(site, torch.tensor(FEATURES), h_def, delta, top_k=3)
    c = d["components"]
    assert set(c) == set(COMPONENTS)
    z_def, z_rec = site.encode(h_def), site.encode(h_def + delta)
    torch.testing.assert_close(d["dz"], z_rec - z_def)
    torch.testing.assert_close(c["sae_explained"], site.decode(z_rec) - site.decode(z_def))
    torch.testing.assert_close(c["residual"] + c["sae_explained"], delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(c["clamped"] + c["nonclamped"], c["sae_explained"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["topk_nonclamped"] + c["topk_knockout"], delta)
    # the clamped part is D_S(dz_S); the top-k features are non-clamped and ranked by ||dz_j||
    torch.testing.assert_close(c["clamped"], (z_rec - z_def)[:, FEATURES] @ site.sae.W_dec[FEATURES])
    top = d["topk_features"].tolist()
    assert len(top) == 3 and not set(top) & set(FEATURES)
    strength = d["dz"].norm(dim=0)
    strength[FEATURES] = -1
    assert top == torch.argsort(strength, descending=True)[:3].tolist()
    assert d["norms"]["delta"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert d["shares"]["delta"] == pytest.approx(1.0)
    for name in COMPONENTS:
        assert d["shares"][name] == pytest.approx(d["norms"][name] / d["norms"]["delta"], rel=1e-6)
        assert d["energy"][name] == pytest.approx(d["shares"][name] ** 2, rel=1e-6)


def test_decomposition_top_k_edges(site):
    g = torch.Generator().manual_seed(1)
    h_def, delta = torch.randn(2, D_IN, generator=g), torch.randn(2, D_IN, generator=g)
    none = decompose(site, torch.tensor(FEATURES), h_def, delta, top_k=0)
    assert float(none["components"]["topk_nonclamped"].abs().max()) == 0.0
    torch.testing.assert_close(none["components"]["topk_knockout"], delta)
    every = decompose(site, torch.tensor(FEATURES), h_def, delta, top_k=10_000)
    assert every["topk_features"].numel() == every["n_changed"] > 0
    torch.testing.assert_close(every["components"]["topk_nonclamped"], every["components"]["nonclamped"])
    zero = decompose(site, torch.tensor(FEATURES), h_def, torch.zeros_like(delta))
    assert all(v == 0.0 for v in zero["norms"].values()) and zero["n_changed"] == 0
    with pytest.raises(ValueError):
        decompose(site, torch.tensor(FEATURES), h_def, delta, top_k=-1)


def test_compare_value_rule():
    assert compare_value(1.0, 1.0 + 5e-6, atol=1e-5, rtol=1e-5)["ok"]
    assert compare_value(1e6, 1e6 + 5.0, atol=1e-5, rtol=1e-5)["ok"]  # relative
    assert compare_value(1e-9, 5e-6, atol=1e-5, rtol=1e-5)["ok"]  # absolute
    assert not compare_value(1.0, 1.001, atol=1e-5, rtol=1e-5)["ok"]
    assert compare_value(None, float("inf"), atol=0, rtol=0)["ok"]  # runs store non-finite as null
    assert not compare_value(None, 1.0, atol=0, rtol=0)["ok"]
    assert compare_value(True, True, atol=0, rtol=0)["ok"] and not compare_value(True, False, atol=1, rtol=1)["ok"]


# --------------------------------------------------------------------------------------------
# a real run: pipeline.recover on a tiny local model


def test_real_run_reanalyzes_to_1e5_and_shards_merge(tmp_path, monkeypatch):
    """recover() on a tiny GPT-2 with a centring SAE saved to disk, in both modes and over all
    positions; the run re-analyzes to 1e-5 without the model, and two shards of it merge into
    a run with the same records."""
    from dataclasses import dataclass

    from saerecover.core.defended import DefendedModel
    from saerecover.core.examples import Examples, answer_logits, pad_right
    from saerecover.experiments.merge import merge_runs
    from saerecover.experiments.pipeline import recover
    from saerecover.models import load_model
    from saerecover.testing import tiny_gpt2

    model = load_model(str(tiny_gpt2(tmp_path / "models", n_layers=2, d_model=D_IN)), device="cpu")
    sae_dir = save_sae(tmp_path / "sae", seed=5, center=True)
    site = load_site(sae_dir, model=model)
    assert site.center_input  # the HF backend does not centre: the site does
    clamp = Clamp({site: FEATURES}, value=3.0, where="all")

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 60, (int(torch.randint(4, 8, (1,), generator=g)),), generator=g).tolist()
            for _ in range(6)]
    ids, mask = pad_right(seqs, 0)
    ex = Examples(input_ids=ids, attention_mask=mask, answer_pos=mask.sum(1) - 1,
                  ids=[f"ex-{i:02d}" for i in range(6)])

    @dataclass
    class Flip:
        """margin(a, b) pushed past the midpoint between its base and defended values: every
        example is a valid flip by construction."""

        ex: Examples
        a: int = 5
        b: int = 6
        name: str = "flip"

        def examples(self) -> Examples:
            return self.ex

        def margin(self, logits, ex):
            last = answer_logits(logits, ex).float()
            return last[:, self.a] - last[:, self.b]

        def score(self, logits, ex):
            t = ex.targets
            return t["sign"].to(logits.device) * (self.margin(logits, ex) - t["mid"].to(logits.device))

        def loss(self, logits, ex):
            return -self.score(logits, ex)

        def describe(self):
            return {"name": self.name, "a": self.a, "b": self.b}

    task = Flip(ex)
    defended = DefendedModel(model, clamp)
    with torch.no_grad():
        base = task.margin(defended.forward(ex, defended=False).logits, ex)
        dfd = task.margin(defended.forward(ex).logits, ex)
    ex.targets = {"sign": torch.sign(base - dfd), "mid": (base + dfd) / 2}
    opts = dict(projection=["none", "encoder"], steps=15, lr=0.05, budget=3.0, positions="all",
                progress=False, report=False, batch_size=4)
    run = recover(model, clamp, task, out=tmp_path / "run", **opts)
    assert run.summary["modes"]["encoder"]["n_evaluated"] >= 4

    no_model(monkeypatch)
    result = analyze_run(tmp_path / "run")
    assert result.ok, result.mismatches
    assert result.site["center_input"]["value"] is True
    for mode in ("none", "encoder"):
        for name, c in result.modes[mode]["checks"].items():
            assert c["max_abs"] <= 1e-5 or c["max_rel"] <= 1e-5, (mode, name, c)
    assert result.modes["encoder"]["encoder_null_share_min"] == pytest.approx(1.0, abs=1e-5)
    monkeypatch.undo()

    for index in range(2):
        recover(model, clamp, task, out=tmp_path / f"shard{index}", shard=(index, 2), **opts)
    merged = merge_runs(tmp_path / "merged", [tmp_path / "shard0", tmp_path / "shard1"], report=False)
    assert analyze_run(merged).ok
    key = lambda r: (r["example_id"], r["mode"])  # noqa: E731
    whole = sorted(open_run(tmp_path / "run").records(), key=key)
    joined = sorted(open_run(merged).records(), key=key)
    assert [key(r) for r in whole] == [key(r) for r in joined]
    for a, b in zip(whole, joined):
        assert a["valid"] == b["valid"] and a.get("recovered") == b.get("recovered")
        for m in ("delta_norm", "activation_drift", "c1_residual"):
            if a.get(m) is not None:
                assert b[m] == pytest.approx(a[m], rel=1e-4, abs=1e-6), (key(a), m)
