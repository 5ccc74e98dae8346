"""Exact values of what a clamp does (core/clamp.py), of the encoder mode's null-space check
(core/projection/encoder.py) and of the recovery features of a delta (core/decomposition.py),
on hand-made SAE sites. Each test's comment shows the computation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from exact_stubs import hand_site
from saerecover.core.clamp import Clamp, SiteClamp
from saerecover.core.decomposition import recovery_features
from saerecover.core.projection.encoder import MIN_ENCODER_NULL_FRACTION, encoder_null_space, encoder_null_warnings

# d_in = d_sae = 3, W_enc = I (E(h) = relu(h)); decoder rows f0 -> [2, 0, 0], f1 -> [0, 0, 3], f2 -> [0, 1, 0]
W_ENC = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
W_DEC = [[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]]


@pytest.fixture(scope="module")
def site():
    return hand_site(W_ENC, W_DEC)


# --- SiteClamp.apply: clamp_S(z) ----------------------------------------------------------------

Z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])


@pytest.mark.parametrize("mode, where, value, want", [
    # set f0, f2 to 7 everywhere
    ("set", "all", 7.0, [[7.0, -1.0, 7.0], [7.0, 3.0, 7.0]]),
    # set only where the feature is active (> 0): z[0, 0] = 2, z[0, 2] = 0.5 are; z[1, 0] = 0, z[1, 2] = -2 are not
    ("set", "active", 7.0, [[7.0, -1.0, 7.0], [0.0, 3.0, -2.0]]),
    # multiply by -3: f0 -> [-6, 0], f2 -> [-1.5, 6]
    ("multiply", "all", -3.0, [[-6.0, -1.0, -1.5], [0.0, 3.0, 6.0]]),
    ("multiply", "active", -3.0, [[-6.0, -1.0, -1.5], [0.0, 3.0, -2.0]]),
    # zero ignores the value
    ("zero", "all", 5.0, [[0.0, -1.0, 0.0], [0.0, 3.0, 0.0]]),
    ("zero", "active", 5.0, [[0.0, -1.0, 0.0], [0.0, 3.0, -2.0]]),
])
def test_site_clamp_apply_of_every_mode(site, mode, where, value, want):
    sc = SiteClamp(site, torch.tensor([0, 2]), mode, value, where)
    z = Z.clone()
    assert sc.apply(z).tolist() == want
    assert torch.equal(z, Z)  # a new tensor; z itself untouched


def test_site_clamp_apply_with_one_value_per_feature(site):
    # f0 set to 4, f2 set to -1 (tensor values, float64 given: cast to z's dtype)
    sc = SiteClamp(site, torch.tensor([0, 2]), "set", torch.tensor([4.0, -1.0], dtype=torch.float64), "all")
    out = sc.apply(Z)
    assert out.dtype == torch.float32 and out.tolist() == [[4.0, -1.0, -1.0], [4.0, 3.0, -1.0]]
    # multiply per feature: f0 x 0.5, f2 x 10
    sc = SiteClamp(site, torch.tensor([0, 2]), "multiply", torch.tensor([0.5, 10.0]), "all")
    assert sc.apply(Z).tolist() == [[1.0, -1.0, 5.0], [0.0, 3.0, -20.0]]


def test_site_clamp_with_no_features_returns_its_input(site):
    sc = SiteClamp(site, torch.zeros(0, dtype=torch.long), "set", 9.0, "all")
    assert sc.apply(Z) is Z
    h = torch.tensor([[1.0, 2.0, 3.0]])
    assert sc.defend(h) is h


def test_site_clamp_defend_keeps_the_error_term(site):
    # h = [1, -2, 0.5]; z = relu(h) = [1, 0, 0.5]; D(z) = [2, 0.5, 0] ... clamp f0 to 3 (set, all):
    # D(clamp(z)) - D(z) = (3 - 1) [2, 0, 0] = [4, 0, 0]  ->  h_def = h + [4, 0, 0] = [5, -2, 0.5]
    sc = SiteClamp(site, torch.tensor([0]), "set", 3.0, "all")
    h = torch.tensor([[1.0, -2.0, 0.5]])
    assert sc.defend(h).tolist() == [[5.0, -2.0, 0.5]]
    # the error term h - D(E(h)) is the same before and after the clamp
    err = h - site.decode(site.encode(h))
    h_def = sc.defend(h)
    assert torch.allclose(h_def - site.decode(sc.apply(site.encode(h))), err)


# --- Clamp.per_feature --------------------------------------------------------------------------


def test_per_feature_clamp_sets_each_feature_to_its_value(site):
    clamp = Clamp.per_feature(site, [2, 0], [1.5, -0.5])
    (sc,) = clamp.site_clamps
    assert sc.site is site and sc.features.tolist() == [2, 0] and sc.features.dtype == torch.long
    assert isinstance(sc.value, torch.Tensor) and sc.value.dtype == torch.float32 and sc.value.tolist() == [1.5, -0.5]
    assert sc.mode == "set" and sc.where == "all"
    # z = [[2, -1, 0.5]]: f2 -> 1.5, f0 -> -0.5
    assert sc.apply(Z[:1]).tolist() == [[-0.5, -1.0, 1.5]]
    assert sc.describe()["value"] == [1.5, -0.5]
    # mode and where are passed through; values of any shape are flattened
    clamp = Clamp.per_feature(site, torch.tensor([1]), torch.tensor([[2.0]]), mode="multiply", where="active")
    (sc,) = clamp.site_clamps
    assert (sc.mode, sc.where, sc.value.tolist()) == ("multiply", "active", [2.0])
    # z[:, 1] = [-1, 3]: only the active 3 is multiplied
    assert sc.apply(Z).tolist() == [[2.0, -1.0, 0.5], [0.0, 6.0, -2.0]]
    # values and indices of other dtypes are stored as float32 and long
    (sc,) = Clamp.per_feature(site, torch.tensor([1], dtype=torch.int32), torch.tensor([0.25], dtype=torch.float64)
                              ).site_clamps
    assert (sc.features.dtype, sc.value.dtype, sc.value.tolist()) == (torch.long, torch.float32, [0.25])


@pytest.mark.parametrize("features, values, kw, match", [
    ([0, 1], [1.0], {}, "2 features but 1 values"),
    ([0], [1.0, 2.0], {}, "1 features but 2 values"),
    ([0], [math.nan], {}, "must be finite"),
    ([0], [math.inf], {}, "must be finite"),
    ([0], [1.0], {"mode": "add"}, "clamp mode must be one of"),
    ([0], [1.0], {"where": "some"}, "clamp mode must be one of"),
    ([3], [1.0], {}, "out of range"),
])
def test_per_feature_clamp_refuses_bad_input(site, features, values, kw, match):
    with pytest.raises(ValueError, match=match) as err:
        Clamp.per_feature(site, features, values, **kw)
    if "values" in match or "finite" in match:
        assert "'blocks.0.hook_resid_post'" in str(err.value)


def test_clamp_constructor_checks_and_combine(site):
    other = hand_site(W_ENC, W_DEC, hook="blocks.1.hook_resid_post")
    clamp = Clamp({site: [1]}, value=-2.0, mode="multiply", where="active")
    (sc,) = clamp.site_clamps
    assert (sc.features.tolist(), sc.value, sc.mode, sc.where) == ([1], -2.0, "multiply", "active")
    both = Clamp.combine(clamp, Clamp({other: torch.tensor([0, 2])}))
    assert [c.site.hook_name for c in both.site_clamps] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert both.at("blocks.1.hook_resid_post").features.tolist() == [0, 2]
    assert both.at("blocks.1.hook_resid_post").value == 0.0 and both.at("blocks.2.hook_resid_post") is None
    with pytest.raises(ValueError, match="clamped twice"):
        Clamp.combine(clamp, clamp)
    assert Clamp({site: []}).site_clamps[0].features.tolist() == []
    for bad, kw, err in [("x", {}, TypeError), ([0], {"mode": "add"}, ValueError), ([0], {"where": "x"}, ValueError),
                         ([0], {"value": "a"}, TypeError), ([0], {"value": math.inf}, ValueError)]:
        with pytest.raises(err):
            Clamp({site: bad}, **kw)


# --- the encoder mode's null space --------------------------------------------------------------


def _sized_site(d: int, rank: int, k: int):
    """A d-dimensional site whose first k encoder columns have rank ``rank`` (columns past the
    rank repeat the first ones), d_sae = k."""
    cols = torch.zeros(d, k)
    for j in range(k):
        cols[j % rank, j] = 1.0
    return hand_site(cols.tolist())


def test_encoder_null_space_rank_and_dimension():
    # d = 40, 4 columns of rank 3: null space 37 >= 5% of 40 = 2, no warning
    site = _sized_site(40, 3, 4)
    clamp = Clamp({site: [0, 1, 2, 3]})
    (entry,) = encoder_null_space(clamp, [site.hook_name])
    assert entry == {"site": site.hook_name, "n_features": 4, "rank": 3, "d_model": 40, "null_dim": 37,
                     "warning": False}


@pytest.mark.parametrize("d, rank, warn", [
    # the warning is null_dim < 5% of d_model: d = 40 -> under 2
    (40, 39, True),   # null 1 < 2
    (40, 38, False),  # null 2, exactly 5%: no warning
    (40, 40, True),   # null 0
    (20, 19, False),  # null 1 = 5% of 20: no warning
    (20, 20, True),
])
def test_encoder_null_space_warns_below_five_percent(d, rank, warn):
    assert MIN_ENCODER_NULL_FRACTION == 0.05
    site = _sized_site(d, rank, rank)
    clamp = Clamp({site: list(range(rank))})
    (entry,) = encoder_null_space(clamp, [site.hook_name])
    assert (entry["rank"], entry["null_dim"], entry["warning"]) == (rank, d - rank, warn)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found = encoder_null_warnings(clamp, [site.hook_name])
    assert len(found) == len(seen) == int(warn)
    if warn:
        (w,) = found
        assert w == {"kind": "encoder_null_space", "site": site.hook_name, "n_features": rank, "rank": rank,
                     "d_model": d, "null_dim": d - rank, "message": str(seen[0].message)}
        assert seen[0].category is UserWarning
        assert w["message"] == (f"encoder mode at {site.hook_name}: the {rank} clamped features' encoder columns "
                                f"have rank {rank} in d_model {d}, leaving a null space of dimension {d - rank} "
                                "(under 5% of d_model): encoder mode cannot move delta there, so its recovery "
                                "rate says nothing about the clamp")


def test_encoder_null_space_skips_unclamped_and_empty_sites_and_passes_rcond():
    a = _sized_site(20, 20, 20)
    b = hand_site(torch.eye(20).tolist(), hook="blocks.1.hook_resid_post")
    clamp = Clamp.combine(Clamp({a: list(range(20))}), Clamp({b: []}))
    names = [a.hook_name, b.hook_name, "blocks.2.hook_resid_post"]
    assert [e["site"] for e in encoder_null_space(clamp, names)] == [a.hook_name]
    # a column scaled by 1e-3 is dropped at rcond 1e-2 (rank 19, null 1) and kept by default (rank 20)
    cols = torch.eye(20)
    cols[19, 19] = 1e-3
    c = hand_site(cols.tolist(), hook="blocks.3.hook_resid_post")
    clamp = Clamp({c: list(range(20))})
    assert encoder_null_space(clamp, [c.hook_name])[0]["rank"] == 20
    assert encoder_null_space(clamp, [c.hook_name], rcond=1e-2)[0]["rank"] == 19
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert encoder_null_warnings(clamp, [c.hook_name], rcond=1e-2) == []
        assert [w["rank"] for w in encoder_null_warnings(clamp, [c.hook_name])] == [20]


# --- recovery features --------------------------------------------------------------------------


def test_recovery_features_of_a_hand_delta(site):
    # h_def = [[1, 0, 5], [0, 2, 0]], delta = [[-0.5, 3, 0], [0, 0, 1]]
    # dz = relu(h_def + delta) - relu(h_def) = [[-0.5, 3, 0], [0, 0, 1]]; clamped {f0}
    # non-clamped strengths ||dz_j|| over the rows: f1 3, f2 1
    h_def = torch.tensor([[1.0, 0.0, 5.0], [0.0, 2.0, 0.0]])
    delta = torch.tensor([[-0.5, 3.0, 0.0], [0.0, 0.0, 1.0]])
    assert recovery_features(site, torch.tensor([0]), h_def, delta) == [(1, 3.0), (2, 1.0)]
    assert recovery_features(site, torch.tensor([0]), h_def, delta, top_k=1) == [(1, 3.0)]
    assert recovery_features(site, torch.tensor([0]), h_def, delta, top_k=0) == []
    # f1 clamped: f0 (0.5) and f2 (1), f2 first
    assert recovery_features(site, torch.tensor([1]), h_def, delta) == [(2, 1.0), (0, 0.5)]
    # two rows of one feature: dz_f2 = [3, 4] -> 5
    d2 = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 4.0]])
    assert recovery_features(site, torch.tensor([0]), torch.zeros(2, 3), d2) == [(2, 5.0)]
    # float64 input is computed in float32; the returned values are Python numbers
    out = recovery_features(site, torch.tensor([0]), h_def.double(), delta.double())
    assert all(type(j) is int and type(v) is float for j, v in out)
    with pytest.raises(ValueError, match="top_k must be >= 0, got -1"):
        recovery_features(site, torch.tensor([0]), h_def, delta, top_k=-1)
    with pytest.raises(ValueError, match="out of range"):
        recovery_features(site, torch.tensor([3]), h_def, delta)


def test_only_features_that_moved_are_ranked(site):
    # dz = [0, 2, 0] with f0 clamped: only f1 moved (f2 stays at 0, however dz is compared)
    from saerecover.core.decomposition import decompose

    h, d = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    assert recovery_features(site, torch.tensor([0]), h, d) == [(1, 2.0)]
    dec = decompose(site, torch.tensor([0]), h, d, top_k=5)
    assert dec["n_changed"] == 1 and dec["topk_features"].tolist() == [1]
    # two rows: the strength of a feature is its dz norm over the rows, sqrt(2^2 + 1^2) for f1, 3 for f2
    h2 = torch.zeros(2, 3)
    d2 = torch.tensor([[0.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    (f2, s2), (f1, s1) = recovery_features(site, torch.tensor([0]), h2, d2)
    assert (f2, f1) == (2, 1) and s2 == pytest.approx(3.0) and s1 == pytest.approx(math.sqrt(5.0))
