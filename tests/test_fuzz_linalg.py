"""Fuzzing the Rust core through saerecover.linalg (hypothesis): random shapes (0 rows and 0
columns included), memory layouts (transposed, stepped, negative and zero strides), dtypes
(float32/float64/float16 accepted; integers, bool, complex, long double, object refused) and
values (subnormals, scales 1e-30 .. 1e30, near the largest value of the dtype, NaN/Inf
refused). Each case checks: no crash, the right error (naming the argument) or a result of the
input's kind, shape and dtype that is finite and meets the orthogonality bar of docs/linalg.md
(1e-5 float32, 1e-12 float64); near the largest value, an overflow error only where the
result can be out of range.

SAERECOVER_FUZZ_EXAMPLES sets the examples per test (default 120); docs/bad_inputs.md records
a long run.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saerecover.linalg import EncoderNullProjector, jacobian_null_project

N_EXAMPLES = int(os.environ.get("SAERECOVER_FUZZ_EXAMPLES", "120"))
SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BAR = {np.float16: 1e-5, np.float32: 1e-5, np.float64: 1e-12}
SCALES = [1e-30, 1e-12, 1e-3, 1.0, 1e3, 1e12, 1e30]
LAYOUTS = ["C", "F", "T", "step", "neg", "negstep", "broadcast"]
REFUSED_DTYPES = [np.int8, np.int32, np.int64, np.uint16, np.bool_, np.complex64, np.complex128,
                  np.longdouble, object]
#: fuzz cases run in this session, per test (see test_fuzz_case_count)
CASES: Counter[str] = Counter()
#: the number of distinct inputs of the fuzz tests whose input space is small
SPACE = {"test_fuzz_refused_dtypes": len(REFUSED_DTYPES) * 4 * 6 * 6, "test_fuzz_empty_shapes": 7 * 7 * 7 * 2}


def ratio(M: np.ndarray, X: np.ndarray, Y: np.ndarray) -> float:
    """max_i ||y_i M|| / (||M||_2 ||x_i||), scale-free (M, X normalized in float64 first)."""
    M = np.asarray(M, dtype=np.float64)
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    if M.size == 0 or X.size == 0:
        return 0.0
    m_max, x_max = np.abs(M).max(), np.abs(X).max()
    if m_max == 0 or x_max == 0:
        return 0.0
    M, X, Y = M / m_max, X / x_max, Y / x_max
    sigma = np.linalg.norm(M, 2)
    xn = np.linalg.norm(X, axis=1)
    keep = xn > 0
    return float(np.max(np.linalg.norm(Y[keep] @ M, axis=1) / (sigma * xn[keep]), initial=0.0))


def laid_out(values: np.ndarray, layout: str) -> np.ndarray:
    """``values`` (m, n) as an array with the given memory layout (same contents)."""
    m, n = values.shape
    if layout == "C" or values.size == 0:
        return np.ascontiguousarray(values)
    if layout == "F":
        return np.asfortranarray(values)
    if layout == "T":
        return np.ascontiguousarray(values.T).T
    if layout == "broadcast":  # row stride 0: every row is row 0
        return np.broadcast_to(values[:1], (m, n))
    base = np.zeros((3 * m + 1, 2 * n + 1), dtype=values.dtype)
    view = {"step": base[::3, ::2], "neg": base[::-1, ::-1], "negstep": base[::-3, ::-2]}[layout][:m, :n]
    view[...] = values
    return view


def effective(values: np.ndarray, layout: str) -> np.ndarray:
    """What the laid-out array holds (the broadcast layout repeats row 0)."""
    if layout == "broadcast" and values.size:
        return np.broadcast_to(values[:1], values.shape).copy()
    return values


@st.composite
def matrices(draw, rows, cols, dtype):
    """Values (rows, cols) of ``dtype``: Gaussian at a scale, low rank, duplicate columns,
    subnormal, or mixed magnitudes."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["gauss", "lowrank", "dupcols", "subnormal", "mixed"]))
    scale = draw(st.sampled_from(SCALES))
    if kind == "gauss" or rows * cols == 0:
        v = rng.standard_normal((rows, cols)) * scale
    elif kind == "lowrank":
        r = draw(st.integers(1, max(1, min(rows, cols))))
        v = rng.standard_normal((rows, r)) @ rng.standard_normal((r, cols)) * scale
    elif kind == "dupcols":
        base = rng.standard_normal((rows, max(1, cols // 2)))
        v = base[:, rng.integers(0, base.shape[1], cols)] * rng.choice([0.0, -1.0, 2.0], cols) * scale
    elif kind == "subnormal":
        tiny = np.finfo(dtype).smallest_subnormal if hasattr(np.finfo(dtype), "smallest_subnormal") else 0.0
        v = rng.integers(-50, 50, (rows, cols)) * float(tiny)
    else:  # entries across 40 orders of magnitude
        v = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-20, 20, (rows, cols))
    return v.astype(dtype), kind, scale


def assert_finite_result(Y, X, dtype):
    """Finite input, finite result (or an error, which the caller would have seen)."""
    assert np.isfinite(Y).all()


def well_scaled(X: np.ndarray, kind: str, dtype) -> bool:
    """Rows far from underflow: the bar is stated for these."""
    return kind not in ("subnormal", "mixed") or dtype == np.float64 and kind == "mixed"


@SETTINGS
@given(st.data())
def test_fuzz_encoder(data):
    CASES["test_fuzz_encoder"] += 1
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), "dtype")
    a_dtype = data.draw(st.sampled_from([np.float32, np.float64]), "A dtype")
    d, k, n = data.draw(st.integers(0, 24), "d"), data.draw(st.integers(0, 30), "k"), data.draw(st.integers(0, 20), "n")
    A, a_kind, _ = data.draw(matrices(d, k, a_dtype), "A")
    X, x_kind, _ = data.draw(matrices(n, d, dtype), "X")
    a_layout = data.draw(st.sampled_from(LAYOUTS), "A layout")
    x_layout = data.draw(st.sampled_from(LAYOUTS), "X layout")
    A_in, X_in = laid_out(A, a_layout), laid_out(X, x_layout)
    A, X = effective(A, a_layout), effective(X, x_layout)
    P = EncoderNullProjector(A_in)
    assert (P.d, P.k) == (d, k) and 0 <= P.rank <= min(d, k)
    Y = P.apply(X_in)
    assert isinstance(Y, np.ndarray) and Y.dtype == dtype and Y.shape == (n, d)
    assert not np.shares_memory(Y, X_in)
    assert_finite_result(Y, X, dtype)
    if well_scaled(X, x_kind, dtype) and a_kind != "subnormal":
        assert ratio(A, X, Y) <= BAR[dtype]


@SETTINGS
@given(st.data())
def test_fuzz_jacobian(data):
    CASES["test_fuzz_jacobian"] += 1
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), "dtype")
    j_dtype = data.draw(st.sampled_from([np.float32, np.float64]), "J dtype")
    m, n, b = data.draw(st.integers(0, 24), "m"), data.draw(st.integers(0, 30), "n"), data.draw(st.integers(0, 12), "b")
    J, j_kind, _ = data.draw(matrices(m, n, j_dtype), "J")
    G, g_kind, _ = data.draw(matrices(b, n, dtype), "G")
    J_in = laid_out(J, data.draw(st.sampled_from(LAYOUTS), "J layout"))
    g_layout = data.draw(st.sampled_from(LAYOUTS), "G layout")
    G_in, G = laid_out(G, g_layout), effective(G, g_layout)
    J = np.asarray(J_in)
    one_d = data.draw(st.booleans(), "1-D G") and b > 0
    Y = jacobian_null_project(J_in, G_in[0] if one_d else G_in)
    assert Y.dtype == dtype and Y.shape == ((n,) if one_d else (b, n))
    assert_finite_result(Y, G, dtype)
    if well_scaled(G, g_kind, dtype) and j_kind != "subnormal":
        assert ratio(J.T, np.atleast_2d(G[0] if one_d else G), np.atleast_2d(Y)) <= BAR[dtype]
    if m == 0 or not np.any(J):
        np.testing.assert_array_equal(Y, G[0] if one_d else G)


@SETTINGS
@given(st.data())
def test_fuzz_near_the_largest_value(data):
    """Batches within a factor 16 of the largest value of their dtype, some rows almost inside
    the span (coefficients beyond the largest value, small results): a finite result that
    meets the bar, or ValueError "overflows" and only when a row's norm reaches 0.99 of the
    largest value (|y_ij| <= ||y_i|| <= ||x_i||)."""
    CASES["count"] += 1
    dtype = data.draw(st.sampled_from(["float16", "float32", "float64", "bfloat16"]), "dtype")
    as_torch = dtype == "bfloat16" or data.draw(st.booleans(), "torch")
    jacobian = data.draw(st.booleans(), "jacobian")
    d, k, n = data.draw(st.integers(1, 24), "d"), data.draw(st.integers(0, 12), "k"), data.draw(st.integers(1, 12), "n")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    M = rng.standard_normal((d, k))
    X = rng.standard_normal((n, d))
    inside = rng.random(n) < 0.5
    X[inside] = rng.standard_normal((int(inside.sum()), k)) @ M.T + 1e-3 * X[inside]
    tdtype = getattr(torch, dtype)
    largest = float(torch.finfo(tdtype).max)
    top = np.abs(X).max()
    e = int(np.floor(np.log2(largest) - np.log2(top))) - data.draw(st.integers(0, 4), "below")
    while np.ldexp(top, e) > largest:
        e -= 1
    X = np.ldexp(X, e)  # exact
    Xd = torch.from_numpy(X).to(tdtype) if as_torch else X.astype(dtype)
    X = (Xd.double().numpy() if as_torch else Xd.astype(np.float64))
    try:
        Y = jacobian_null_project(M.T, Xd) if jacobian else EncoderNullProjector(M).apply(Xd)
    except ValueError as e:
        assert "overflows" in str(e), str(e)
        top = np.abs(X).max()
        norms = np.linalg.norm(X / top, axis=1)  # in units of top: no overflow
        assert norms.max() >= 0.99 * largest / top, (str(e), norms.max() * top)
        return
    Y = Y.double().numpy() if as_torch else Y.astype(np.float64)
    assert np.isfinite(Y).all()
    if dtype in ("float32", "float64") and k > 0:
        assert ratio(M, X, Y) <= BAR[getattr(np, dtype)]


@SETTINGS
@given(st.data())
def test_fuzz_torch_cpu_tensors(data):
    """CPU tensors (non-contiguous, float16/bfloat16 too) come back as tensors like the input."""
    CASES["test_fuzz_torch_cpu_tensors"] += 1
    tdtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), "dtype")
    d, k, n = data.draw(st.integers(1, 20), "d"), data.draw(st.integers(0, 20), "k"), data.draw(st.integers(0, 10), "n")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    A = torch.from_numpy(rng.standard_normal((d, k)))
    side = 2 * max(n, d) + 1
    base = torch.from_numpy(rng.standard_normal((side, side))).to(tdtype)
    X = {"contig": base[:n, :d].contiguous(), "step": base[::2, ::2][:n, :d], "T": base[:d, :n].T}[
        data.draw(st.sampled_from(["contig", "step", "T"]), "layout")]
    Y = EncoderNullProjector(A.T.contiguous().T).apply(X)
    assert isinstance(Y, torch.Tensor) and Y.dtype == tdtype and Y.shape == X.shape
    assert torch.isfinite(Y.float()).all()
    bar = {torch.float64: 1e-12, torch.float32: 1e-5}.get(tdtype)
    if bar is not None:
        assert ratio(A.numpy(), X.double().numpy(), Y.double().numpy()) <= bar


@SETTINGS
@given(st.data())
def test_fuzz_non_finite_is_refused_naming_the_argument(data):
    CASES["test_fuzz_non_finite_is_refused_naming_the_argument"] += 1
    dtype = data.draw(st.sampled_from([np.float16, np.float32, np.float64]), "dtype")
    which = data.draw(st.sampled_from(["A", "X", "J", "G"]), "argument")
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), "value")
    rows, cols = data.draw(st.integers(1, 16), "rows"), data.draw(st.integers(1, 16), "cols")
    i, j = data.draw(st.integers(0, rows - 1), "i"), data.draw(st.integers(0, cols - 1), "j")
    layout = data.draw(st.sampled_from([lay for lay in LAYOUTS if lay != "broadcast"]), "layout")
    as_torch = data.draw(st.booleans(), "torch")
    V = np.ones((rows, cols), dtype=dtype)
    V[i, j] = bad
    V = laid_out(V, layout)
    if as_torch:
        V = torch.from_numpy(np.array(V, order="C", copy=True))
    ones = lambda r, c: np.ones((r, c), dtype=np.float64)  # noqa: E731
    with pytest.raises(ValueError, match=rf"{which} contains a non-finite value"):
        if which == "A":
            EncoderNullProjector(V)
        elif which == "X":
            EncoderNullProjector(ones(cols, 2)).apply(V)
        elif which == "J":
            jacobian_null_project(V, ones(2, cols))
        else:
            jacobian_null_project(ones(3, cols), V)


@SETTINGS
@given(st.sampled_from(REFUSED_DTYPES), st.sampled_from(["A", "X", "J", "G"]), st.integers(0, 5), st.integers(0, 5))
def test_fuzz_refused_dtypes(dtype, which, rows, cols):
    CASES["test_fuzz_refused_dtypes"] += 1
    V = np.zeros((rows, cols), dtype=dtype)
    f = np.zeros
    with pytest.raises(TypeError, match=rf"{which} must have a floating-point dtype"):
        if which == "A":
            EncoderNullProjector(V)
        elif which == "X":
            EncoderNullProjector(f((cols, 1))).apply(V)
        elif which == "J":
            jacobian_null_project(V, f((1, cols)))
        else:
            jacobian_null_project(f((1, cols)), V)


@SETTINGS
@given(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6), st.sampled_from([np.float32, np.float64]))
def test_fuzz_empty_shapes(rows, d, k, dtype):
    """0 rows, 0 columns, 0 features: all well defined (identity, or nothing to project)."""
    CASES["test_fuzz_empty_shapes"] += 1
    A = np.ones((d, k), dtype=dtype)
    X = np.ones((rows, d), dtype=dtype)
    Y = EncoderNullProjector(A).apply(X)
    assert Y.shape == (rows, d) and Y.dtype == dtype
    if k == 0 or d == 0:
        np.testing.assert_array_equal(Y, X)
    J = np.ones((k, d), dtype=dtype)
    Yj = jacobian_null_project(J, X)
    assert Yj.shape == (rows, d)
    if k == 0:
        np.testing.assert_array_equal(Yj, X)


def test_fuzz_case_count():
    """Every fuzz test that ran in this session ran all its cases: SAERECOVER_FUZZ_EXAMPLES of them,
    or every input where the input space is smaller (hypothesis counts valid examples; its
    database may replay a few more). A strategy that stops generating, or a test whose body
    stopped running, shows here. Visible with -s."""
    ran = {name: n for name, n in CASES.items() if n}
    if not ran:
        pytest.skip("no fuzz test of this module ran in this session (run the whole file)")
    print(f"\nlinalg fuzz cases run: {sum(ran.values())} {dict(ran)}")
    short = {name: n for name, n in ran.items() if n < min(N_EXAMPLES, SPACE.get(name, N_EXAMPLES))}
    assert not short, f"fuzz tests that ran fewer than {N_EXAMPLES} cases: {short}"
