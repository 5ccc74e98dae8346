"""Exact values of the summary statistics (runs/stats.py): Wilson intervals worked out from the
formula, the bootstrap interval against a direct quantile of the same seeded resamples (so a
90% interval passed off as 95% fails), and the per-mode summary of hand-made records."""

from __future__ import annotations

import math

import numpy as np
import pytest
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
