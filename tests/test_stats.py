"""Wilson and bootstrap intervals, and the per-mode summary (PAPER_NOTES.md, "Metrics")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from saerecover.runs.stats import CONTINUOUS_METRICS, bootstrap_ci, summarize, wilson_interval

# Wilson 95% intervals from statsmodels 0.15 proportion_confint(k, n, alpha=0.05, method="wilson").
WILSON_KNOWN = {
    (0, 10): (0.0, 0.27753279986288926),
    (10, 10): (0.7224672001371106, 1.0),
    (5, 10): (0.23659309051256394, 0.7634069094874361),
    (1, 1): (0.2065493143772374, 1.0),
    (37, 37): (0.9059421741627973, 1.0),
    (90, 91): (0.9403506433134937, 0.9980575286681507),
}


@pytest.mark.parametrize(("k", "n"), sorted(WILSON_KNOWN))
def test_wilson_known_values(k, n):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(WILSON_KNOWN[(k, n)][0], abs=1e-12)
    assert hi == pytest.approx(WILSON_KNOWN[(k, n)][1], abs=1e-12)


@pytest.mark.parametrize(("k", "n"), [(1, 10), (5, 10), (9, 10), (17, 51), (90, 91)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Wilson bounds are the p with (k/n - p)^2 = z^2 p (1 - p) / n."""
    z = 1.959963984540054
    for p in wilson_interval(k, n):
        assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9)


def test_wilson_matches_statsmodels():
    smp = pytest.importorskip("statsmodels.stats.proportion")
    for n in (1, 2, 7, 10, 24, 91, 256):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            slo, shi = smp.proportion_confint(k, n, alpha=0.05, method="wilson")
            assert lo == pytest.approx(slo, abs=1e-9), (k, n)
            assert hi == pytest.approx(shi, abs=1e-9), (k, n)


def test_wilson_edges_and_errors():
    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and 0 < hi < 1
    lo, hi = wilson_interval(5, 5)
    assert hi == 1.0 and 0 < lo < 1
    for bad in [(-1, 5), (6, 5), (1, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1.5, 5)
    with pytest.raises(TypeError):
        wilson_interval(True, 5)
    # a wider z gives a wider interval
    a, b = wilson_interval(5, 10), wilson_interval(5, 10, z=2.576)
    assert b[0] < a[0] and b[1] > a[1]


def test_bootstrap_deterministic_and_seeded():
    x = np.random.default_rng(1).normal(size=40)
    a = bootstrap_ci(x)
    assert a == bootstrap_ci(list(x))  # same seed, same answer, list or array
    assert a != bootstrap_ci(x, seed=1)
    lo, hi = a
    assert lo < float(x.mean()) < hi
    assert all(isinstance(v, float) for v in a)


def test_bootstrap_edges():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([3.5]) == (3.5, 3.5)
    assert bootstrap_ci([0.0] * 7) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], level=1.0)
    # the interval stays inside the data range
    lo, hi = bootstrap_ci([1.0, 1.0, 1.0, 2.0])
    assert 1.0 <= lo <= hi <= 2.0


def test_bootstrap_large_input_chunks():
    x = np.arange(5000, dtype=float)
    lo, hi = bootstrap_ci(x, n_resamples=1000)
    assert lo < x.mean() < hi
    assert hi - lo < 100  # the standard error of the mean is ~20


def test_bootstrap_coverage_sanity():
    rng = np.random.default_rng(123)
    trials, hits = 200, 0
    for t in range(trials):
        x = rng.exponential(scale=1.0, size=60)
        lo, hi = bootstrap_ci(x, n_resamples=500, seed=t)
        hits += lo <= 1.0 <= hi
    assert 0.85 <= hits / trials <= 0.99


def _rec(eid, mode, *, valid=True, recovered=True, failed=False, **metrics):
    r = {"example_id": eid, "mode": mode, "valid": valid,
         "recovered": (recovered if valid else None), "failed": failed,
         "error": "boom" if failed else None, "zero_reactivation": None}
    if valid and not failed:
        base = {m: 0.1 for m in CONTINUOUS_METRICS}
        base.update(zero_reactivation=False, steps=100)
        base.update(metrics)
        r.update(base)
    return r


def test_summarize_counts_rates_and_metrics():
    recs = [
        _rec("a", "none", activation_drift=0.2, zero_reactivation=True),
        _rec("b", "none", recovered=False, activation_drift=0.4),
        _rec("c", "none", failed=True),
        _rec("d", "none", valid=False),
        _rec("a", "encoder", activation_drift=0.0, c1_residual=1e-7, zero_reactivation=True),
        _rec("b", "encoder", activation_drift=0.0, c1_residual=3e-7, zero_reactivation=True),
        _rec("c", "encoder", activation_drift=float("nan"), c1_residual=0.0),  # NaN: left out
        _rec("d", "encoder", valid=False),
    ]
    s = summarize(recs, task="ioi")
    assert s["task"] == "ioi"
    assert s["n_examples"] == 4 and s["n_valid"] == 3 and s["n_records"] == 8
    assert list(s["modes"]) == ["none", "encoder"]
    none = s["modes"]["none"]
    assert none["n_valid"] == 3 and none["n_failed"] == 1 and none["n_evaluated"] == 2
    assert none["recovered"] == 1
    assert none["recovery_rate"] == pytest.approx(1 / 3)  # the failed one counts as not recovered
    assert none["recovery_rate_ci95"] == pytest.approx(list(wilson_interval(1, 3)))
    assert none["zero_reactivation_rate"] == pytest.approx(1 / 3)
    assert none["activation_drift_mean"] == pytest.approx(0.3)
    assert none["activation_drift_n"] == 2
    assert none["errors"] == ["boom"]
    enc = s["modes"]["encoder"]
    assert enc["recovered"] == 3 and enc["recovery_rate"] == 1.0
    assert enc["recovery_rate_ci95"][1] == 1.0
    assert enc["activation_drift_n"] == 2 and enc["activation_drift_mean"] == 0.0
    assert enc["activation_drift_ci95"] == [0.0, 0.0]
    assert enc["c1_residual_max"] == pytest.approx(3e-7)
    assert enc["zero_reactivation_rate"] == pytest.approx(2 / 3)
    for m in CONTINUOUS_METRICS:
        assert f"{m}_mean" in none and f"{m}_ci95" in none
    json.dumps(s, allow_nan=False)


def test_summarize_zero_valid_is_nan_free():
    recs = [_rec("a", "none", valid=False), _rec("b", "none", valid=False)]
    s = summarize(recs, task="ioi", modes=["none", "encoder"])
    text = json.dumps(s, allow_nan=False)
    assert "NaN" not in text
    for mode in ("none", "encoder"):
        m = s["modes"][mode]
        assert m["n_valid"] == 0
        assert m["recovery_rate"] is None and m["recovery_rate_ci95"] is None
        assert m["zero_reactivation_rate"] is None and m["zero_reactivation_rate_ci95"] is None
        for metric in CONTINUOUS_METRICS:
            assert m[f"{metric}_mean"] is None and m[f"{metric}_ci95"] is None
        assert m["c1_residual_max"] is None
    assert s["modes"]["encoder"]["n_records"] == 0
    assert summarize([], task="t")["modes"] == {}


def test_summarize_modes_extra_and_errors():
    recs = [_rec("a", "none"), _rec("a", "encoder"), _rec("a", "jacobian")]
    extra = {"n_examples": 10, "seconds": 1.5}
    s = summarize(recs, task="t", modes=["encoder", "none"], extra=extra)
    assert list(s["modes"]) == ["encoder", "none"]  # given order; other modes left out
    assert s["n_examples"] == 10 and s["seconds"] == 1.5
    with pytest.raises(ValueError, match="modes"):
        summarize(recs, task="t", extra={"modes": {}})
    with pytest.raises(ValueError, match="duplicate"):
        summarize([_rec("a", "none"), _rec("a", "none")], task="t")
    with pytest.raises(ValueError, match="valid"):
        summarize([{"example_id": "a", "mode": "none"}], task="t")


def test_summarize_zero_reactivation_unknown_when_never_reported():
    recs = [_rec("a", "none"), _rec("b", "none")]
    for r in recs:
        r["zero_reactivation"] = None
    m = summarize(recs, task="t")["modes"]["none"]
    assert m["zero_reactivation_rate"] is None
    assert m["recovery_rate"] == 1.0
    assert not math.isnan(m["relative_drift_mean"])
