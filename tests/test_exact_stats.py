"""Exact values of the summary statistics (runs/stats.py): Wilson intervals worked out from the
formula, the bootstrap interval against a direct quantile of the same seeded resamples (so a
90% interval passed off as 95% fails), and the per-mode summary of hand-made records."""

from __future__ import annotations

import math

import numpy as np
import pytest
from saerecover.experiments import sweeps
from saerecover.runs import stats
from saerecover.runs.stats import bootstrap_ci, summarize, wilson_interval


def direct_bootstrap(x, *, n_resamples, seed, level):
    """The percentile bootstrap written out: n_resamples means of n draws with replacement from
    NumPy default_rng(seed), then their (1 - level) / 2 and (1 + level) / 2 quantiles."""
    x = np.asarray(x, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# --- Wilson --------------------------------------------------------------------------------------


def test_wilson_from_the_formula():
    # center = (p + z^2 / 2n) / (1 + z^2 / n), half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
    # k = 5, n = 10, z = 1: p = 0.5, denom 1.1, center 0.55 / 1.1 = 0.5,
    #   half = sqrt(0.025 + 0.0025) / 1.1 = sqrt(0.0275) / 1.1
    half = math.sqrt(0.0275) / 1.1
    assert wilson_interval(5, 10, z=1.0) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-15)
    # k = 1, n = 4, z = 2: p = 0.25, z^2 = 4, denom 2, center (0.25 + 0.5) / 2 = 0.375,
    #   half = 2 sqrt(0.046875 + 0.0625) / 2 = sqrt(0.109375)
    half = math.sqrt(0.109375)
    assert wilson_interval(1, 4, z=2.0) == pytest.approx((0.375 - half, 0.375 + half), abs=1e-15)
    # k = 0, n = 4, z = 2: the lower bound is exactly 0; center (0 + 0.5) / 2 = 0.25,
    #   half = 2 sqrt(0 + 4 / 64) / 2 = 0.25 -> upper 0.5
    assert wilson_interval(0, 4, z=2.0) == (0.0, 0.5)
    # k = n = 4, z = 2: the upper bound is exactly 1, the lower 1 - 0.5
    assert wilson_interval(4, 4, z=2.0) == (0.5, 1.0)
    # the default z is the 0.975 normal quantile: 0 of 10 -> upper z^2/10 / (1 + z^2/10)
    z2 = stats.Z95 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, (z2 / 10) / (1 + z2 / 10)), abs=1e-15)
    assert stats.Z95 == pytest.approx(1.959963984540054, abs=1e-15)


def test_wilson_input_checks():
    assert wilson_interval(0, 0) is None
    assert wilson_interval(2.0, 4.0) == wilson_interval(2, 4)  # integral floats are counts
    for bad in [(-1, 4), (5, 4), (0, -1)]:
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="integers"):
        wilson_interval(1, 4.5)
    with pytest.raises(TypeError, match="bools"):
        wilson_interval(1, True)
    for z in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="z must be"):
            wilson_interval(1, 4, z=z)


# --- bootstrap -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "n_resamples", "seed", "level"), [
    (5, 2000, 0, 0.95),     # the defaults
    (5, 2000, 7, 0.95),
    (12, 500, 3, 0.90),
    (12, 500, 3, 0.99),
    (5000, 2000, 1, 0.95),  # 4e6 // 5000 = 800 resamples per chunk: three chunks
])
def test_bootstrap_is_the_direct_quantile_of_seeded_resamples(n, n_resamples, seed, level):
    x = np.random.default_rng(100 + n).exponential(size=n)
    got = bootstrap_ci(x, n_resamples=n_resamples, seed=seed, level=level)
    assert got == pytest.approx(direct_bootstrap(x, n_resamples=n_resamples, seed=seed, level=level), abs=1e-12)


def test_bootstrap_defaults_are_95_percent_2000_resamples_seed_0():
    x = [1.0, 2.0, 3.0, 4.0, 10.0]
    want = direct_bootstrap(x, n_resamples=2000, seed=0, level=0.95)
    assert bootstrap_ci(x) == pytest.approx(want, abs=1e-12)
    # a 90% interval is strictly narrower here: passing one off as the other shows
    narrow = direct_bootstrap(x, n_resamples=2000, seed=0, level=0.90)
    assert narrow[0] > want[0] and narrow[1] < want[1]
    assert stats.BOOTSTRAP_RESAMPLES == 2000 and stats.BOOTSTRAP_SEED == 0


def test_bootstrap_of_two_values_by_hand():
    # x = [0, 1], one resample of 2 draws: its mean is 0, 0.5 or 1. With 1 resample the quantiles
    # of a single mean are that mean: (m, m), m from the first two draws of default_rng(seed).
    draws = np.random.default_rng(4).integers(0, 2, size=(1, 2))
    m = float(draws.mean())
    assert bootstrap_ci([0.0, 1.0], n_resamples=1, seed=4) == (m, m)
    # an iterable that is not a list or array works (consumed once)
    assert bootstrap_ci(iter([0.0, 1.0]), n_resamples=1, seed=4) == (m, m)


def test_bootstrap_edges_and_checks():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci(np.array([2.5])) == (2.5, 2.5)
    assert bootstrap_ci([-1.5, -1.5, -1.5]) == (-1.5, -1.5)
    for bad in ([1.0, math.inf], [math.nan]):
        with pytest.raises(ValueError, match="finite"):
            bootstrap_ci(bad)
    for level in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="level"):
            bootstrap_ci([1.0, 2.0], level=level)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
    # the result stays inside [min, max] and is a pair of Python floats
    lo, hi = bootstrap_ci([0.0, 0.0, 0.0, 1.0], n_resamples=50)
    assert 0.0 <= lo <= hi <= 1.0 and type(lo) is float and type(hi) is float


# --- the per-mode summary ------------------------------------------------------------------------


def rec(eid, mode="none", *, valid=True, recovered=True, failed=False, error=None, **metrics):
    return {"example_id": eid, "mode": mode, "valid": valid, "recovered": recovered, "failed": failed,
            "error": error, **metrics}


def test_summary_of_hand_records():
    # mode "none": a, b, c, d valid; e not valid. c failed (error "x"), d not recovered.
    #   recovered 2 of n_valid 4 (the failed one counts as not recovered) -> rate 0.5, Wilson(2, 4)
    #   zero-reactivation: a (recovered, True) counts; b (recovered, False) does not; d (True but not
    #   recovered) does not -> 1 of 4
    #   activation drift over a, b, d (c failed; e invalid): 0.1, 0.2, 0.6 -> mean 0.3, bootstrap of those
    #   delta_norm: a 1.0, b None (left out), d "nan" (not a number: left out) -> n 1, mean 1.0
    #   c1_residual: a 1e-7, b 3e-7, d 2e-7 -> max 3e-7; steps: 10, 20, 30 -> mean 20
    recs = [
        rec("a", zero_reactivation=True, activation_drift=0.1, delta_norm=1.0, c1_residual=1e-7, steps=10),
        rec("b", zero_reactivation=False, activation_drift=0.2, delta_norm=None, c1_residual=3e-7, steps=20),
        rec("c", recovered=None, failed=True, error="x", activation_drift=9.0),
        rec("d", recovered=False, zero_reactivation=True, activation_drift=0.6, delta_norm="nan", c1_residual=2e-7,
            steps=30),
        rec("e", valid=False, recovered=None, activation_drift=5.0),
    ]
    s = summarize(recs, task="t", n_resamples=300, seed=5)
    assert (s["n_examples"], s["n_valid"], s["n_records"]) == (5, 4, 5)
    m = s["modes"]["none"]
    assert (m["n_records"], m["n_valid"], m["n_failed"], m["n_evaluated"]) == (5, 4, 1, 3)
    assert m["recovered"] == 2 and m["recovery_rate"] == 0.5
    assert m["recovery_rate_ci95"] == list(wilson_interval(2, 4))
    assert m["zero_reactivation_recovered"] == 1 and m["zero_reactivation_rate"] == 0.25
    assert m["zero_reactivation_rate_ci95"] == list(wilson_interval(1, 4))
    assert m["activation_drift_n"] == 3
    assert m["activation_drift_mean"] == pytest.approx(0.3, abs=1e-15)
    assert m["activation_drift_ci95"] == list(bootstrap_ci([0.1, 0.2, 0.6], n_resamples=300, seed=5))
    assert m["activation_drift_ci95"] != list(bootstrap_ci([0.1, 0.2, 0.6], n_resamples=300, seed=6))
    assert (m["delta_norm_n"], m["delta_norm_mean"], m["delta_norm_ci95"]) == (1, 1.0, [1.0, 1.0])
    assert m["c1_residual_max"] == 3e-7 and m["c1_residual_n"] == 3
    assert m["steps_mean"] == 20.0
    assert m["errors"] == ["x"]
    assert m["relative_drift_n"] == 0 and m["relative_drift_mean"] is None and m["relative_drift_ci95"] is None
    assert s["intervals"] == {"rates": "Wilson score 95%",
                              "continuous": "95% percentile bootstrap of the mean (300 resamples, seed 5)"}


def test_summary_counts_only_true_values():
    # recovered must be True (not 1, not "yes"); valid must be True; failed only when True
    recs = [rec("a", recovered=1), rec("b", recovered="yes"), rec("c", valid=1), rec("d", failed=1)]
    m = summarize(recs, task="t")["modes"]["none"]
    assert m["n_valid"] == 3 and m["recovered"] == 1 and m["n_failed"] == 0
    # no record reports zero_reactivation: the rate is unknown, not 0
    assert m["zero_reactivation_rate"] is None and m["zero_reactivation_recovered"] is None
    assert m["zero_reactivation_rate_ci95"] is None


def test_summary_errors_are_the_first_five_distinct():
    recs = [rec(f"e{i}", recovered=None, failed=True, error=f"err{i % 7}") for i in range(12)]
    recs.append(rec("z", recovered=None, failed=True, error=None))
    m = summarize(recs, task="t")["modes"]["none"]
    assert m["errors"] == ["err0", "err1", "err2", "err3", "err4"]
    assert m["n_failed"] == 13 and m["recovery_rate"] == 0.0 and m["steps_mean"] is None


def test_summary_modes_order_and_extra():
    recs = [rec("a", "encoder"), rec("a", "none"), rec("b", "encoder", valid=False)]
    s = summarize(recs, task="t")
    assert list(s["modes"]) == ["encoder", "none"]  # first seen
    assert s["n_valid"] == 1 and s["n_examples"] == 2
    s = summarize(recs, task="t", modes=["none", "jacobian"], extra={"n_examples": 9, "task": "u"})
    assert list(s["modes"]) == ["none", "jacobian"] and s["modes"]["jacobian"]["n_records"] == 0
    assert s["n_examples"] == 9 and s["task"] == "u"
    with pytest.raises(ValueError, match="duplicates"):
        summarize(recs, task="t", modes=["none", "none"])
    with pytest.raises(ValueError, match="intervals"):
        summarize(recs, task="t", extra={"intervals": {}})
    with pytest.raises(ValueError, match="record 0 is a list"):
        summarize([[1]], task="t")
    with pytest.raises(ValueError, match=r"record 1 \('b', None\) has no 'mode'"):
        summarize([rec("a"), {"example_id": "b", "valid": True}], task="t")
    with pytest.raises(ValueError, match="duplicate record for example_id='a', mode='none'"):
        summarize([rec("a"), rec("a")], task="t")


def test_finite_number():
    f = stats._finite_number
    assert f(None) is None and f(True) is None and f("x") is None and f([1]) is None
    assert f(math.inf) is None and f(math.nan) is None
    assert f(3) == 3.0 and f("2.5") == 2.5 and f(np.float32(0.5)) == 0.5


# --- the robustness score of a budget sweep ------------------------------------------------------


def rob(eid, recovered, *, valid=True, failed=False, mode="m"):
    return {"example_id": eid, "mode": mode, "valid": valid, "recovered": recovered, "failed": failed}


def test_robustness_by_hand():
    # budgets 1, 2, 4, 8; examples valid at every budget: a, b, c, d, e (f is invalid at 2).
    #   a: recovered at 1, 2, 4, 8       -> 1
    #   b: recovered at 1, not 2, at 4   -> 1, non-monotone
    #   c: recovered at 2, not 4, at 8   -> 2, non-monotone
    #   d: recovered at 8 only           -> 8
    #   e: never                         -> None (+inf in the quantiles)
    # sorted: 1, 1, 2, 8, inf (n = 5); inverted-CDF quantiles: q1 = the 2nd value (ceil(0.25 * 5))
    # = 1, median the 3rd = 2, q3 the 4th = 8; never 1 of 5; smallest recovering budget 1
    table = {"a": (1, 1, 1, 1), "b": (1, 0, 1, 1), "c": (0, 1, 0, 1), "d": (0, 0, 0, 1), "e": (0, 0, 0, 0),
             "f": (1, 1, 1, 1)}
    by_budget = {}
    for i, b in enumerate((1.0, 2.0, 4.0, 8.0)):
        by_budget[b] = [rob(eid, bool(r[i]), valid=not (eid == "f" and b == 2.0)) for eid, r in table.items()]
        by_budget[b].append(rob("a", True, mode="other"))  # other modes are not mixed in
    r = sweeps.robustness(by_budget, ["m"])["m"]
    assert r["per_example"] == {"a": 1.0, "b": 1.0, "c": 2.0, "d": 8.0, "e": None}
    assert (r["n"], r["never"], r["nonmonotone"]) == (5, 1, 2)
    assert (r["q1"], r["median"], r["q3"]) == (1.0, 2.0, 8.0)
    assert r["never_share"] == 0.2 and r["never_share_ci95"] == list(wilson_interval(1, 5))
    assert r["recovered_min"] == 1.0
    # the budgets are taken in increasing order whatever the mapping's order
    assert sweeps.robustness(dict(reversed(list(by_budget.items()))), ["m"])["m"] == r


def test_robustness_edges():
    # failed counts as not recovered; an example recovered only at its largest budget is monotone
    by_budget = {1.0: [rob("a", True, failed=True), rob("b", False)], 2.0: [rob("a", True), rob("b", True)]}
    r = sweeps.robustness(by_budget, ["m"])["m"]
    assert r["per_example"] == {"a": 2.0, "b": 2.0} and r["nonmonotone"] == 0 and r["median"] == 2.0
    # nobody recovered: quantiles and the smallest budget are None, never_share 1
    r = sweeps.robustness({1.0: [rob("a", False)]}, ["m"])["m"]
    assert (r["q1"], r["median"], r["q3"], r["recovered_min"], r["never_share"]) == (None, None, None, None, 1.0)
    # no examples / no budgets / a mode without records
    for r in (sweeps.robustness({1.0: []}, ["m"])["m"], sweeps.robustness({}, ["m"])["m"],
              sweeps.robustness({1.0: [rob("a", True)]}, ["x"])["x"]):
        assert r["n"] == 0 and r["median"] is None and r["never_share"] is None and r["never_share_ci95"] is None
        assert r["per_example"] == {} and r["recovered_min"] is None


def test_check_grid():
    assert sweeps.check_grid([4, 1.5, 2], "budgets", integer=False) == [1.5, 2.0, 4.0]
    out = sweeps.check_grid([8.0, 2], "ks", integer=True)
    assert out == [2, 8] and all(type(v) is int for v in out)
    assert all(type(v) is float for v in sweeps.check_grid([3, 1], "budgets", integer=False))
    assert sweeps.check_grid((0.5,), "budgets", integer=False) == [0.5]
    for bad in ("1,2", b"12", [], None, 3.0, {1.0}):
        with pytest.raises(ValueError, match="must be a non-empty list of numbers"):
            sweeps.check_grid(bad, "budgets", integer=False)
    for bad in ([1.0, True], [1.0, "2"], [math.nan], [math.inf], [0.0], [-1.0], [1e-300, 0]):
        with pytest.raises(ValueError, match="every budget must be a finite number > 0"):
            sweeps.check_grid(bad, "budgets", integer=False)
    with pytest.raises(ValueError, match="every k must be an integer, got 2.5"):
        sweeps.check_grid([2.5], "ks", integer=True)
    with pytest.raises(ValueError, match=r"budgets repeat: \[1.0, 1.0\]"):
        sweeps.check_grid([1, 1.0], "budgets", integer=False)


def test_refusal_summary_by_hand():
    # mode "jacobian": a, b, c valid (d not). non_refusal: a, b True, c "yes" (not True) -> 2 of 3;
    # base_like: a -> 1 of 3; base_like_strict: none -> 0 of 3.
    # phi_relative_drift: 0.1, 0.3 and NaN (left out) -> n 2, mean 0.2; relative_drift: only b's 0.5;
    # jacobian_step_residual: 1e-7, 3e-7 (c's "x" is not a number) -> max 3e-7; c1_residual: 2 (int) -> 2.0
    from saerecover.experiments.refusal import refusal_summary

    recs = [
        {"example_id": "a", "mode": "jacobian", "valid": True, "non_refusal": True, "base_like": True,
         "phi_relative_drift": 0.1, "jacobian_step_residual": 1e-7, "phi_floor_violation": 0.0},
        {"example_id": "b", "mode": "jacobian", "valid": True, "non_refusal": True, "base_like": False,
         "phi_relative_drift": 0.3, "relative_drift": 0.5, "jacobian_step_residual": 3e-7, "c1_residual": 2},
        {"example_id": "c", "mode": "jacobian", "valid": True, "non_refusal": "yes", "phi_relative_drift": math.nan,
         "jacobian_step_residual": "x", "relative_delta_norm": math.inf},
        {"example_id": "d", "mode": "jacobian", "valid": False, "non_refusal": True, "phi_relative_drift": 9.0},
        {"example_id": "a", "mode": "none", "valid": True, "non_refusal": False},
    ]
    out = refusal_summary(recs)
    assert list(out) == ["jacobian", "none"]
    j = out["jacobian"]
    assert (j["n_valid"], j["non_refusal"], j["base_like"], j["base_like_strict"]) == (3, 2, 1, 0)
    assert j["non_refusal_rate"] == 2 / 3 and j["non_refusal_rate_ci95"] == list(wilson_interval(2, 3))
    assert j["base_like_rate"] == 1 / 3 and j["base_like_rate_ci95"] == list(wilson_interval(1, 3))
    assert j["base_like_strict_rate"] == 0.0 and j["base_like_strict_rate_ci95"] == list(wilson_interval(0, 3))
    assert j["phi_relative_drift_n"] == 2 and j["phi_relative_drift_mean"] == pytest.approx(0.2, abs=1e-15)
    assert j["phi_relative_drift_ci95"] == list(bootstrap_ci([0.1, 0.3]))
    assert (j["relative_drift_n"], j["relative_drift_mean"], j["relative_drift_ci95"]) == (1, 0.5, [0.5, 0.5])
    assert (j["phi_floor_violation_n"], j["phi_floor_violation_mean"]) == (1, 0.0)
    assert (j["relative_delta_norm_n"], j["relative_delta_norm_mean"], j["relative_delta_norm_ci95"]) == (0, None, None)
    assert j["jacobian_step_residual_max"] == 3e-7 and j["c1_residual_max"] == 2.0
    n = out["none"]
    assert (n["n_valid"], n["non_refusal"], n["non_refusal_rate"]) == (1, 0, 0.0)
    assert n["jacobian_step_residual_max"] is None and n["c1_residual_max"] is None
    # modes given: their order, and a mode without records
    out = refusal_summary(recs, modes=["suffix", "none"])
    assert list(out) == ["suffix", "none"]
    s = out["suffix"]
    assert s["n_valid"] == 0 and s["non_refusal_rate"] is None and s["non_refusal_rate_ci95"] is None


def test_wilson_bounds_are_exact_at_the_ends():
    # the bounds are exactly 0 at 0 successes and exactly 1 at n successes, for every n, and
    # never outside [0, 1]
    for n in range(1, 60):
        assert stats.wilson_interval(0, n)[0] == 0.0 and stats.wilson_interval(n, n)[1] == 1.0
        for k in range(n + 1):
            lo, hi = stats.wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    with pytest.raises(ValueError, match="need 0 <= successes <= n"):
        stats.wilson_interval(1, 0)
    assert stats._rate(1, 1) == 1.0 and stats._rate(0, 0) is None and stats._rate(1, 2) == 0.5
