"""Exact values of every per-example metric (core/metrics.py), of the recovery-path decomposition
(core/decomposition.py) and of the re-analysis comparisons (experiments/analysis.py), on inputs
small enough to work out by hand. Each test's comment shows the computation; a metric that is
inflated, deflated or computed with the wrong norm fails here, not only a bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from exact_stubs import hand_site
from saerecover.core.decomposition import decompose
from saerecover.core.metrics import (
    EPS,
    _relative,
    c1_residual,
    clamped_features,
    example_metrics,
    residual_scales,
    row_scale,
    sink_rows,
)
from saerecover.experiments import analysis

# The site of every test below: d_in = d_sae = 3, W_enc = I, so E(h) = relu(h) feature by feature;
# the decoder rows are f0 -> [2, 0, 0], f1 -> [0, 0, 3], f2 -> [0, 1, 0] (b_enc = b_dec = 0).
W_ENC = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
W_DEC = [[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]]
S = torch.tensor([0, 1])
H_DEF = torch.tensor([[1.0, 0.0, 5.0], [0.0, 2.0, 0.0]])
DELTA = torch.tensor([[-0.5, 3.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def site():
    return hand_site(W_ENC, W_DEC)


def metrics(site, delta, *, recovered=True, eta=0.0, features=S, h_def=H_DEF):
    feats = clamped_features(site, features, h_def, h_def + delta)
    a = site.encoder_columns(features)
    return example_metrics(site=site, features=features, feats=feats, delta_rows=delta, h_def_rows=h_def, a=a,
                           recovered=recovered, eta=eta)


def test_clamped_features_are_the_encoder_outputs_of_the_clamped_features(site):
    # z_def = relu(H_DEF)[:, S] = [[1, 0], [0, 2]]; h_rec = [[0.5, 3, 5], [0, 2, 1]] -> z_rec = [[0.5, 3], [0, 2]]
    feats = clamped_features(site, S, H_DEF.double(), (H_DEF + DELTA).double())
    assert feats.z_def.dtype == torch.float32 and feats.z_rec.dtype == torch.float32
    assert feats.z_def.tolist() == [[1.0, 0.0], [0.0, 2.0]]
    assert feats.z_rec.tolist() == [[0.5, 3.0], [0.0, 2.0]]
    assert not feats.z_rec.requires_grad


def test_every_metric_of_a_hand_example(site):
    # dz = z_rec - z_def = [[-0.5, 3], [0, 0]]
    # activation drift  = ||dz|| = sqrt(0.25 + 9) = sqrt(9.25)
    # decode drift      = ||dz @ W_dec[S]||: row 0 = -0.5 [2,0,0] + 3 [0,0,3] = [-1, 0, 9] -> sqrt(82)
    # ||z_def||         = sqrt(1 + 4) = sqrt(5)
    # relative drift    = sqrt(9.25) / (sqrt(5) + EPS)
    # floor violation   = ||[z_def - z_rec]_+|| / (sqrt(5) + EPS) = ||[[0.5, 0], [0, 0]]|| / ... = 0.5 / sqrt(5)
    #                     (without the [.]_+ it would be sqrt(9.25) / sqrt(5))
    # silenced (z_def <= 0): (row 0, f1) and (row 1, f0); reactivated (z_rec > 0) of those: (0, f1) (z_rec = 3)
    #                     -> reactivated fraction 1 of 4 pairs; zero-reactivation False although recovered
    # delta norm        = sqrt(0.25 + 9 + 1) = sqrt(10.25); h_def's row norms are sqrt(26) and 2 (no sink:
    #                     sqrt(26) <= 10 x 2), the scale sqrt(R) x the (lower) median row norm = sqrt(2) x 2
    # c1 residual       = max_rows ||A^T d|| / (||A||_2 ||d|| + EPS) with A = [e0 e1], ||A||_2 = 1:
    #                     row 0: ||[-0.5, 3]|| / ||d_0|| = 1; row 1: ||[0, 0]|| = 0 -> 1
    m = metrics(site, DELTA)
    assert m["activation_drift"] == pytest.approx(math.sqrt(9.25), rel=1e-6)
    assert m["decode_drift"] == pytest.approx(math.sqrt(82.0), rel=1e-6)
    assert m["relative_drift"] == pytest.approx(math.sqrt(9.25) / (math.sqrt(5.0) + EPS), rel=1e-6)
    assert m["floor_violation"] == pytest.approx(0.5 / (math.sqrt(5.0) + EPS), rel=1e-6)
    assert m["reactivated_fraction"] == 0.25
    assert m["reactivated_fraction_eligible"] == 0.5  # 1 reactivated of the 2 silenced pairs
    assert m["zero_reactivation"] is False
    assert m["delta_norm"] == pytest.approx(math.sqrt(10.25), rel=1e-6)
    assert m["relative_delta_norm"] == pytest.approx(math.sqrt(10.25) / (2 * math.sqrt(2.0) + EPS), rel=1e-6)
    assert m["c1_residual"] == pytest.approx(1.0, abs=1e-8)
    assert set(m) == {"activation_drift", "decode_drift", "relative_drift", "floor_violation",
                      "reactivated_fraction", "reactivated_fraction_eligible", "zero_reactivation", "delta_norm",
                      "relative_delta_norm", "c1_residual"}


def test_silenced_features_are_those_at_or_below_eta(site):
    # eta = 1: silenced pairs are z_def <= 1: (0, f0) with z_def = 1 exactly, (0, f1), (1, f0).
    # delta = [[1, 0, 0], 0] -> z_rec = [[2, 0], [0, 2]]: only (0, f0) ends above eta -> 1 / 4.
    # ("z_def < eta" would not count (0, f0) as silenced and report 0.)
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m = metrics(site, d, eta=1.0)
    assert m["reactivated_fraction"] == 0.25 and m["zero_reactivation"] is False
    # eta = 0 with a zero feature that rises: (1, f0) goes 0 -> 0.5 -> 1 of 4
    d = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assert metrics(site, d)["reactivated_fraction"] == 0.25
    # a zero feature that stays at 0 is not reactivated ("z_rec >= eta" would count it)
    d = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    m = metrics(site, d)
    assert m["reactivated_fraction"] == 0.0 and m["zero_reactivation"] is True
    # a feature above eta that grows further was never silenced: z_def = 2 > 1 at (1, f1)
    d = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    assert metrics(site, d, eta=1.0)["reactivated_fraction"] == 0.0


def test_zero_reactivation_needs_recovery_and_no_reactivation(site):
    # delta = [[0, -1, 1], [-1, 0, 0]] -> h_rec = [[1, -1, 6], [-1, 2, 0]] -> z_rec = z_def: nothing moves
    d = torch.tensor([[0.0, -1.0, 1.0], [-1.0, 0.0, 0.0]])
    m = metrics(site, d)
    assert m["zero_reactivation"] is True
    assert m["activation_drift"] == 0.0 and m["decode_drift"] == 0.0
    assert m["relative_drift"] == 0.0 and m["floor_violation"] == 0.0
    assert metrics(site, d, recovered=False)["zero_reactivation"] is False
    # c1: row 0 A^T d = [0, -1], ||d_0|| = sqrt(2) -> 1/sqrt(2); row 1: [-1, 0] / 1 -> 1; max 1
    assert m["c1_residual"] == pytest.approx(1.0, abs=1e-8)


def test_floor_violation_counts_only_features_pushed_below_their_defended_value(site):
    # z_def = [[1, 0], [0, 2]]; delta lowers f0 at row 0 by 1 (1 -> 0) and raises f1 at row 1 by 4 (2 -> 6):
    # floor = ||[[1, 0], [0, 0]]|| = 1 -> 1 / sqrt(5); relative drift = ||[[-1, 0], [0, 4]]|| / sqrt(5) = sqrt(17) / sqrt(5)
    d = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    m = metrics(site, d)
    assert m["floor_violation"] == pytest.approx(1.0 / (math.sqrt(5.0) + EPS), rel=1e-6)
    assert m["relative_drift"] == pytest.approx(math.sqrt(17.0) / (math.sqrt(5.0) + EPS), rel=1e-6)
    # only raises: no floor violation at all
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    assert metrics(site, d)["floor_violation"] == 0.0


def test_relative_metrics_are_undefined_when_the_defended_features_are_zero(site):
    # h_def = [[-1, -2, 4]] with S = [0, 1] -> z_def = [0, 0], ||z_def|| = 0 <= 1e-6 -> NaN;
    # delta = 3 e0 -> z_rec = [2, 0]: activation drift 2, one of the two silenced pairs reactivated
    h = torch.tensor([[-1.0, -2.0, 4.0]])
    d = torch.tensor([[3.0, 0.0, 0.0]])
    m = metrics(site, d, h_def=h)
    assert math.isnan(m["relative_drift"]) and math.isnan(m["floor_violation"])
    assert m["activation_drift"] == pytest.approx(2.0)  # z_rec = [2, 0]
    assert m["reactivated_fraction"] == 0.5
    # the threshold itself: ||z_def|| = 1e-6 is still undefined, 2e-6 is defined, 0.5 too
    assert math.isnan(_relative(1.0, 1e-6))
    assert _relative(1.0, 2e-6) == pytest.approx(1.0 / (2e-6 + EPS), rel=1e-12)
    assert _relative(1.0, 0.5) == pytest.approx(1.0 / (0.5 + EPS), rel=1e-12)
    assert _relative(0.0, 0.5) == 0.0


def test_an_empty_feature_set_has_no_pairs(site):
    empty = torch.zeros(0, dtype=torch.long)
    m = metrics(site, DELTA, features=empty)
    assert m["reactivated_fraction"] == 0.0 and m["c1_residual"] == 0.0
    assert m["activation_drift"] == 0.0 and m["decode_drift"] == 0.0
    assert math.isnan(m["relative_drift"])
    assert m["zero_reactivation"] is True
    assert m["delta_norm"] == pytest.approx(math.sqrt(10.25), rel=1e-6)


# --- c1_residual ----------------------------------------------------------------------------


def test_c1_residual_is_exactly_one_for_a_delta_inside_span_a():
    # A = [e0 e1] in R^3: ||A||_2 = 1 but ||A||_F = sqrt(2). delta = e0 + e1 lies in span(A):
    # ||A^T d|| = ||[1, 1]|| = sqrt(2), ||d|| = sqrt(2) -> sqrt(2) / (1 * sqrt(2) + EPS) = 1
    # (the Frobenius norm would give 1 / sqrt(2))
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    d = torch.tensor([[1.0, 1.0, 0.0]])
    assert c1_residual(a, d) == pytest.approx(1.0, abs=1e-8)
    # a scaled A changes nothing: 3A has ||3A||_2 = 3 and ||3A^T d|| = 3 sqrt(2)
    assert c1_residual(3.0 * a, d) == pytest.approx(1.0, abs=1e-8)


def test_c1_residual_is_one_over_sqrt_two_at_45_degrees():
    # A = [e0 e1], delta = e0 + e2: ||A^T d|| = ||[1, 0]|| = 1, ||d|| = sqrt(2) -> 1 / sqrt(2)
    # (the Frobenius norm of A would give 1/2)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 1.0]])
    assert c1_residual(a, d) == pytest.approx(1.0 / math.sqrt(2.0), abs=1e-8)
    # rows are taken one by one and the largest kept: [e2 (0), e0 + e2 (1/sqrt 2), 2 e2 (0)]
    rows = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    assert c1_residual(a, rows) == pytest.approx(1.0 / math.sqrt(2.0), abs=1e-8)
    # a delta orthogonal to span(A) has residual 0; empty inputs give 0
    assert c1_residual(a, torch.tensor([[0.0, 0.0, 5.0]])) == 0.0
    assert c1_residual(a, torch.zeros(0, 3)) == 0.0
    assert c1_residual(torch.zeros(3, 0), d) == 0.0


def test_c1_residual_uses_the_largest_singular_value():
    # A = [[3, 0], [0, 1]] (||A||_2 = 3, ||A||_F = sqrt(10)); d = e1: ||A^T d|| = 1 -> 1 / 3
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert c1_residual(a, torch.tensor([[0.0, 1.0]])) == pytest.approx(1.0 / 3.0, abs=1e-8)
    # the zero row contributes 0 / (0 + EPS) = 0, not NaN
    assert c1_residual(a, torch.tensor([[0.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0 / 3.0, abs=1e-8)


# --- the recovery-path decomposition ---------------------------------------------------------


def test_decomposition_of_a_hand_delta(site):
    # all features: z_def = relu(H_DEF) = [[1, 0, 5], [0, 2, 0]], z_rec = relu(H_DEF + DELTA) = [[0.5, 3, 5], [0, 2, 1]]
    # dz = [[-0.5, 3, 0], [0, 0, 1]]; clamped S = {f0}
    # sae_explained = dz @ W_dec = [[-1, 0, 9], [0, 1, 0]]                        -> sqrt(83)
    # clamped       = dz[:, f0] W_dec[f0] = [[-1, 0, 0], [0, 0, 0]]               -> 1
    # nonclamped    = 3 [0,0,3] (row 0) + 1 [0,1,0] (row 1) = [[0, 0, 9], [0, 1, 0]] -> sqrt(82)
    # top-1 non-clamped by ||dz_j||: f1 (3) before f2 (1) -> [[0, 0, 9], [0, 0, 0]] -> 9
    # topk_knockout = delta - that = [[-0.5, 3, -9], [0, 0, 1]]                    -> sqrt(91.25)
    # residual      = delta - sae_explained = [[0.5, 3, -9], [0, -1, 1]]           -> sqrt(92.25)
    dec = decompose(site, torch.tensor([0]), H_DEF, DELTA, top_k=1)
    want = {"delta": math.sqrt(10.25), "sae_explained": math.sqrt(83.0), "clamped": 1.0,
            "nonclamped": math.sqrt(82.0), "topk_nonclamped": 9.0, "topk_knockout": math.sqrt(91.25),
            "residual": math.sqrt(92.25)}
    for name, v in want.items():
        assert dec["norms"][name] == pytest.approx(v, rel=1e-6), name
        assert dec["shares"][name] == pytest.approx(v / (math.sqrt(10.25) + EPS), rel=1e-6), name
        assert dec["energy"][name] == pytest.approx((v / (math.sqrt(10.25) + EPS)) ** 2, rel=1e-6), name
    assert dec["components"]["residual"].tolist() == [[0.5, 3.0, -9.0], [0.0, -1.0, 1.0]]
    assert dec["components"]["topk_knockout"].tolist() == [[-0.5, 3.0, -9.0], [0.0, 0.0, 1.0]]
    assert dec["dz"].tolist() == [[-0.5, 3.0, 0.0], [0.0, 0.0, 1.0]]
    assert dec["topk_features"].tolist() == [1] and dec["n_changed"] == 2
    # top-k larger than what moved: both, strongest first; top-k 0: nothing
    assert decompose(site, torch.tensor([0]), H_DEF, DELTA, top_k=5)["topk_features"].tolist() == [1, 2]
    zero = decompose(site, torch.tensor([0]), H_DEF, DELTA, top_k=0)
    assert zero["topk_features"].tolist() == [] and zero["norms"]["topk_nonclamped"] == 0.0
    assert zero["norms"]["topk_knockout"] == pytest.approx(math.sqrt(10.25), rel=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        decompose(site, torch.tensor([0]), H_DEF, DELTA, top_k=-1)


def test_decomposition_ties_keep_the_lower_feature_first(site):
    # dz = [[0, 2, 2]] at one row (f1 and f2 rise by 2 each from 0): equal strength, stable order f1, f2
    h = torch.tensor([[1.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 2.0, 2.0]])
    dec = decompose(site, torch.tensor([0]), h, d, top_k=1)
    assert dec["topk_features"].tolist() == [1] and dec["n_changed"] == 2
    assert dec["norms"]["clamped"] == 0.0


# --- re-analysis comparisons --------------------------------------------------------------------


def test_compare_value_abs_and_rel():
    # recorded 2.0, recomputed 2.5: abs 0.5, rel 0.5 / 2.5 = 0.2
    c = analysis.compare_value(2.0, 2.5, atol=0.1, rtol=0.1)
    assert c == {"abs": 0.5, "rel": 0.2, "ok": False}
    assert analysis.compare_value(2.0, 2.5, atol=0.5, rtol=0.0)["ok"] is True  # abs <= atol
    assert analysis.compare_value(2.0, 2.5, atol=0.0, rtol=0.2)["ok"] is True  # rel <= rtol
    assert analysis.compare_value(-2.0, -2.5, atol=0.0, rtol=0.1)["rel"] == 0.2
    assert analysis.compare_value(0.0, 0.0, atol=0.0, rtol=0.0) == {"abs": 0.0, "rel": 0.0, "ok": True}
    # booleans: equal or not
    assert analysis.compare_value(True, True, atol=0, rtol=0) == {"abs": 0.0, "rel": 0.0, "ok": True}
    assert analysis.compare_value(True, False, atol=1, rtol=1) == {"abs": 1.0, "rel": 1.0, "ok": False}
    assert analysis.compare_value(1, True, atol=1, rtol=1)["ok"] is False
    # null recorded: matches a non-finite recomputation only
    assert analysis.compare_value(None, math.nan, atol=0, rtol=0) == {"abs": 0.0, "rel": 0.0, "ok": True}
    assert analysis.compare_value(None, 1.0, atol=9, rtol=9) == {"abs": math.inf, "rel": math.inf, "ok": False}
    # non-finite on either side: equal infinities or two NaNs match
    assert analysis.compare_value(math.inf, math.inf, atol=0, rtol=0)["ok"] is True
    assert analysis.compare_value(math.nan, math.nan, atol=0, rtol=0)["ok"] is True
    assert analysis.compare_value(1.0, math.inf, atol=9, rtol=9) == {"abs": math.inf, "rel": math.inf, "ok": False}
    assert analysis.compare_value(math.inf, 1.0, atol=9, rtol=9)["ok"] is False
    assert analysis.compare_value(math.inf, math.inf, atol=0, rtol=0) == {"abs": 0.0, "rel": 0.0, "ok": True}
    # NaN against infinity is a mismatch (only two NaNs, or equal infinities, match)
    assert analysis.compare_value(math.nan, math.inf, atol=9, rtol=9)["ok"] is False
    assert analysis.compare_value(math.inf, math.nan, atol=9, rtol=9)["ok"] is False
    # a NumPy bool equal to the recorded bool is the same value
    assert analysis.compare_value(True, np.bool_(True), atol=0, rtol=0)["ok"] is True
    # values below 1: rel = 0.05 / 0.25 = 0.2, not 0
    c = analysis.compare_value(0.2, 0.25, atol=0.0, rtol=0.1)
    assert c["abs"] == pytest.approx(0.05) and c["rel"] == pytest.approx(0.2) and c["ok"] is False


def test_tensor_diff_is_the_largest_elementwise_difference():
    # saved [1, -4], new [1.5, -4]: abs 0.5, scale max(4, 4) = 4 -> rel 0.125
    c = analysis._tensor_diff(torch.tensor([1.0, -4.0]), torch.tensor([1.5, -4.0]), atol=0.1, rtol=0.2)
    assert c == {"abs": 0.5, "rel": 0.125, "ok": True}
    assert analysis._tensor_diff(torch.tensor([1.0, -4.0]), torch.tensor([1.5, -4.0]), atol=0.1, rtol=0.1)["ok"] is False
    assert analysis._tensor_diff(torch.tensor([1.0]), torch.tensor([1.0]), atol=0, rtol=0)["ok"] is True
    # the scale is the larger of the two: saved [0], new [2] -> rel 1
    assert analysis._tensor_diff(torch.zeros(1), torch.tensor([2.0]), atol=0, rtol=0)["rel"] == 1.0
    assert analysis._tensor_diff(torch.zeros(2), torch.zeros(2), atol=0, rtol=0) == {"abs": 0.0, "rel": 0.0, "ok": True}
    assert analysis._tensor_diff(torch.zeros(0), torch.zeros(0), atol=0, rtol=0) == {"abs": 0.0, "rel": 0.0, "ok": True}
    bad = analysis._tensor_diff(torch.zeros(2), torch.zeros(3), atol=1, rtol=1)
    assert bad["ok"] is False and bad["abs"] == math.inf and "(2,)" in bad["note"]


def test_h_rec_rounds_to_the_model_dtype_unless_reclamped():
    # 1 + 2^-10 is not a bfloat16 number (8 significant bits): it rounds to 1
    h, d = torch.tensor([[1.0]]), torch.tensor([[2.0 ** -10]])
    assert analysis._h_rec(h, d, reclamp=False, model_dtype=torch.bfloat16).item() == 1.0
    assert analysis._h_rec(h, d, reclamp=True, model_dtype=torch.bfloat16).item() == 1.0 + 2.0 ** -10
    assert analysis._h_rec(h, d, reclamp=False, model_dtype=torch.float32).item() == 1.0 + 2.0 ** -10
    assert analysis._h_rec(h, d, reclamp=False, model_dtype=torch.float64).item() == 1.0 + 2.0 ** -10
    assert analysis._model_dtype({"model": {"dtype": "torch.bfloat16"}}) == torch.bfloat16
    assert analysis._model_dtype({"model": {"dtype": "float16"}}) == torch.float16
    assert analysis._model_dtype({}) == torch.float32
    assert analysis._model_dtype({"model": {"dtype": "no_such_dtype"}}) == torch.float32


def test_aggregate_takes_maxima_counts_and_means():
    def ex(eid, a, r, ok, share, norm):
        dec = {"norms": {c: norm for c in analysis.COMPONENTS}, "shares": {c: norm / 2 for c in analysis.COMPONENTS},
               "energy": {c: (norm / 2) ** 2 for c in analysis.COMPONENTS}, "n_changed": int(norm)}
        return {"example_id": eid, "checks": {"m": {"abs": a, "rel": r, "ok": ok}}, "encoder_null_share": share,
                "decomposition": dec}

    # abs 0.1 (a), 0.3 (b), 0.2 (c): max 0.3 at b; rel max 0.5; one mismatch; shares 1.0 and 0.5 (c unknown)
    agg = analysis._aggregate([ex("a", 0.1, 0.5, True, 1.0, 2.0), ex("b", 0.3, 0.2, False, 0.5, 4.0),
                               ex("c", 0.2, 0.1, True, None, 6.0)])
    assert agg["n"] == 3
    assert agg["checks"]["m"] == {"n": 3, "max_abs": 0.3, "max_rel": 0.5, "n_mismatch": 1, "worst_example": "b"}
    assert agg["encoder_null_share_mean"] == 0.75 and agg["encoder_null_share_min"] == 0.5
    assert agg["decomposition"]["delta"] == {"norm_mean": 4.0, "share_mean": 2.0, "energy_mean": (1 + 4 + 9) / 3}
    assert agg["n_changed_mean"] == 4.0
    empty = analysis._aggregate([])
    assert empty["n"] == 0 and empty["encoder_null_share_mean"] is None and empty["encoder_null_share_min"] is None
    assert analysis._mean([1.0, None, math.nan, 3.0]) == 2.0 and analysis._mean([]) is None


def test_an_attention_sink_row_sets_no_relative_scale(site):
    """A third row at position 0 with a norm of 1000 (500x the median 2; real models' first
    position is ~100x): without the sink rule it would make relative_delta_norm ~ 3.2e-3 and the
    relative drift sqrt(9.25 + 1e4) / sqrt(5 + 1e6) ~ 0.1; with it both are the two-row values.
    h_def rows: [1000, 0, 0] (a sink: 1000 > 10 x sqrt(26), the median of the norms 1000, sqrt(26),
    2), then H_DEF's [1, 0, 5], [0, 2, 0]; delta rows [0, 100, 0] (on the sink), then DELTA's."""
    h_def = torch.cat([torch.tensor([[1000.0, 0.0, 0.0]]), H_DEF])
    delta = torch.cat([torch.tensor([[0.0, 100.0, 0.0]]), DELTA])
    m = metrics(site, delta, h_def=h_def)
    # sink row: z_def = relu([1000, 0, 0])[S] = [1000, 0], z_rec = [1000, 100] (dz = [0, 100])
    assert m["activation_drift"] == pytest.approx(math.sqrt(9.25 + 1e4), rel=1e-6)  # absolute: every row
    # relative drift and floor over the two other rows: as in the hand example
    assert m["relative_drift"] == pytest.approx(math.sqrt(9.25) / (math.sqrt(5.0) + EPS), rel=1e-6)
    assert m["floor_violation"] == pytest.approx(0.5 / (math.sqrt(5.0) + EPS), rel=1e-6)
    # ||delta|| = sqrt(1e4 + 10.25); scale = sqrt(3) x median(1000, sqrt(26), 2) = sqrt(3) x sqrt(26)
    assert m["relative_delta_norm"] == pytest.approx(math.sqrt(1e4 + 10.25) / (math.sqrt(3 * 26.0) + EPS), rel=1e-6)
    assert sink_rows(h_def).tolist() == [True, False, False]
    assert float(row_scale(h_def)) == pytest.approx(math.sqrt(78.0), rel=1e-6)


def test_row_scale_sink_rows_and_residual_scales_of_hand_rows():
    # norms 5, 1, 2: median 2, times sqrt(3)
    assert float(row_scale(torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]]))) == pytest.approx(2 * math.sqrt(3))
    assert float(row_scale(torch.zeros(0, 2))) == 0.0
    # a sink is a row over 10 x the median norm: 10 itself is not
    assert sink_rows(torch.tensor([[1.0], [1.0], [10.0]])).tolist() == [False, False, False]
    assert sink_rows(torch.tensor([[1.0], [-1.0], [10.5]])).tolist() == [False, False, True]
    assert sink_rows(torch.tensor([[3.0, 4.0]])).tolist() == [False] and sink_rows(torch.zeros(0, 3)).tolist() == []
    empty = residual_scales([torch.zeros(0, 2, 3)], torch.zeros(0, 2, dtype=torch.bool))
    assert empty.shape == (0,) and empty.dtype == torch.float32
    # two examples, rows picked by the mask: [3, 4] alone (5), and [0, 1], [0, 2] (lower median 1, x sqrt 2)
    h = torch.tensor([[[3.0, 4.0], [9.0, 9.0]], [[0.0, 1.0], [0.0, 2.0]]])
    scales = residual_scales([h], torch.tensor([[True, False], [True, True]]))
    assert scales.tolist() == pytest.approx([5.0, math.sqrt(2)])


def test_c1_residual_of_a_one_by_one_encoder():
    # A = [[2]], delta = [[3]]: |3 x 2| / (2 x 3 + EPS) = 1 (to EPS)
    assert c1_residual(torch.tensor([[2.0]]), torch.tensor([[3.0]])) == pytest.approx(6.0 / (6.0 + EPS), abs=1e-12)


def test_eligible_fraction_and_the_default_eta(site):
    # S = {f0}: z_def[:, 0] = [1, 0] -> one eligible pair (row 1); delta 0.7 there -> z_rec = 0.7:
    # reactivated 1 of 1
    delta = torch.tensor([[-0.5, 3.0, 0.0], [0.7, 0.0, 1.0]])
    m = metrics(site, delta, features=torch.tensor([0]))
    assert m["reactivated_fraction_eligible"] == 1.0
    # eta defaults to 0: z_def = 0 -> z_rec = 0.5 is a reactivation of the clamped feature
    h = torch.tensor([[0.0, 0.0, 0.0]])
    d = torch.tensor([[0.5, 0.0, 0.0]])
    feats = clamped_features(site, torch.tensor([0]), h, h + d)
    m = example_metrics(site=site, features=torch.tensor([0]), feats=feats, delta_rows=d, h_def_rows=h,
                        a=site.encoder_columns(torch.tensor([0])), recovered=True)
    assert m["zero_reactivation"] is False
