"""Defenses do what they say on constructed cases: dir-ablate leaves no component along the
ablated directions, error-mean keeps the SAE error term constant, error-proj removes the error's
part along the decoder directions, the hardened clamp's ablated subspace holds the previous
round's recovered directions, the plain clamp is the clamp; and the compare pieces (robustness
score, collateral KL, the SAEBench-layout export) on hand-made inputs."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE
from saerecover.core.clamp import Clamp
from saerecover.core.defended import DefendedModel
from saerecover.core.defenses import (
    DefenseContext,
    DirAblate,
    ErrorMean,
    ErrorProj,
    Hardened,
    PlainClamp,
    Reclamp,
    orthonormal_basis,
    parse_defense,
    parse_defenses,
)
from saerecover.core.defenses.base import ablate
from saerecover.core.defenses.error import mean_error
from saerecover.core.defenses.hardened import grow_subspace, principal_directions
from saerecover.core.examples import Examples, pad_right
from saerecover.core.sites import Site
from saerecover.experiments.collateral import next_token_kl
from saerecover.experiments.compare import frontier, robustness_score
from saerecover.models import load_model
from saerecover.report.saebench import read_saebench, results_filename, write_saebench
from saerecover.testing import tiny_gpt2

HOOK = "blocks.0.hook_resid_post"
D = 16
FEATURES = [1, 4, 7]


def make_site(d_in: int = D, d_sae: int = 48, seed: int = 0) -> Site:
    torch.manual_seed(seed)
    sae = SAE.from_dict({"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": True, "normalize_activations": "none",
                         "metadata": {"hook_name": HOOK}})
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    return Site(HOOK, sae)


def h_rows(n: int = 6, d: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3


def span_residual(vectors: torch.Tensor, basis: torch.Tensor) -> float:
    """The largest norm of a vector's part outside span(basis) (orthonormal rows)."""
    v = vectors.double()
    return float((v - (v @ basis.double().T) @ basis.double()).norm(dim=-1).max())


# ---------------------------------------------------------------------------------- the math


def test_ablate_removes_the_span_by_hand():
    basis = orthonormal_basis(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert basis.shape == (2, 3)
    assert torch.allclose(ablate(torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64), basis),
                          torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64))
    # rank by tolerance: a repeated row adds nothing; no rows ablate nothing
    assert orthonormal_basis(torch.tensor([[1.0, 2.0], [2.0, 4.0]])).shape == (1, 2)
    assert orthonormal_basis(torch.zeros(0, 4)).shape == (0, 4)


# ---------------------------------------------------------------------------------- each defense


def test_the_plain_clamp_is_the_clamp_and_reclamp_only_sets_reclamp():
    site = make_site()
    clamp = Clamp({site: FEATURES}, value=-5.0, where="active")
    ctx = DefenseContext(model=None)
    assert PlainClamp().build(clamp, ctx) is clamp and dict(PlainClamp.recovery) == {"reclamp": False}
    assert Reclamp().build(clamp, ctx) is clamp and dict(Reclamp.recovery) == {"reclamp": True}
    assert clamp.describe()[0].get("defense") is None  # the clamp's config (and so its runs' hashes) as before


def test_dir_ablate_leaves_zero_component_along_the_decoder_directions():
    site = make_site()
    sc = DirAblate().build(Clamp({site: FEATURES}), DefenseContext(model=None)).site_clamps[0]
    w = site.sae.W_dec[FEATURES].detach().double()  # (|S|, d)
    h = h_rows()
    out = sc.defend(h).double()
    assert float((out @ w.T).abs().max()) < 1e-5
    # what it removed lies in span(W_dec[S]); the rest of h is untouched
    assert span_residual(h.double() - out, orthonormal_basis(w)) < 1e-5
    # applied again after any delta (reclamp), still nothing along the directions
    delta = torch.randn(6, D, generator=torch.Generator().manual_seed(5)) * 10
    assert float((sc.defend(out.float() + delta).double() @ w.T).abs().max()) < 1e-4
    assert sc.describe()["defense"] == "dir-ablate" and sc.describe()["basis_rank"] == 3


def test_error_mean_leaves_the_error_term_constant():
    site = make_site()
    e0 = torch.linspace(-1.0, 1.0, D)
    rows = h_rows(40, seed=3)
    ctx = DefenseContext(model=None, _residuals={HOOK: rows})
    sc = ErrorMean().build(Clamp({site: FEATURES}, value=-5.0), ctx).site_clamps[0]
    # the mean error over the reference rows, by hand
    want = (rows - site.decode(site.encode(rows))).mean(dim=0)
    assert torch.allclose(sc.error_mean, want, atol=1e-5)
    object.__setattr__(sc, "error_mean", e0)  # a known constant
    for seed in (1, 2, 3):
        h = h_rows(seed=seed) * seed
        error_term = sc.defend(h) - site.decode(sc.apply(site.encode(h)))
        assert torch.allclose(error_term, e0.expand_as(error_term), atol=1e-5)
    assert torch.allclose(mean_error(sc, rows), want, atol=1e-5)


def test_error_proj_removes_only_the_errors_part_along_the_decoder_directions():
    site = make_site()
    sc = ErrorProj().build(Clamp({site: FEATURES}, value=-5.0), DefenseContext(model=None)).site_clamps[0]
    w = site.sae.W_dec[FEATURES].detach().double()
    h = h_rows()
    z = site.encode(h)
    err = (h - site.decode(z)).double()
    kept = (sc.defend(h) - site.decode(sc.apply(z))).detach().double()
    assert float((kept @ w.T).abs().max()) < 1e-4
    basis = orthonormal_basis(w)
    assert torch.allclose(kept, err - (err @ basis.T) @ basis, atol=1e-4)


def test_hardened_subspace_contains_the_previous_rounds_recovered_directions():
    site = make_site()
    clamp = Clamp({site: FEATURES}, value=-5.0, where="active")
    ctx = DefenseContext(model=None)
    d0 = parse_defense("hardened:2:1")
    assert (d0.rounds, d0.round, d0.k, d0.label, d0.member) == (3, 0, 1, "hardened:2:1", "hardened-2-1-r0")
    # round 0: the clamp with nothing ablated
    sc0 = d0.build(clamp, ctx).site_clamps[0]
    h = h_rows()
    assert torch.allclose(sc0.defend(h), clamp.site_clamps[0].defend(h))
    g = torch.Generator().manual_seed(7)
    e = torch.eye(D, dtype=torch.float64)
    # round 0's recovered deltas: mostly along e2, a little along e3
    deltas0 = (torch.randn(20, 1, generator=g).double() * 5) * e[2] \
        + torch.randn(20, 1, generator=g).double() * 0.1 * e[3]
    top = principal_directions(deltas0, 1)
    assert abs(abs(float(top[0, 2])) - 1.0) < 1e-3
    d1 = d0.harden({HOOK: deltas0.float()})
    assert d1.round == 1 and d1.bases[HOOK].shape == (1, D)
    assert span_residual(top, d1.bases[HOOK]) < 1e-6
    # round 1's deltas along e5: round 2 holds round 1's subspace and the new direction
    deltas1 = torch.randn(20, 1, generator=g).double() * e[5]
    d2 = d1.harden({HOOK: deltas1.float()})
    assert d2.bases[HOOK].shape == (2, D)
    assert span_residual(d1.bases[HOOK], d2.bases[HOOK]) < 1e-6
    assert span_residual(e[5:6], d2.bases[HOOK]) < 1e-6
    # the built clamp leaves nothing along them, after the clamp and after any delta
    sc2 = d2.build(clamp, ctx).site_clamps[0]
    for x in (h, sc2.defend(h) + torch.randn(6, D, generator=g) * 10):
        assert float((sc2.defend(x).double() @ d2.bases[HOOK].T).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="no round after 2"):
        d2.harden({HOOK: deltas1.float()})
    assert grow_subspace(torch.zeros(0, D, dtype=torch.float64), torch.zeros(3, D), 2).shape == (0, D)


def test_defense_specs():
    assert [d.label for d in parse_defenses("clamp, clamp-reclamp,error-mean,error-proj,dir-ablate,hardened:3")] == [
        "clamp", "clamp-reclamp", "error-mean", "error-proj", "dir-ablate", "hardened:3"]
    assert parse_defense("hardened:3").rounds == 4
    for bad, match in (("nope", "unknown defense 'nope'"), ("hardened:0", "R >= 1"), ("hardened:x", "integers"),
                       ("clamp:2", "takes no such arguments"), ("hardened", "takes no such arguments"),
                       ("hardened:2:0", "k >= 1")):
        with pytest.raises(ValueError, match=match):
            parse_defense(bad)
    with pytest.raises(ValueError, match="repeat"):
        parse_defenses("clamp,clamp")


# ---------------------------------------------------------------------------------- in the model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(tiny_gpt2(tmp_path_factory.mktemp("models"), n_layers=2, d_model=D)))


def _examples(n: int = 4) -> Examples:
    g = torch.Generator().manual_seed(0)
    ids, mask = pad_right([torch.randint(4, 60, (6,), generator=g).tolist() for _ in range(n)], 0)
    return Examples(input_ids=ids, attention_mask=mask, answer_pos=mask.sum(1) - 1, ids=[f"ex-{i}" for i in range(n)])


def test_dir_ablate_in_the_defended_model_with_a_delta(model):
    site = make_site()
    clamp = DirAblate().build(Clamp({site: FEATURES}), DefenseContext(model))
    ex = _examples()
    delta = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(3)) * 5
    out = DefendedModel(model, clamp).forward(ex, {HOOK: delta}, reclamp=True)
    w = site.sae.W_dec[FEATURES].detach().double()
    assert float((out.sites[HOOK].h_rec.double() @ w.T).abs().max()) < 1e-4
    assert float((out.sites[HOOK].h_def.double() @ w.T).abs().max()) < 1e-4


def test_error_mean_measures_the_reference_set(model):
    site = make_site()
    ex = _examples()
    ctx = DefenseContext(model, ex)
    rows = ctx.residuals(HOOK)
    assert rows.shape == (int(ex.attention_mask.sum()), D)
    sc = ErrorMean().build(Clamp({site: FEATURES}), ctx).site_clamps[0]
    assert torch.allclose(sc.error_mean, (rows - site.decode(site.encode(rows))).mean(0), atol=1e-5)


def test_kl_is_zero_without_a_defense_and_positive_with_one(model):
    site = make_site()
    ex = _examples()
    assert next_token_kl(model, Clamp(), ex) == [0.0] * 4
    kl = next_token_kl(model, DirAblate().build(Clamp({site: FEATURES}), DefenseContext(model)), ex, batch_size=3)
    assert len(kl) == 4 and min(kl) > 0


# ---------------------------------------------------------------------------------- compare pieces


def test_robustness_score_by_hand():
    r = robustness_score({"a": 0.1, "b": 0.4, "c": None}, [0.4, 0.1, 0.2])
    assert r["n"] == 3 and r["score"] == pytest.approx((0 + 2 / 3 + 1) / 3)
    lo, hi = r["score_ci95"]
    assert 0 <= lo <= r["score"] <= hi <= 1
    assert robustness_score({}, [1.0]) == {"score": None, "score_ci95": None, "n": 0}


def test_frontier_by_hand():
    points = {"a": (0.9, 0.5), "b": (0.5, 0.1), "c": (0.5, 0.3), "d": (0.9, 0.6), "e": (0.2, 0.1)}
    # c: b is as robust and cheaper; d: a is as robust and cheaper; e: b is more robust at the same cost
    assert frontier(points) == {"a", "b"}
    assert frontier({"x": (0.3, 0.2), "y": (0.3, 0.2)}) == {"x", "y"}  # ties dominate neither


def _member(name: str, score: float) -> dict:
    return {"name": name, "kind": "sae", "n_valid": 10,
            "sae": {"hook_name": name, "source": "/x", "cfg": {"d_sae": 48}},
            "rates": [{"mode": "encoder", "budget": 0.1, "n_valid": 10, "recovered": 3, "recovery_rate": 0.3,
                       "recovery_rate_ci95": [0.1, 0.6]},
                      {"mode": "encoder", "budget": 0.25, "n_valid": 10, "recovered": 8, "recovery_rate": 0.8,
                       "recovery_rate_ci95": [0.5, 0.95]}],
            "robustness": {"encoder": {"n": 10, "median": 0.25, "never": 2, "never_share": 0.2,
                                       "never_share_ci95": [0.05, 0.5], "score": score, "score_ci95": [0.4, 0.7]}},
            "collateral": {"kl_mean": 0.12, "kl_ci95": [0.1, 0.2],
                           "non_target": {"accuracy": 0.9, "accuracy_ci95": [0.6, 1.0], "correct": 9, "n": 10}}}


def test_the_saebench_export_reads_back(tmp_path):
    summary = {"collection": "compare", "kind": "saes", "task": "toy-ioi", "budgets": [0.1, 0.25], "modes": ["encoder"],
               "score_mode": "encoder", "score": "...", "recovery": {"steps": 3},
               "members": [_member("blocks.1.hook_resid_post", 0.55), _member("blocks.2/x", 0.35)]}
    paths = write_saebench(tmp_path, summary, sae_lens_version="6.0", saerecover_version="1.2")
    assert [p.name for p in paths] == ["saerecover_blocks.1.hook_resid_post_eval_results.json",
                                       "saerecover_blocks.2_x_eval_results.json"]
    assert results_filename("rel/a", "b/c") == "rel_a_b_c_eval_results.json"
    data = read_saebench(paths[0])
    metrics = data["eval_result_metrics"]["recovery_robustness"]
    assert metrics["robustness_score"] == 0.55 and metrics["robustness_score_ci_low"] == 0.4
    assert metrics["recovery_rate_at_budget_0.1"] == 0.3 and metrics["recovery_rate_at_budget_0.25"] == 0.8
    assert metrics["median_smallest_recovering_budget"] == 0.25 and metrics["valid_flips"] == 10
    assert metrics["collateral_kl"] == 0.12 and metrics["collateral_non_target_accuracy"] == 0.9
    assert data["sae_lens_id"] == "blocks.1.hook_resid_post" and data["sae_cfg_dict"] == {"d_sae": 48}
    assert data["eval_type_id"] == "saerecover_recovery_robustness" and data["sae_lens_version"] == "6.0"
    assert [d["budget_relative"] for d in data["eval_result_details"]] == [0.1, 0.25]
    assert read_saebench(paths[1])["eval_result_metrics"]["recovery_robustness"]["robustness_score"] == 0.35
    # a file without SAEBench's keys, or with a nested metric, is refused
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "eval_result_metrics": {"c": {"x": {"y": 1}}}}))
    with pytest.raises(ValueError, match="not flat"):
        read_saebench(bad)
    bad.write_text(json.dumps({"eval_type_id": "x"}))
    with pytest.raises(ValueError, match="lacks SAEBench eval-result keys"):
        read_saebench(bad)
    with pytest.raises(ValueError, match="compare saes"):
        write_saebench(tmp_path, {**summary, "kind": "defenses"})


class _Logits:
    def __init__(self, logits):
        self.logits = logits


class _TwiceDefended:
    """A defended model whose second application undoes the first: B absent after one
    application, present again after two (a non-idempotent defense)."""

    class model:
        d_model = 3

    def __init__(self):
        self.calls = []

    def forward(self, ex, deltas=None, *, reclamp=False, defended=True):
        self.calls.append((deltas, reclamp, defended))
        value = 1.0 if not defended or reclamp else -1.0
        return _Logits(torch.full((len(ex.ids), 1), value))


class _ScoreTask:
    name = "t"

    def score(self, logits, ex):
        return logits[:, 0]

    def describe(self):
        return {"name": "t"}


def test_reapplied_judges_the_defended_pass_at_the_attacks_starting_point():
    from saerecover.core.defenses.reapplied import Reapplied

    ids, mask = pad_right([[5, 6], [7, 8]], 0)
    ex = Examples(input_ids=ids, attention_mask=mask, answer_pos=mask.sum(1) - 1, ids=["a", "b"])
    defended = _TwiceDefended()
    task = Reapplied(_ScoreTask(), [HOOK])
    # one application flips B off; the attack starts from two, where B is back: not a valid flip
    assert task.score(defended.forward(ex).logits, ex).tolist() == [-1.0, -1.0]
    assert task.judge(defended, ex, with_clamp=True).tolist() == [1.0, 1.0]
    deltas, reclamp, on = defended.calls[-1]
    assert reclamp and on and list(deltas) == [HOOK] and deltas[HOOK].shape == (2, 2, 3) and not deltas[HOOK].any()
    assert task.judge(defended, ex, with_clamp=False).tolist() == [1.0, 1.0]  # the base pass as the task's
    given = {HOOK: torch.ones(2, 2, 3)}
    task.judge(defended, ex, with_clamp=True, deltas=given, reclamp=False)
    assert defended.calls[-1] == (given, False, True)
    assert task.name == "t" and task.describe() == {"name": "t", "defended_pass": {"reapplied_at": [HOOK]}}
