"""The recovery engine on tiny local models: clamp semantics, exact C1, batching, gradients."""

from __future__ import annotations

import pytest
import torch
from exact_stubs import TokenMargin
from sae_lens import SAE
from saerecover.core.clamp import Clamp
from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.examples import Examples, pad_right
from saerecover.core.metrics import c1_residual
from saerecover.core.recovery import recover_batch
from saerecover.core.sites import Site
from saerecover.models import load_model
from saerecover.testing import tiny_gpt2

HOOK = "blocks.0.hook_resid_post"


def make_sae(d_in: int, d_sae: int, arch: str = "standard", *, seed: int = 0, dtype: str = "float32",
             hook: str = HOOK) -> SAE:
    torch.manual_seed(seed)
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": {"hook_name": hook}}
    if arch == "topk":
        cfg["k"] = 8
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        sae.b_enc.add_(0.05)
        if arch == "jumprelu":
            sae.threshold.fill_(0.02)
    return sae


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tiny_gpt2(tmp_path_factory.mktemp("models"), n_layers=2, d_model=32)
    return load_model(str(path))


def random_examples(n: int, seed: int = 0, vocab: int = 60) -> Examples:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, vocab, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    ids, mask = pad_right(seqs, 0)
    return Examples(input_ids=ids, attention_mask=mask, answer_pos=mask.sum(1) - 1,
                    ids=[f"ex-{i:03d}" for i in range(n)])


def clamp_for(model, arch="standard", k=6, **kw) -> tuple[Clamp, Site]:
    site = Site(HOOK, make_sae(model.d_model, 128, arch))
    kw.setdefault("value", 0.0)
    return Clamp({site: list(range(0, 2 * k, 2))}, **kw), site


def test_clamping_nothing_reproduces_base_logits_exactly(model):
    ex = random_examples(5)
    base, _ = model.forward(ex.input_ids, ex.attention_mask)
    site = Site(HOOK, make_sae(model.d_model, 64))
    for clamp in (Clamp({site: []}), Clamp({site: [1, 2, 3]}, mode="multiply", value=1.0)):
        out = DefendedModel(model, clamp).forward(ex).logits
        assert torch.equal(out, base)


def test_clamp_changes_logits_and_sets_features(model):
    ex = random_examples(4)
    clamp, site = clamp_for(model, value=0.0, mode="zero")
    dm = DefendedModel(model, clamp)
    res = dm.forward(ex, track=(HOOK,))
    base, _ = model.forward(ex.input_ids, ex.attention_mask)
    assert not torch.allclose(res.logits, base)
    sc = clamp.site_clamps[0]
    z = site.encode(res.sites[HOOK].h_def)
    zc = sc.apply(site.encode(res.sites[HOOK].h_def))
    # re-encoding h_def is not exactly the clamp value (the error term moves it), but the clamp's
    # own output is: check the clamp semantics directly.
    assert torch.all(zc[..., sc.features] == 0)
    assert z.shape[-1] == site.d_sae


@pytest.mark.parametrize("mode,where", [("set", "all"), ("set", "active"), ("multiply", "all"), ("zero", "active")])
def test_clamp_modes(mode, where):
    site = Site(HOOK, make_sae(8, 16))
    z = torch.tensor([[0.0, 2.0, -1.0, 3.0]]).repeat(1, 4)
    sc = Clamp({site: [0, 1, 2]}, mode=mode, value=-5.0 if mode != "multiply" else 3.0, where=where).site_clamps[0]
    out = sc.apply(z)
    sel, rep = z[0, :3], out[0, :3]
    expect = {"set": torch.full((3,), -5.0), "multiply": sel * 3.0, "zero": torch.zeros(3)}[mode]
    if where == "active":
        expect = torch.where(sel > 0, expect, sel)
    assert torch.equal(rep, expect)
    assert torch.equal(out[0, 3:], z[0, 3:])


def test_gradient_through_clamp_matches_finite_differences():
    torch.manual_seed(0)
    site = Site(HOOK, make_sae(6, 24, dtype="float64"))
    sc = Clamp({site: [0, 3, 5, 7]}, value=0.7, where="all").site_clamps[0]
    h = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sc.defend, (h,), eps=1e-6, atol=1e-7)

    # the detached-error variant (what sae_lens' use_error_term does) has a different gradient
    def detached(x):
        z = site.encode(x)
        return site.decode(sc.apply(z)).double() + (x - site.decode(z).double()).detach()

    w = torch.randn(3, 6, dtype=torch.float64)
    (g_exact,) = torch.autograd.grad((sc.defend(h) * w).sum(), h)
    (g_detached,) = torch.autograd.grad((detached(h) * w).sum(), h)
    assert not torch.allclose(g_exact, g_detached)


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_encoder_mode_keeps_c1_at_every_step_and_zero_drift(model, arch):
    ex = random_examples(6, seed=1)
    clamp, site = clamp_for(model, arch=arch, k=8, value=0.0)
    dm = DefendedModel(model, clamp)
    a = site.encoder_columns(clamp.site_clamps[0].features)
    ratios = []

    def on_step(step, deltas, mask):
        ratios.append(c1_residual(a, deltas[HOOK][mask]))

    cfg = RecoveryConfig(steps=25, lr=0.1, budget=5.0, positions="all")
    outs = recover_batch(dm, TokenMargin(5, 6), ex, mode="encoder", cfg=cfg, on_step=on_step)
    assert len(ratios) == 25
    assert max(ratios) <= 1e-5
    assert any(o.metrics["delta_norm"] > 1e-3 for o in outs)
    for o in outs:
        assert o.metrics["c1_residual"] <= 1e-5
        assert o.metrics["activation_drift"] <= 1e-4
        assert o.metrics["delta_norm"] <= 5.0 * (1 + 1e-5)


def test_none_mode_moves_clamped_features(model):
    ex = random_examples(6, seed=2)
    clamp, _ = clamp_for(model, k=8, value=0.0)
    cfg = RecoveryConfig(steps=25, lr=0.2, budget=8.0, positions="all")
    outs = recover_batch(DefendedModel(model, clamp), TokenMargin(5, 6), ex, mode="none", cfg=cfg)
    assert max(o.metrics["c1_residual"] for o in outs) > 1e-3
    assert max(o.metrics["activation_drift"] for o in outs) > 1e-3


def test_budget_is_respected(model):
    ex = random_examples(4, seed=3)
    clamp, _ = clamp_for(model)
    cfg = RecoveryConfig(steps=30, lr=1.0, budget=0.5, positions="all")
    outs = recover_batch(DefendedModel(model, clamp), TokenMargin(5, 6), ex, mode="none", cfg=cfg)
    assert all(o.metrics["delta_norm"] <= 0.5 * (1 + 1e-5) for o in outs)
    assert max(o.metrics["delta_norm"] for o in outs) > 0.45
    # the rescale only ever shrinks: one Adam step of lr 1e-3 moves each coordinate by about 1e-3,
    # a delta far inside the budget, which must not be blown up to it
    small = RecoveryConfig(steps=1, lr=1e-3, budget=0.5, positions="all")
    outs = recover_batch(DefendedModel(model, clamp), TokenMargin(5, 6), ex, mode="none", cfg=small)
    assert all(0 < o.metrics["delta_norm"] < 0.1 for o in outs)


@pytest.mark.parametrize("mode", ["none", "encoder"])
def test_batched_equals_one_at_a_time(model, mode):
    ex = random_examples(5, seed=4)
    clamp, _ = clamp_for(model, k=6)
    dm = DefendedModel(model, clamp)
    cfg = RecoveryConfig(steps=15, lr=0.1, budget=3.0, positions="all", early_stop=True, stop_margin=0.5)
    task = TokenMargin(7, 8)
    batched = recover_batch(dm, task, ex, mode=mode, cfg=cfg)
    for i in range(len(ex)):
        single = recover_batch(dm, task, ex.select([i]), mode=mode, cfg=cfg)[0]
        b = batched[i]
        assert b.example_id == single.example_id
        assert b.steps == single.steps
        assert b.recovered == single.recovered
        torch.testing.assert_close(b.tensors["delta"], single.tensors["delta"], atol=1e-4, rtol=1e-4)
        assert b.recovered_score == pytest.approx(single.recovered_score, abs=1e-3)


def test_reclamp_defender_is_applied(model):
    ex = random_examples(3, seed=5)
    clamp, _ = clamp_for(model, k=8)
    dm = DefendedModel(model, clamp)
    delta = torch.randn(3, ex.input_ids.shape[1], model.d_model)
    plain = dm.forward(ex, {HOOK: delta}).logits
    strong = dm.forward(ex, {HOOK: delta}, reclamp=True).logits
    assert not torch.allclose(plain, strong)


def test_bad_inputs_are_named(model):
    site = Site(HOOK, make_sae(model.d_model, 32))
    with pytest.raises(ValueError, match="out of range"):
        Clamp({site: [40]})
    with pytest.raises(ValueError, match="duplicate"):
        Clamp({site: [1, 1]})
    with pytest.raises(ValueError, match="clamp mode"):
        Clamp({site: [1]}, mode="bogus")
    wrong = Site(HOOK, make_sae(model.d_model + 1, 32))
    with pytest.raises(ValueError, match="SAE width does not match"):
        DefendedModel(model, Clamp({wrong: [1]}))
    missing = Site("blocks.9.hook_resid_post", make_sae(model.d_model, 32))
    with pytest.raises(ValueError, match="hook"):
        DefendedModel(model, Clamp({missing: [1]}))
    with pytest.raises(ValueError, match="budget"):
        RecoveryConfig(budget=0).validate()


def two_site_clamp(model, k=4):
    s0 = Site(HOOK, make_sae(model.d_model, 64, seed=1))
    s1 = Site("blocks.1.hook_resid_pre", make_sae(model.d_model, 64, seed=2, hook="blocks.1.hook_resid_pre"))
    return Clamp({s0: list(range(k)), s1: list(range(10, 10 + k))}, value=0.5, where="all")


def test_jacobian_mode_steps_are_orthogonal_to_exact_jacobian(model):
    ex = random_examples(3, seed=6)
    clamp = two_site_clamp(model)
    dm = DefendedModel(model, clamp)
    cfg = RecoveryConfig(steps=8, lr=0.05, budget=2.0, positions="answer")
    task = TokenMargin(5, 6)
    jac = recover_batch(dm, task, ex, mode="jacobian", cfg=cfg)
    none = recover_batch(dm, task, ex, mode="none", cfg=cfg)
    assert all(o.metrics["jacobian_step_residual"] <= 1e-5 for o in jac)
    assert all(o.metrics["delta_norm"] > 1e-3 for o in jac)
    # first-order exactness shows as much smaller measured drift of the defended features
    assert max(o.metrics["phi_relative_drift"] for o in jac) < 0.2 * max(o.metrics["phi_relative_drift"] for o in none)


def test_best_checkpoint_under_a_drift_threshold(model):
    ex = random_examples(4, seed=6)
    dm = DefendedModel(model, two_site_clamp(model))
    task = TokenMargin(5, 6)
    base = dict(steps=12, lr=0.05, budget=2.0, positions="answer")
    free = recover_batch(dm, task, ex, mode="none", cfg=RecoveryConfig(**base))
    limit = 0.5 * max(o.metrics["phi_relative_drift"] for o in free)
    assert limit > 0
    capped = recover_batch(dm, task, ex, mode="none", cfg=RecoveryConfig(**base, max_drift=limit))
    # every kept delta is under the threshold, as re-measured by the final evaluation
    assert all(o.metrics["phi_relative_drift"] <= limit * (1 + 1e-4) + 1e-6 for o in capped)
    steps = [o.metrics["checkpoint_step"] for o in capped]
    assert all(0 <= st <= 12 for st in steps) and any(st > 0 for st in steps)
    # the kept checkpoint is the best-scoring step under the threshold in the recorded history
    for o in capped:
        ok = [h for h in o.history if h["phi_relative_drift"] <= limit]
        if o.metrics["checkpoint_step"] < 12:
            assert o.metrics["checkpoint_step"] == max(ok, key=lambda h: h["score"])["step"]
    # per-step measured drift and first-order drift are recorded
    jac = recover_batch(dm, task, ex, mode="jacobian", cfg=RecoveryConfig(**base))
    assert all("first_order_drift" in h and "phi_relative_drift" in h for o in jac for h in o.history)
    assert max(h["first_order_drift"] for o in jac for h in o.history) <= 1e-5
    with pytest.raises(ValueError, match="max_drift"):
        RecoveryConfig(max_drift=-1.0).validate()


def test_jacobian_matches_autograd_jacobian(model):
    from saerecover.core.projection import batched_vjp_jacobian, defended_features, example_jacobians

    ex = random_examples(2, seed=7)
    clamp = two_site_clamp(model, k=3)
    dm = DefendedModel(model, clamp)
    mask = ex.position_mask("answer")
    phi_mask = ex.attention_mask.bool() & (torch.arange(ex.input_ids.shape[1]) >= ex.answer_pos.unsqueeze(1))
    sites = [HOOK, "blocks.1.hook_resid_pre"]
    delta = torch.zeros(2, ex.input_ids.shape[1], model.d_model, requires_grad=True)
    out = dm.forward(ex, {HOOK: delta}, track=tuple(sites))
    phi = defended_features(clamp, out.sites, sites, phi_mask)
    coords = torch.arange(phi.shape[1])
    jb = example_jacobians(batched_vjp_jacobian(phi, {HOOK: delta}, coords), mask)
    for b in range(2):
        def f(rows, b=b):
            d = torch.zeros(2, ex.input_ids.shape[1], model.d_model)
            d[b, mask[b]] = rows.reshape(-1, model.d_model)
            o = dm.forward(ex, {HOOK: d}, track=tuple(sites))
            return defended_features(clamp, o.sites, sites, phi_mask)[b]
        ref = torch.autograd.functional.jacobian(f, torch.zeros(int(mask[b].sum()) * model.d_model))
        torch.testing.assert_close(jb[b], ref, atol=1e-5, rtol=1e-4)


def test_sketch_mode_runs_and_reduces_drift_less_than_exact(model):
    ex = random_examples(3, seed=8)
    clamp = two_site_clamp(model)
    dm = DefendedModel(model, clamp)
    cfg = RecoveryConfig(steps=6, lr=0.05, budget=2.0, sketch_probes=2)
    outs = {mode: recover_batch(dm, TokenMargin(5, 6), ex, mode=mode, cfg=cfg) for mode in ("sketch", "jacobian", "none")}
    assert all(o.metrics["delta_norm"] > 0 for o in outs["sketch"])
    drift = {mode: sum(o.metrics["phi_relative_drift"] for o in oc) / len(oc) for mode, oc in outs.items()}
    # the sketch removes a few directions of J's row space: less drift than no projection, more
    # than the exact Jacobian projection
    assert drift["jacobian"] < drift["sketch"] < drift["none"], drift
