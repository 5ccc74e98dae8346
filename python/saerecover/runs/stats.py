"""Aggregate statistics of a run: Wilson intervals for rates, bootstrap intervals for continuous
metrics, and the per-mode summary written to summary.json (PAPER_NOTES.md, "Metrics").

Everything returned is plain JSON: no NaN (a rate over zero examples is ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "CONTINUOUS_METRICS",
    "bootstrap_ci",
    "summarize",
    "wilson_interval",
]

#: z for a two-sided 95% interval (the 0.975 quantile of the standard normal).
Z95 = 1.959963984540054

#: Per-example continuous metrics summarized with a mean and a bootstrap interval (PAPER_NOTES.md).
CONTINUOUS_METRICS = (
    "activation_drift",
    "decode_drift",
    "relative_drift",
    "floor_violation",
    "reactivated_fraction",
    "reactivated_fraction_eligible",
    "delta_norm",
    "relative_delta_norm",
    "budget",
    "relative_budget",
    "c1_residual",
)

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

#: Top-level keys that ``extra`` may not replace (the rest of the computed ones it may).
_PROTECTED_KEYS = frozenset({"modes", "intervals"})


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion ``successes / n``; None when ``n == 0``.

    PAPER_NOTES.md "Metrics": rates carry Wilson 95% intervals. The bounds are exactly 0 at
    ``successes == 0`` and exactly 1 at ``successes == n``.
    """
    if isinstance(successes, bool) or isinstance(n, bool):
        raise TypeError("successes and n must be integer counts, not bools")
    if int(successes) != successes or int(n) != n:
        raise ValueError(f"successes and n must be integers, got {successes!r}, {n!r}")
    successes, n = int(successes), int(n)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"z must be a positive finite number, got {z!r}")
    if n == 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


def bootstrap_ci(
    values: Iterable[float] | np.ndarray,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval for the mean of ``values``; None when there are none.

    Deterministic for a given ``seed`` (NumPy ``default_rng``). Values must be finite: filter
    missing ones first. One value gives ``(v, v)``.
    """
    if not isinstance(values, np.ndarray):
        values = list(values)
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci needs finite values; drop None/NaN first")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    n = x.size
    if n == 0:
        return None
    if n == 1 or np.all(x == x[0]):
        v = float(x[0])
        return (v, v)
    rng = np.random.default_rng(seed)
    n_resamples = int(n_resamples)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, min(n_resamples, 4_000_000 // n))  # bound memory at ~32 MB of indices
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    # keep the interval inside the data's range despite round-off in the means
    lo = float(min(max(lo, x.min()), x.max()))
    hi = float(min(max(hi, x.min()), x.max()))
    return (lo, hi)


def _finite_number(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _rate(k: int, n: int) -> float | None:
    return k / n if n > 0 else None


def _pair(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [ci[0], ci[1]]


def _summarize_mode(recs: Sequence[Mapping[str, Any]], *, n_resamples: int, seed: int) -> dict:
    valid = [r for r in recs if r.get("valid") is True]
    failed = [r for r in valid if r.get("failed") is True]
    ok = [r for r in valid if r.get("failed") is not True]
    n_valid = len(valid)
    recovered = sum(1 for r in ok if r.get("recovered") is True)
    # zero-reactivation recovery = recovered AND max_{i in S} z_i(h_rec) <= eta (PAPER_NOTES.md)
    zr_known = [r for r in ok if r.get("zero_reactivation") is not None]
    zero_react = sum(
        1 for r in ok if r.get("recovered") is True and r.get("zero_reactivation") is True
    )
    zr_n = n_valid if zr_known else 0  # rate unknown when no record reports it
    out: dict[str, Any] = {
        "n_records": len(recs),
        "n_valid": n_valid,
        "n_failed": len(failed),
        "n_evaluated": len(ok),
        "recovered": recovered,
        "recovery_rate": _rate(recovered, n_valid),
        "recovery_rate_ci95": _pair(wilson_interval(recovered, n_valid)),
        "zero_reactivation_recovered": zero_react if zr_n else None,
        "zero_reactivation_rate": _rate(zero_react, zr_n),
        "zero_reactivation_rate_ci95": _pair(wilson_interval(zero_react, zr_n)),
    }
    for m in CONTINUOUS_METRICS:
        vals = [v for v in (_finite_number(r.get(m)) for r in ok) if v is not None]
        out[f"{m}_n"] = len(vals)
        out[f"{m}_mean"] = float(np.mean(vals)) if vals else None
        out[f"{m}_ci95"] = _pair(bootstrap_ci(vals, n_resamples=n_resamples, seed=seed))
        if m == "c1_residual":
            out["c1_residual_max"] = float(max(vals)) if vals else None
    steps = [v for v in (_finite_number(r.get("steps")) for r in ok) if v is not None]
    out["steps_mean"] = float(np.mean(steps)) if steps else None
    errors: list[str] = []
    for r in failed:
        e = r.get("error")
        if isinstance(e, str) and e not in errors:
            errors.append(e)
    out["errors"] = errors[:5]
    return out


def summarize(
    records: Sequence[Mapping[str, Any]],
    *,
    task: str,
    modes: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Build summary.json from run records.

    Each record needs ``example_id``, ``mode`` and ``valid``; ``recovered``, ``failed``,
    ``zero_reactivation``, ``steps``, ``error`` and the :data:`CONTINUOUS_METRICS` are read when
    present (missing or non-finite values are left out of means and counted in ``M_n``).
    Per mode: rates are over the valid examples of that mode (a failed valid example counts as
    not recovered); continuous metrics are over valid, non-failed examples. ``modes`` fixes the
    modes and their order (records of other modes are ignored); by default, modes appear in
    the order first seen. ``extra`` is merged into the top level and wins over computed keys
    (e.g. ``n_examples`` = the task size), except ``modes`` and ``intervals``.
    """
    seen: set[tuple[str, str]] = set()
    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    examples: set[str] = set()
    valid_examples: set[str] = set()
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise ValueError(f"record {i} is a {type(r).__name__}, not a dict")
        for key in ("example_id", "mode", "valid"):
            if key not in r:
                raise ValueError(
                    f"record {i} ({r.get('example_id')!r}, {r.get('mode')!r}) has no {key!r}"
                )
        key = (str(r["example_id"]), str(r["mode"]))
        if key in seen:
            raise ValueError(f"duplicate record for example_id={key[0]!r}, mode={key[1]!r}")
        seen.add(key)
        by_mode.setdefault(key[1], []).append(r)
        examples.add(key[0])
        if r["valid"] is True:
            valid_examples.add(key[0])
    mode_list = list(modes) if modes is not None else list(by_mode)
    if len(set(mode_list)) != len(mode_list):
        raise ValueError(f"modes has duplicates: {mode_list}")
    summary: dict[str, Any] = {
        "task": task,
        "n_examples": len(examples),
        "n_valid": len(valid_examples),
        "n_records": len(seen),
        "modes": {
            m: _summarize_mode(by_mode.get(m, []), n_resamples=n_resamples, seed=seed)
            for m in mode_list
        },
        "intervals": {
            "rates": "Wilson score 95%",
            "continuous": (
                f"95% percentile bootstrap of the mean ({n_resamples} resamples, seed {seed})"
            ),
        },
    }
    if extra:
        clash = sorted(_PROTECTED_KEYS & set(extra))
        if clash:
            raise ValueError(f"extra may not replace summary key(s) {clash}")
        summary.update(extra)
    return summary
