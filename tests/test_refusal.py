"""The refusal pipeline: request loading, the Refusal task (teacher-forced score, the judge's
generation under clamp + delta, notes in records), refusal-feature contrast and the
mean-activation clamp, the soft-suffix baseline, the refusal summary, attribution replays, and
the whole pipeline on the toy world (valid flips, exact Jacobian steps, attribution counts)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from sae_lens import SAE
from saerecover.core.clamp import Clamp
from saerecover.core.config import RecoveryConfig
from saerecover.core.decomposition import COMPONENTS
from saerecover.core.defended import DefendedModel
from saerecover.core.sites import load_site
from saerecover.data.requests import load_requests
from saerecover.experiments.refusal import build_setting, refusal_summary, run_refusal
from saerecover.experiments.suffix import SuffixSettings, placeholder_token, recover_suffix, suffix_examples
from saerecover.models import load_model
from saerecover.models.generation import generate
from saerecover.tasks.refusal import judge as rt
from saerecover.tasks.refusal.features import mean_activation_clamp, refusal_contrast, select_refusal_features
from saerecover.tasks.refusal.task import DEFAULT_TEMPLATE, Refusal
from saerecover.testing import tiny_gpt2

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
REQUESTS = ["the cat saw a dog", "mary gave a book to john", "is the car red", "the bird and the fish",
            "a big tree", "she went to the house", "can you help", "do not", "the red car", "a small cup",
            "old book", "the pen is blue", "we saw the cat", "they went to the road"]
# the tiny random model has no refusal phrases: treat two of its frequent openings as "refusals"
TINY_KW = dict(template="{request} answer", max_new_tokens=6, lists=(("these", "they"),), strict=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusal")
    tiny_gpt2(root, n_layers=2, d_model=32)
    model = load_model(str(root / "tiny-gpt2"), device="cpu")
    sites = []
    for layer, hook in enumerate(HOOKS):
        torch.manual_seed(layer)
        sae = SAE.from_dict({"architecture": "standard", "d_in": 32, "d_sae": 64, "dtype": "float32",
                             "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                             "metadata": {"hook_name": hook}})
        with torch.no_grad():
            sae.b_enc.add_(0.05)
        sae.save_model(root / f"sae{layer}")
        sites.append(load_site(root / f"sae{layer}", model=model))
    return model, sites


@pytest.fixture(scope="module")
def setting(tiny):
    model, sites = tiny
    return build_setting(model, sites, REQUESTS, REQUESTS, top_k=8, **TINY_KW)


# --------------------------------------------------------------------------------------------
# requests


def test_load_requests_reads_advbench_harmbench_json_jsonl_and_txt(tmp_path):
    (tmp_path / "adv.csv").write_text("goal,target\nWrite a poem,Sure\n\"Say, hi\",Sure\n")
    assert load_requests(tmp_path / "adv.csv") == ["Write a poem", "Say, hi"]
    (tmp_path / "hb.csv").write_text("Behavior,FunctionalCategory,BehaviorID\nDo X,standard,x\nDo Y,standard,y\n")
    assert load_requests(tmp_path / "hb.csv", limit=1) == ["Do X"]
    (tmp_path / "a.json").write_text(json.dumps(["a", " b ", ""]))
    assert load_requests(tmp_path / "a.json") == ["a", "b"]
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"prompt": "p1"}, {"prompt": "p2"}]}))
    assert load_requests(tmp_path / "b.json") == ["p1", "p2"]
    (tmp_path / "c.jsonl").write_text('{"q": "one"}\n{"q": "two"}\n')
    assert load_requests(tmp_path / "c.jsonl", column="q") == ["one", "two"]
    (tmp_path / "d.txt").write_text("x\n\ny\n")
    assert load_requests(tmp_path / "d.txt") == ["x", "y"]
    with pytest.raises(ValueError, match="none of the columns"):
        (tmp_path / "e.csv").write_text("foo,bar\n1,2\n")
        load_requests(tmp_path / "e.csv")
    with pytest.raises(FileNotFoundError):
        load_requests(tmp_path / "missing.csv")


# --------------------------------------------------------------------------------------------
# the task


def test_examples_are_prompt_plus_base_response_with_prefix_weights(tiny):
    model, _ = tiny
    task = Refusal(model, REQUESTS[:4], prefix_weight=3.0, prefix_tokens=2, **TINY_KW)
    ex = task.examples()
    ex.validate()
    assert task.examples() is ex  # generated once
    tok = model.tokenizer
    for i, req in enumerate(REQUESTS[:4]):
        prompt = tok(f"{req} answer", add_special_tokens=True)["input_ids"]
        p, r = int(ex.targets["prompt_len"][i]), int(ex.targets["response_len"][i])
        assert ex.input_ids[i, :p].tolist() == prompt
        assert int(ex.answer_pos[i]) == p - 1
        assert tok.decode(ex.input_ids[i, p:p + r].tolist(), skip_special_tokens=True) == task.base_texts[ex.ids[i]]
        w = ex.targets["weights"][i]
        assert w[:p].eq(0).all() and w[p + r:].eq(0).all()
        assert w[p:p + 2].eq(3.0).all() and w[p + 2:p + r].eq(1.0).all()


def test_score_is_the_weighted_mean_logprob_and_loss_adds_the_refusal_term(tiny):
    model, _ = tiny
    task = Refusal(model, REQUESTS[:3], **TINY_KW)
    ex = task.examples()
    logits, _ = model.forward(ex.input_ids, ex.attention_mask)
    logp = torch.log_softmax(logits.float(), -1)
    for i in range(3):
        p, r = int(ex.targets["prompt_len"][i]), int(ex.targets["response_len"][i])
        lp = torch.stack([logp[i, t - 1, ex.input_ids[i, t]] for t in range(p, p + r)])
        w = ex.targets["weights"][i, p:p + r]
        torch.testing.assert_close(task.score(logits, ex)[i], (lp * w).sum() / w.sum())
    assert (task.score(logits, ex) <= 0).all()
    ids = task.refusal_prefix_ids
    assert set(ids.tolist()) == {model.tokenizer.convert_tokens_to_ids(w) for w in ("these", "they")}
    harsh = Refusal(model, REQUESTS[:3], discourage_refusal=0.5, **TINY_KW)
    harsh._examples, harsh.base_texts = ex, task.base_texts
    extra = harsh.loss(logits, ex) - task.loss(logits, ex)
    torch.testing.assert_close(extra, 0.5 * harsh.refusal_logprob(logits, ex))
    assert (extra < 0).all()  # log-probabilities


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny):
    model, _ = tiny
    tok = model.tokenizer
    old = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }} answer{% endfor %}"
        task = Refusal(model, ["the cat"], max_new_tokens=2)
        assert task.use_chat and task.prompt_text("the cat") == "the cat answer"
        assert Refusal(model, ["the cat"], template="{request}", max_new_tokens=2).use_chat is False
    finally:
        tok.chat_template = old
    assert Refusal(model, ["the cat"], max_new_tokens=2).prompt_text("x") == DEFAULT_TEMPLATE.format(request="x")
    with pytest.raises(ValueError, match="chat template"):
        Refusal(model, ["the cat"], template="chat")
    with pytest.raises(ValueError, match="request"):
        Refusal(model, ["the cat"], template="no slot")


def test_judge_generates_with_clamp_and_delta_consistently_with_the_defended_forward(tiny, setting):
    model, _ = tiny
    task, clamp = setting.task, setting.clamp
    dm = DefendedModel(model, clamp)
    ex = task.examples()
    n, seq = ex.input_ids.shape
    delta = torch.randn(n, seq, model.d_model, generator=torch.Generator().manual_seed(0)) * 2.0
    delta = delta * ex.position_mask("prompt").unsqueeze(-1)
    site = clamp.site_clamps[0].site.hook_name
    for with_clamp, deltas in ((True, None), (True, {site: delta}), (False, {site: delta})):
        edits = task.edits(dm, ex, with_clamp=with_clamp, deltas=deltas, reclamp=False)

        gen = generate(model, task.prompts_of(ex), edits=edits, max_new_tokens=1, output_scores=True)
        # causal: the teacher-forced logits at the last prompt token see the prompt only
        logits = dm.forward(ex, deltas, defended=with_clamp).logits
        ref = logits[torch.arange(n), ex.answer_pos]
        torch.testing.assert_close(gen.scores[:, 0], ref, atol=1e-4, rtol=1e-4)
    # the base stage uses the stored base response; a judged batch returns +-1
    base = task.judge(dm, ex, with_clamp=False)
    assert set(base.tolist()) <= {-1.0, 1.0} and (base > 0).all()  # only answered requests were kept


def test_notes_reach_record_fields_without_generations_by_default(tiny, setting):
    model, _ = tiny
    task = setting.task
    dm = DefendedModel(model, setting.clamp)
    ex = task.examples()
    task.judge(dm, ex, with_clamp=True)
    eid = ex.ids[0]
    fields = task.record_fields(eid, "flips")
    assert set(fields["notes"]) == {"base", "defended"}
    for note in fields["notes"].values():
        assert note["category"] in rt.CATEGORIES and len(note["opening_sha256"]) == 64
        assert "text" not in note
    assert "base_like" in fields["notes"]["defended"] and "base_like_strict" in fields["notes"]["defended"]
    assert "non_refusal" not in fields
    site = setting.clamp.site_clamps[0].site.hook_name
    task.judge(dm, ex, with_clamp=True, deltas={site: torch.zeros(len(ex), ex.input_ids.shape[1], model.d_model)})
    fields = task.record_fields(eid, "recovered")
    assert set(fields["notes"]) == {"base", "defended", "recovered"}
    assert isinstance(fields["non_refusal"], bool) and isinstance(fields["base_like_strict"], bool)
    keep = Refusal(model, REQUESTS[:2], store_generations=True, **TINY_KW)
    keep.examples()
    assert keep.notes(keep.ids[0])["base"]["text"] == keep.base_texts[keep.ids[0]]


# --------------------------------------------------------------------------------------------
# features and clamp


def test_contrast_is_refused_minus_answered_mean_and_the_clamp_sets_refused_means(tiny, setting):
    model, sites = tiny
    ctask = Refusal(model, REQUESTS, **TINY_KW)
    refused = torch.nonzero(ctask.base_refused()).flatten().tolist()
    answered = torch.nonzero(ctask.base_answered()).flatten().tolist()
    assert refused and answered
    contrast = refusal_contrast(model, sites, ctask.prompt_examples(refused), ctask.prompt_examples(answered))
    # the refused mean by hand at the first site: every prompt token counts once
    pex = ctask.prompt_examples(refused)
    _, cap = model.forward(pex.input_ids, pex.attention_mask, capture=(HOOKS[0],))
    z = sites[0].encode(cap[HOOKS[0]])[pex.attention_mask.bool()]
    torch.testing.assert_close(contrast[HOOKS[0]].refused_mean, z.mean(0), atol=1e-5, rtol=1e-5)
    feats = select_refusal_features(contrast, 5)
    for hook, f in feats.items():
        assert f.numel() == 5 and (contrast[hook].contrast[f] > 0).all()
        assert contrast[hook].contrast[f].min() >= contrast[hook].contrast.sort(descending=True).values[4] - 1e-6
    clamp = mean_activation_clamp(contrast, feats)
    assert isinstance(clamp, Clamp) and len(clamp) == 2
    for sc in clamp.site_clamps:
        assert sc.mode == "set" and sc.where == "all"
        torch.testing.assert_close(sc.value, contrast[sc.site.hook_name].refused_mean[sc.features])
    given = select_refusal_features(contrast, 5, features={HOOKS[0]: [1, 2]})
    assert given[HOOKS[0]].tolist() == [1, 2] and given[HOOKS[1]].numel() == 5
    # the setting keeps only requests the base model answers
    assert setting.task.base_answered().all()


# --------------------------------------------------------------------------------------------
# suffix baseline and summary


def test_suffix_examples_insert_placeholders_between_prompt_and_response(tiny, setting):
    model, _ = tiny
    task = setting.task
    ex = task.examples()
    tok = placeholder_token(model.tokenizer, "a")
    sx, start = suffix_examples(task, ex, 3, tok)
    sx.validate()
    for i in range(len(ex)):
        p, r = int(ex.targets["prompt_len"][i]), int(ex.targets["response_len"][i])
        assert int(start[i]) == p and int(sx.targets["prompt_len"][i]) == p + 3
        row = sx.input_ids[i].tolist()
        assert row[:p] == ex.input_ids[i, :p].tolist() and row[p:p + 3] == [tok] * 3
        assert row[p + 3:p + 3 + r] == ex.input_ids[i, p:p + r].tolist()


def test_suffix_recovery_acts_only_on_suffix_rows_within_budget(tiny, setting):
    model, _ = tiny
    dm = DefendedModel(model, setting.clamp)
    ex = setting.task.examples().select([0, 1])
    cfg = RecoveryConfig(steps=3, lr=0.2, budget=1.5, positions="prompt")
    ocs = recover_suffix(dm, setting.task, ex, cfg=cfg, n_suffix=4, token="a")
    for oc, p in zip(ocs, ex.targets["prompt_len"].tolist()):
        assert oc.tensors["rows"].tolist() == list(range(p, p + 4))
        assert oc.metrics["delta_norm"] <= 1.5 + 1e-5
        assert math.isfinite(oc.metrics["phi_relative_drift"]) and oc.metrics["phi_relative_drift"] >= 0
        assert len(oc.history) == 3


def test_suffix_norm_penalty_has_a_finite_gradient_at_zero(tiny, setting):
    """lambda_delta * ||delta|| is evaluated first at delta = 0, where sqrt of the sum of squares has
    a NaN gradient; the suffix delta then became NaN after one step (Adam and SGD alike)."""
    model, _ = tiny
    dm = DefendedModel(model, setting.clamp)
    ex = setting.task.examples().select([0])
    cfg = RecoveryConfig(steps=2, lr=0.2, budget=1.5, positions="prompt", lambda_delta=1.0)
    (oc,) = recover_suffix(dm, setting.task, ex, cfg=cfg, n_suffix=2, token="a")
    assert bool(torch.isfinite(oc.tensors["delta"]).all())
    assert 0 < oc.metrics["delta_norm"] <= 1.5 + 1e-5


def test_refusal_summary_counts_and_wilson_intervals():
    recs = [{"example_id": f"e{i}", "mode": "jacobian", "valid": True, "non_refusal": i < 3, "base_like": i < 1,
             "base_like_strict": False, "phi_relative_drift": 0.1 * i, "jacobian_step_residual": 1e-7}
            for i in range(4)]
    recs.append({"example_id": "x", "mode": "jacobian", "valid": False})
    s = refusal_summary(recs)["jacobian"]
    assert s["n_valid"] == 4 and s["non_refusal"] == 3 and s["base_like"] == 1 and s["base_like_strict"] == 0
    assert s["non_refusal_rate"] == 0.75
    lo, hi = s["non_refusal_rate_ci95"]
    assert 0.0 < lo < 0.75 < hi <= 1.0
    assert s["base_like_strict_rate_ci95"][0] == 0.0
    assert abs(s["phi_relative_drift_mean"] - 0.15) < 1e-12 and s["jacobian_step_residual_max"] == 1e-7


def test_run_refusal_on_a_tiny_model_writes_notes_and_every_mode(tiny, setting, tmp_path):
    model, _ = tiny
    out = tmp_path / "run"
    res = run_refusal(model, setting.clamp, setting.task, modes=["none", "jacobian", "suffix"], out=out,
                      steps=3, lr=0.1, budget=3.0, batch_size=4, progress=False,
                      suffix=SuffixSettings(n_suffix=2, token="a"))
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in recs} == {"none", "jacobian", "suffix"}
    assert len(recs) == 3 * len(setting.task.requests)
    assert all("notes" in r and "base" in r["notes"] for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["modes"]) == ["none", "jacobian", "suffix"]
    for m in summary["modes"].values():
        assert "non_refusal_rate" in m and "base_like_rate_ci95" in m and "phi_relative_drift_mean" in m
    assert "## Refusal" in (out / "report.md").read_text()
    assert res.flips is not None


def test_packed_jacobians_span_the_same_rows_as_one_vjp_per_coordinate(tiny, setting):
    from saerecover import linalg
    from saerecover.core.projection import (
        batched_vjp_jacobian,
        defended_feature_parts,
        example_jacobians,
        packed_jacobians,
    )

    model, _ = tiny
    clamp = setting.clamp
    dm = DefendedModel(model, clamp)
    ex = setting.task.examples().select([0, 1, 2])
    mask = ex.position_mask("prompt")
    phi_mask = ex.attention_mask.bool()
    sites = [sc.site.hook_name for sc in clamp.site_clamps]
    delta = (0.1 * torch.randn(*ex.input_ids.shape, model.d_model) * mask.unsqueeze(-1)).requires_grad_(True)
    out = dm.forward(ex, {sites[0]: delta}, track=tuple(sites))
    parts = defended_feature_parts(clamp, out.sites, sites, phi_mask)
    phi = torch.cat(parts, dim=1)
    full = example_jacobians(batched_vjp_jacobian(phi, {sites[0]: delta}, torch.arange(phi.shape[1])), mask)
    packed = packed_jacobians(parts, {sites[0]: delta}, mask, [True, True], phi_mask=phi_mask)
    for b in range(3):
        assert packed[b].shape[0] == int((phi[b] != 0).sum()) < full[b].shape[0]
        # every row of the full J lies in the packed J's row space, and the dropped rows are zero
        rest = linalg.jacobian_null_project(packed[b].double(), full[b].double())
        assert float(rest.norm()) <= 1e-10 * float(full[b].norm())
        dropped = full[b][(phi[b] == 0)]
        assert float(dropped.abs().max()) == 0.0


# --------------------------------------------------------------------------------------------
# the toy world: the whole pipeline through the CLI handlers, once

TOY_ARGS = ["--n", "5", "--n-contrast", "24", "--steps", "30", "--lr", "0.3", "--budget", "40",
            "--max-new-tokens", "12", "--quiet"]
MODES = ("none", "encoder", "jacobian", "sketch", "suffix")


def _toy_world():
    from saerecover import toy

    return toy.load(device="cpu")  # shipped with the package: missing weights are a failure


def _cli(argv):
    from saerecover.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    _toy_world()
    out = tmp_path_factory.mktemp("toy-refusal") / "run"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    assert _cli(["run", "refusal", *TOY_ARGS, "--out", str(out)]) == 0
    seconds = time.perf_counter() - t0
    return out, seconds


def _records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_toy_refusal_runs_every_mode_on_the_same_valid_flips(toy_run):
    out, _ = toy_run
    summary = json.loads((out / "summary.json").read_text())
    modes = summary["modes"]
    assert list(modes) == list(MODES)
    n_valid = modes["none"]["n_valid"]
    assert n_valid >= 3, "the two-site mean-activation clamp should make most answered requests refuse"
    recs = _records(out)
    valid_ids = {m: sorted(r["example_id"] for r in recs if r["mode"] == m and r["valid"]) for m in MODES}
    assert all(ids == valid_ids["none"] for ids in valid_ids.values())
    for m in MODES:
        row = modes[m]
        assert row["n_valid"] == n_valid and row["non_refusal"] <= n_valid
        for key in ("non_refusal_rate", "base_like_rate"):
            lo, hi = row[f"{key}_ci95"]
            assert 0.0 <= lo <= row[key] <= hi <= 1.0
        assert row["phi_relative_drift_mean"] is not None and row["phi_relative_drift_ci95"] is not None
    assert sum(modes[m]["non_refusal"] for m in MODES) >= 1, "nothing recovered in any mode"
    assert "## Refusal" in (out / "report.md").read_text()


def test_toy_refusal_constraints_hold_where_they_should(toy_run):
    out, _ = toy_run
    recs = [r for r in _records(out) if r["valid"]]
    by = {m: [r for r in recs if r["mode"] == m] for m in MODES}
    # exact Jacobian mode: every step's first-order change of the defended features vanishes
    assert max(r["jacobian_step_residual"] for r in by["jacobian"]) <= 1e-5
    # encoder mode: C1 to round-off, so the delta site's clamped features do not move
    assert max(r["c1_residual"] for r in by["encoder"]) <= 1e-6
    assert max(r["relative_drift"] for r in by["encoder"]) <= 1e-4
    assert min(r["c1_residual"] for r in by["none"]) > 1e-3
    # Phi over both clamped layers: the exact Jacobian keeps it far closer than no projection,
    # the encoder constraint (one layer) or the sketch
    mean = {m: sum(r["phi_relative_drift"] for r in by[m]) / len(by[m]) for m in MODES}
    assert mean["jacobian"] < 0.5 * mean["none"]
    assert mean["jacobian"] < mean["encoder"] and mean["jacobian"] < mean["sketch"]
    for r in recs:
        if r["mode"] != "suffix":
            assert r["delta_norm"] <= 40.0 * (1 + 1e-5)


def test_toy_refusal_records_hold_hashes_not_texts(toy_run):
    from saerecover.data.requests import request_hash, toy_requests

    out, _ = toy_run
    config_text = (out / "config.json").read_text()
    requests = toy_requests(5, harmful=False, seed=0)
    assert not any(r in config_text for r in requests)
    config = json.loads(config_text)
    assert config["task"]["source"] == {"kind": "toy", "n": 5, "seed": 0}
    assert set(config["task"]["request_sha256"]) <= {request_hash(r) for r in requests}
    recs = _records(out)
    for r in recs:
        for stage, note in r["notes"].items():
            assert "text" not in note and len(note["opening_sha256"]) == 64
            assert note["category"] in rt.CATEGORIES
    for r in recs:
        if r["valid"]:
            assert r["notes"]["base"]["category"] == "non_refusal" and not r["notes"]["defended"]["answered"]
            assert r["non_refusal"] == r["notes"]["recovered"]["answered"] == r["recovered"]
    all_text = "".join((out / f).read_text() for f in ("records.jsonl", "summary.json", "report.md", "report.html"))
    assert "Sure , here is how to" not in all_text and not any(q in all_text for q in requests)


def test_toy_refusal_run_resumes_without_redoing_work(toy_run):
    out, seconds = toy_run
    before = (out / "records.jsonl").read_text()
    t0 = time.perf_counter()
    assert _cli(["run", "refusal", *TOY_ARGS, "--out", str(out)]) == 0
    assert (out / "records.jsonl").read_text() == before
    assert time.perf_counter() - t0 < seconds


def test_toy_refusal_attribution_replays_every_component(toy_run, capsys):
    from saerecover.experiments.attribution import ATTRIBUTION_FILE

    out, _ = toy_run
    assert _cli(["attribute", str(out), "--top-k", "8"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / ATTRIBUTION_FILE).read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert list(data["modes"]) == ["none", "encoder", "jacobian", "sketch"]  # the suffix has no SAE site
    total = 0
    for mode, agg in data["modes"].items():
        assert agg["n"] == summary["modes"][mode]["non_refusal"]
        assert list(agg["components"]) == list(COMPONENTS)
        comp = agg["components"]
        if agg["n"]:
            # the full delta, replayed alone under the clamp, recovers (nearly) every example again
            assert comp["delta"]["recovered"] >= agg["n"] - 1
            assert abs(comp["delta"]["share_mean"] - 1.0) < 1e-6
        total += agg["n"]
    assert total >= 1
    enc = data["modes"]["encoder"]
    if enc["n"]:  # C1: the clamped part of dz at the delta site is round-off
        assert enc["components"]["clamped"]["share_mean"] < 1e-4
    for ex in data["examples"]:
        assert set(ex["replay"]) == set(COMPONENTS) and set(ex["norms"]) == set(COMPONENTS)
    assert (out / "plots" / "attribution.png").stat().st_size > 1000
    assert "topk_knockout" in printed


def test_toy_refusal_report_html_in_a_headless_browser(toy_run, tmp_path):
    """The refusal run's report.html as a person opens it (after the attribution above, which
    rewrites the report): no console error, the tables and decoded figures, the refusal section,
    the attribution when there is one, and a screenshot that is not blank
    (tmp_path/refusal_report.png)."""
    import browser

    out, _ = toy_run
    page = browser.check_report_page(out / "report.html", tmp_path / "refusal_report.png")
    assert "<h2>Refusal</h2>" in page.dom and "phi relative drift" in page.dom
    if (out / "attribution.json").is_file():
        assert "<h2>Recovery-path attribution</h2>" in page.dom and 'alt="attribution"' in page.dom


def test_cli_errors_are_one_line(tmp_path, capsys):
    from saerecover.cli import main

    assert main(["attribute", str(tmp_path / "missing")]) == 2
    assert main(["run", "refusal", "--modes", "none,bogus", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("saerecover: error: ") for line in err)
    assert "bogus" in err[1]


def test_refusal_summary_reports_the_optional_counts_and_means_that_records_carry():
    # the three counts of our judge always appear (0 when no record has them); the reference's and
    # the per-rows ones, and the two stage norms, only when some valid record carries them, each on
    # its own (a missing one does not hide the next)
    recs = [{"example_id": "a", "mode": "m", "valid": True, "reference_base_like": True, "main_delta_norm": 2.0,
             "non_refusal_all_rows": True},
            {"example_id": "b", "mode": "m", "valid": True, "reference_base_like": False, "main_delta_norm": 4.0}]
    s = refusal_summary(recs)["m"]
    for key in ("non_refusal", "base_like", "base_like_strict"):
        assert (s[key], s[f"{key}_rate"], s[f"{key}_rate_ci95"][0]) == (0, 0.0, 0.0)
    assert (s["reference_base_like"], s["reference_base_like_rate"]) == (1, 0.5)
    assert s["non_refusal_all_rows"] == 1 and "non_refusal_prompt_rows" not in s
    assert "reference_non_refusal" not in s and "reference_base_like_strict" not in s
    assert (s["main_delta_norm_n"], s["main_delta_norm_mean"]) == (2, 3.0) and "anchor_delta_norm_mean" not in s
    assert s["phi_relative_drift_n"] == 0 and s["phi_relative_drift_mean"] is None
    # a mode asked for with no records: zero valid, no rates
    assert refusal_summary(recs, ["other"])["other"]["n_valid"] == 0
    assert refusal_summary(recs, ["other"])["other"]["non_refusal_rate"] is None
