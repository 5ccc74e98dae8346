"""The paper's reference choices for refusal, each on the toy world beside ours: the multiply
clamp, the two-stage delta placement (and what of it reaches the generated text), the squared
drift penalty added after the projection, the drift corrections, the reference's best
checkpoint with its fallback, and the whole run through the CLI with the reference's flags."""

from __future__ import annotations

import json
import math

import pytest
import torch
from exact_stubs import Scored
from saerecover.core.checkpoints import Checkpoints
from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.drift import drift_penalty
from saerecover.core.projection import defended_features
from saerecover.core.recovery import recover_batch
from saerecover.experiments.pipeline import find_flips
from saerecover.models.generation import generate
from saerecover.tasks.refusal.features import multiply_clamp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy():
    """The toy world's refusal setting (8 harmless requests the base model answers, 16 features
    per site at blocks.1 and blocks.2 by contrast, the mean-activation clamp)."""
    from saerecover import toy as toy_world
    from saerecover.experiments.refusal import toy_setting

    world = toy_world.load(device="cpu")
    setting = toy_setting(world, n=8, n_contrast=24, max_new_tokens=12)
    return world, setting


def _sites(setting):
    return [sc.site.hook_name for sc in setting.clamp.site_clamps]


# --------------------------------------------------------------------------------------------
# the multiply clamp


def test_multiply_clamp_multiplies_every_position_and_keeps_the_error(toy):
    world, setting = toy
    sites = {sc.site.hook_name: sc.site for sc in setting.clamp.site_clamps}
    clamp = multiply_clamp(sites, setting.features, multiplier=3.0)
    ex = setting.task.examples().select([0, 1])
    _, captured = world.model.forward(ex.input_ids, ex.attention_mask, capture=tuple(sites))
    for sc in clamp.site_clamps:
        assert (sc.mode, float(sc.value), sc.where) == ("multiply", 3.0, "all")
        h = captured[sc.site.hook_name].float()
        z = sc.site.encode(h)
        clamped = sc.apply(z)
        idx = sc.features
        # every position: z_S times 3 (zeros stay zero), the other features untouched
        torch.testing.assert_close(clamped[..., idx], 3.0 * z[..., idx], rtol=0, atol=0)
        rest = torch.ones(z.shape[-1], dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(clamped[..., rest], z[..., rest])
        assert bool((z[..., idx] > 0).any()) and bool((z[..., idx] == 0).any())
        # the SAE error is kept: h_def = h + D(clamp(z)) - D(z)
        want = h + sc.site.decode(clamped) - sc.site.decode(z)
        torch.testing.assert_close(sc.defend(h), want, rtol=1e-5, atol=1e-5)
    # multiplying the contrast features by 3 makes the toy model refuse some requests it answers
    # (measured: 4 of the 8), fewer than the mean-activation clamp (8 of 8)
    flips = find_flips(DefendedModel(world.model, clamp), setting.task, setting.task.examples())
    mean = find_flips(DefendedModel(world.model, setting.clamp), setting.task, setting.task.examples())
    assert 1 <= int(flips.valid.sum()) < int(mean.valid.sum()) == 8
    with pytest.raises(ValueError, match="no site"):
        multiply_clamp({}, setting.features)


# --------------------------------------------------------------------------------------------
# stage 1 (the answer row) and stage 2 (the response rows), each with its own budget


def test_two_stage_placement_on_the_toy_world(toy):
    world, setting = toy
    ex = setting.task.examples().select([0, 1, 2])
    dm = DefendedModel(world.model, setting.clamp)
    sites = _sites(setting)
    cfg = RecoveryConfig(anchor_steps=3, anchor_lr=0.5, anchor_budget=2.0, positions="response", response_rows=4,
                         steps=4, lr=0.5, budget=3.0, phi_positions="response")
    seen = []
    outs = recover_batch(dm, Scored(setting.task), ex, mode="none", cfg=cfg, delta_site=sites,
                         on_step=lambda step, deltas, mask: seen.append((step, {s: d.clone() for s, d in deltas.items()},
                                                                         mask.clone())))
    prompt_len = ex.targets["prompt_len"]
    for i, oc in enumerate(outs):
        p = int(prompt_len[i])
        # stage 1 at the last prompt token, stage 2 at the first 4 response tokens
        assert oc.tensors["rows"].tolist() == [p - 1, p, p + 1, p + 2, p + 3]
        # each stage at its own budget (the lr is large enough to reach it), 2 and 3: combined sqrt(13)
        assert oc.metrics["anchor_delta_norm"] == pytest.approx(2.0, rel=1e-4)
        assert oc.metrics["main_delta_norm"] == pytest.approx(3.0, rel=1e-4)
        assert oc.metrics["delta_norm"] == pytest.approx(math.sqrt(13.0), rel=1e-4)
        assert [h["stage"] for h in oc.history] == ["anchor"] * 3 + ["main"] * 4
        assert oc.steps == 7
    # the stages' masks, and the anchor delta fixed while stage 2 runs
    assert [s for s, _, _ in seen] == list(range(7))
    anchor_final = seen[2][1]
    for step, deltas, mask in seen:
        for i in range(3):
            p = int(prompt_len[i])
            rows = mask[i].nonzero().flatten().tolist()
            assert rows == ([p - 1] if step < 3 else [p, p + 1, p + 2, p + 3])
            for s in sites:
                if step >= 3:
                    assert torch.equal(deltas[s][i, p - 1], anchor_final[s][i, p - 1])
                else:
                    assert float(deltas[s][i, p:].abs().max()) == 0.0
    # the reference's relative delta norm: the stage-2 delta against the defended features at the
    # response rows of every clamped layer
    phi_mask = ex.position_mask("response", 4)
    with torch.no_grad():
        ref = defended_features(setting.clamp, dm.forward(ex, track=tuple(sites)).sites, sites, phi_mask)
    for i, oc in enumerate(outs):
        assert oc.metrics["relative_delta_norm_phi"] == pytest.approx(3.0 / float(ref[i].norm()), rel=1e-4)


def test_answer_deltas_never_reach_the_reference_generation(toy):
    """With a KV cache the reference's generation applies the stage-1 anchor delta only: its
    stage-2 deltas sit at response positions, which the cached decoding never runs as rows of
    the prompt. ``generation_deltas="prompt"`` replicates that; "all" applies every row at its
    position (the generated token there), KV-cache correct."""
    world, setting = toy
    task = setting.task
    ex = task.examples().select([0, 1, 2, 3])
    dm = DefendedModel(world.model, setting.clamp)
    sites = _sites(setting)
    n, width = ex.input_ids.shape
    prompt_len = ex.targets["prompt_len"]
    cols = torch.arange(width).unsqueeze(0)
    response = ((cols >= prompt_len.unsqueeze(1)) & (cols < prompt_len.unsqueeze(1) + 6)).unsqueeze(-1)
    anchor = (cols == prompt_len.unsqueeze(1) - 1).unsqueeze(-1)
    g = torch.Generator().manual_seed(0)
    big = {s: torch.randn(n, width, world.model.d_model, generator=g) * 3.0 for s in sites}
    answer_only = {s: big[s] * response for s in sites}
    both = {s: big[s] * (response | anchor) for s in sites}
    anchor_only = {s: big[s] * anchor for s in sites}
    clamped = task.generate_texts(dm, ex, with_clamp=True)
    assert task.generate_texts(dm, ex, with_clamp=True, deltas=answer_only, rows="prompt") == clamped
    assert (task.generate_texts(dm, ex, with_clamp=True, deltas=both, rows="prompt")
            == task.generate_texts(dm, ex, with_clamp=True, deltas=anchor_only, rows="prompt"))
    applied = task.generate_texts(dm, ex, with_clamp=True, deltas=answer_only, rows="all")
    assert applied != clamped
    # "all" is the cached generation of the same edits as a full re-run at every step
    edits = task.edits(dm, ex, with_clamp=True, deltas=answer_only, reclamp=False, rows="all")
    uncached = generate(world.model, task.prompts_of(ex), edits=edits, max_new_tokens=task.max_new_tokens,
                        pad_token_id=task._pad(), use_cache=False)
    assert uncached.decode(task.tokenizer) == applied
    # the judge of a recovered response notes both generations
    task.judge(dm, ex, with_clamp=True, deltas=answer_only)
    for i, eid in enumerate(ex.ids):
        note = task.notes(eid)["recovered"]
        assert note["answered_prompt_rows"] == note["answered"] == task.answered(clamped[i])
        assert note["answered_all_rows"] == task.answered(applied[i])
        fields = task.record_fields(eid, "recovered")
        assert fields["non_refusal_all_rows"] == note["answered_all_rows"]
    # a delta on prompt rows only: one generation, no variant fields
    task.judge(dm, ex, with_clamp=True, deltas=anchor_only)
    assert "answered_all_rows" not in task.notes(ex.ids[0])["recovered"]


# --------------------------------------------------------------------------------------------
# the drift penalty: squared per layer, after the projection; the drift corrections


def test_relative_mse_is_the_per_site_squared_drift_mean_over_sites():
    phi_mask = torch.tensor([[True, True, False], [True, False, False]])
    # two sites with 1 and 2 features, (n, seq * k), zero outside phi_mask
    ref = [torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 0.0]]),
           torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0, 0.0, 0.0]])]
    cur = [torch.tensor([[2.0, 2.0, 0.0], [2.0, 0.0, 0.0]]),
           torch.tensor([[1.0, 1.0, 1.0, 3.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0, 0.0, 0.0]])]
    got = drift_penalty(cur, ref, phi_mask, "relative_mse")
    # example 0: site 1 mse 1/2 over mean(ref^2) 5/2; site 2 mse 4/4 over 4/4 -> (0.2 + 1) / 2
    # example 1: site 1 0 / 4; site 2 (4/2) / (25/2) = 0.16 -> (0 + 0.16) / 2
    eps = 1e-6
    want = torch.tensor([((0.5 / (2.5 + eps)) + 1.0 / (1.0 + eps)) / 2, (0.0 + 2.0 / (12.5 + eps)) / 2])
    torch.testing.assert_close(got, want)
    l2 = drift_penalty(cur, ref, phi_mask, "relative_l2")  # ours: not squared, all sites at once
    torch.testing.assert_close(l2, torch.tensor([math.sqrt(1 + 4) / math.sqrt(1 + 4 + 4), 2.0 / math.sqrt(4 + 25)]))
    with pytest.raises(ValueError, match="unknown drift penalty"):
        drift_penalty(cur, ref, phi_mask, "l1")


def _run(toy, mode, n=2, **kw):
    world, setting = toy
    ex = setting.task.examples().select(list(range(n)))
    cfg = RecoveryConfig(steps=6, lr=0.2, budget=40.0, positions="prompt", **kw)
    return recover_batch(DefendedModel(world.model, setting.clamp), Scored(setting.task), ex, mode=mode, cfg=cfg)


def _max_delta_change(a, b):
    return max(float((x.tensors["delta"] - y.tensors["delta"]).abs().max()) for x, y in zip(a, b))


def test_penalty_after_projection_changes_the_result_and_lowers_drift(toy):
    squared = dict(lambda_act=200.0, drift_penalty="relative_mse")
    # the paper's "Jacobian" is our sketch (random probes + the drift probe). Before the
    # projection (ours) the penalty does nothing: ours' gradient lies along the drift probe's VJP
    free = _run(toy, "sketch")
    before = _run(toy, "sketch", lambda_act=200.0)
    assert _max_delta_change(before, free) < 1e-3
    after = _run(toy, "sketch", penalty_after_projection=True, **squared)
    assert _max_delta_change(after, free) > 0.1
    # measured: Phi drift 0.137 / 0.175 without it, 0.045 / 0.047 with it
    for a, f in zip(after, free):
        assert a.metrics["phi_relative_drift"] < 0.5 * f.metrics["phi_relative_drift"]
    # the exact Jacobian: the penalty's gradient J^T dpen/dPhi is in J's row space, so projected
    # first it vanishes; added after, it changes the result (the step is still projected)
    jfree = _run(toy, "jacobian")
    jbefore = _run(toy, "jacobian", **squared)
    jafter = _run(toy, "jacobian", penalty_after_projection=True, **squared)
    assert _max_delta_change(jbefore, jfree) < 1e-3
    assert _max_delta_change(jafter, jfree) > 0.1
    assert max(o.metrics["jacobian_step_residual"] for o in jafter) <= 1e-5
    # modes without a row-space projection ignore the option
    enc = _run(toy, "encoder", **squared)
    assert _max_delta_change(_run(toy, "encoder", penalty_after_projection=True, **squared), enc) == 0.0


def test_drift_corrections_lower_drift_in_the_row_space_modes_only(toy):
    free = _run(toy, "sketch")
    fixed = _run(toy, "sketch", drift_correction_steps=5, drift_correction_lr=0.05)
    for c, f in zip(fixed, free):
        assert c.metrics["phi_relative_drift"] < f.metrics["phi_relative_drift"]
        assert c.metrics["delta_norm"] <= 40.0 * (1 + 1e-5)
    enc = _run(toy, "encoder")
    assert _max_delta_change(_run(toy, "encoder", drift_correction_steps=5), enc) == 0.0


# --------------------------------------------------------------------------------------------
# the best checkpoint: the reference's cadence, never delta = 0, and its fallback


def test_checkpoint_fallback_on_a_constructed_case():
    delta = {"site": torch.zeros(2, 1, 1)}
    best = Checkpoints(delta, max_drift=0.03, fallback_weight=80.0)
    ours = Checkpoints(delta, max_drift=0.03)
    offers = [  # (step, score, drift) per example
        (1, [-1.0, -1.0], [0.10, 0.01]),  # ex 0: infeasible, -1 - 8 = -9; ex 1: feasible -1
        (2, [-0.5, 0.0], [0.20, 0.05]),   # ex 0: -0.5 - 16 = -16.5 < -9; ex 1: infeasible, a feasible best stays
        (3, [-2.0, -3.0], [0.04, 0.02]),  # ex 0: -2 - 3.2 = -5.2 > -9; ex 1: feasible but -3 < -1
    ]
    for step, score, drift in offers:
        delta["site"].fill_(float(step))
        for c in (best, ours):
            c.offer(step, torch.tensor(score), torch.tensor(drift), torch.ones(2, dtype=torch.bool))
    assert best.step.tolist() == [3, 1] and best.feasible.tolist() == [False, True]
    # without a fallback (ours) example 0 keeps delta = 0
    assert ours.step.tolist() == [0, 1] and ours.feasible.tolist() == [False, True]
    # a feasible candidate replaces a fallback even with a lower score - 80 x drift (-100 < -5.2)
    delta["site"].fill_(4.0)
    best.offer(4, torch.tensor([-100.0, -5.0]), torch.tensor([0.0, 0.0]), torch.ones(2, dtype=torch.bool))
    out = {"site": torch.empty(2, 1, 1)}
    assert best.restore(out) == [4, 1] and out["site"].flatten().tolist() == [4.0, 1.0]


def test_reference_checkpoint_picks_the_best_score_minus_80_drift_on_the_toy_world(toy):
    steps = 6
    # a 7-step run's history holds the score and Phi drift of the delta after k updates (k = 0..6),
    # the candidates of a 6-step run (same trajectory)
    world, setting = toy
    ex = setting.task.examples().select([0, 1, 2])
    dm = DefendedModel(world.model, setting.clamp)
    base = dict(lr=0.2, budget=40.0, positions="prompt")
    long = recover_batch(dm, Scored(setting.task), ex, mode="none",
                         cfg=RecoveryConfig(steps=steps + 1, max_drift=1e9, **base))
    cap = 1e-6  # no delta after an update is this close: every candidate is infeasible
    picks = {}
    # measured (score, drift) after k = 1..6 updates, example 0: (-3.40, 0.040), (-2.65, 0.071),
    # (-2.06, 0.099), (-1.66, 0.125), (-1.39, 0.149), (-1.18, 0.173): the reference's weight 80
    # keeps k = 1, a weight of 20 an interior step (k = 3), 0 the best score (the last step)
    for every, candidates, weight in ((1, range(1, steps + 1), 80.0), (3, (1, 3, 6), 80.0),
                                      (1, range(1, steps + 1), 20.0), (1, range(1, steps + 1), 0.0)):
        cfg = RecoveryConfig(steps=steps, max_drift=cap, checkpoint_every=every, checkpoint_after_update=True,
                             checkpoint_fallback_weight=weight, **base)
        outs = recover_batch(dm, Scored(setting.task), ex, mode="none", cfg=cfg)
        for i, (oc, ref) in enumerate(zip(outs, long)):
            hist = {h["step"]: h for h in ref.history}
            assert all(hist[k]["phi_relative_drift"] > cap for k in candidates)
            want = max(candidates, key=lambda k: hist[k]["score"] - weight * hist[k]["phi_relative_drift"])
            assert oc.metrics["checkpoint_step"] == want and oc.metrics["checkpoint_feasible"] is False
            assert oc.metrics["phi_relative_drift"] == pytest.approx(hist[want]["phi_relative_drift"], rel=1e-4)
            picks.setdefault(i, set()).add(want)
    assert any(len(p) == 3 for p in picks.values())  # the weight decides: first, interior, last
    # ours: candidates before each update, so delta = 0 (step 0) is the only one under the cap
    ours = recover_batch(dm, Scored(setting.task), ex, mode="none", cfg=RecoveryConfig(steps=steps, max_drift=cap, **base))
    assert all(oc.metrics["checkpoint_step"] == 0 and oc.metrics["delta_norm"] == 0.0 for oc in ours)


# --------------------------------------------------------------------------------------------
# the whole run with the reference's flags


REFERENCE_FLAGS = ["--clamp", "multiply", "--judge", "reference", "--delta-site", "all", "--anchor-steps", "2",
                   "--anchor-lr", "0.1", "--anchor-budget", "40", "--positions", "response", "--response-rows", "48",
                   "--steps", "3", "--lr", "0.05", "--budget", "40", "--phi-positions", "response",
                   "--lambda-act", "200", "--drift-penalty", "relative_mse", "--penalty-after-projection",
                   "--drift-correction-steps", "2", "--drift-correction-lr", "0.05", "--max-drift", "0.03",
                   "--checkpoint-every", "10", "--checkpoint-after-update", "--checkpoint-fallback-weight", "80",
                   "--sketch-probes", "8"]


def test_run_refusal_with_the_reference_flags_end_to_end(tmp_path):
    from saerecover.cli import main

    out = tmp_path / "ref"
    assert main(["run", "refusal", "--n", "6", "--n-contrast", "24", "--max-new-tokens", "12", "--modes",
                 "none,sketch", "--quiet", "--out", str(out), *REFERENCE_FLAGS]) == 0
    config = json.loads((out / "config.json").read_text())
    rec = config["recovery"]
    assert {k: rec[k] for k in ("drift_penalty", "penalty_after_projection", "drift_correction_steps",
                                "checkpoint_every", "checkpoint_after_update", "checkpoint_fallback_weight",
                                "anchor_steps", "positions", "response_rows", "phi_positions", "sketch_probes")} == {
        "drift_penalty": "relative_mse", "penalty_after_projection": True, "drift_correction_steps": 2,
        "checkpoint_every": 10, "checkpoint_after_update": True, "checkpoint_fallback_weight": 80.0,
        "anchor_steps": 2, "positions": "response", "response_rows": 48, "phi_positions": "response",
        "sketch_probes": 8}
    assert config["task"]["judge"] == "reference" and config["task"]["generation_deltas"] == "prompt"
    assert config["selection"]["clamp"] == "multiply" and config["selection"]["multiplier"] == 3.0
    assert config["delta_sites"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert all(c["mode"] == "multiply" and c["value"] == 3.0 and c["where"] == "all" for c in config["clamp"])
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["valid"]]
    assert valid, "the multiply clamp makes some toy requests refuse"
    for r in valid:
        assert r["notes"]["defended"]["reference_effective_refusal"] and r["notes"]["base"]["answered"]
        assert r["anchor_delta_norm"] <= 40 * (1 + 1e-5) and r["main_delta_norm"] <= 40 * (1 + 1e-5)
        assert r["checkpoint_step"] >= 1 and isinstance(r["checkpoint_feasible"], bool)
        # the headline is the paper's count on the generation the reference ran
        assert r["non_refusal"] == r["reference_non_refusal"] == r["reference_non_refusal_prompt_rows"]
        assert "non_refusal_all_rows" in r
    summary = json.loads((out / "summary.json").read_text())
    for mode in ("none", "sketch"):
        row = summary["modes"][mode]
        assert row["reference_non_refusal"] == row["non_refusal"] and row["non_refusal_all_rows_rate"] is not None
        assert row["relative_delta_norm_phi_mean"] > 0
    assert "generation_rows" in summary["refusal_metrics"]
