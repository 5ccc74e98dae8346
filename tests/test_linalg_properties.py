"""Property tests (hypothesis) of saerecover.linalg over shapes, dtypes, rank structure and
scales: the orthogonality ratio bar always holds; idempotence; agreement with a float64
numpy.linalg.pinv reference whenever the spectrum has a clear gap at the tolerance."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from saerecover.linalg import EncoderNullProjector, jacobian_null_project

BAR = {np.float32: 1e-5, np.float64: 1e-12}
SETTINGS = settings(max_examples=200, deadline=None)


def ratio(M, X, Y) -> float:
    M, X, Y = (np.asarray(v, dtype=np.float64) for v in (M, X, Y))
    sigma = np.linalg.norm(M, 2) if M.size else 0.0
    xn = np.linalg.norm(X, axis=1)
    keep = xn > 0
    if sigma == 0 or not keep.any():
        return 0.0
    return float(np.max(np.linalg.norm(Y[keep] @ M, axis=1) / (sigma * xn[keep])))


@st.composite
def matrices(draw, *, max_rows=40, max_cols=50):
    """(M (rows, cols), structure) with random rank structure and scale, as float64."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(0, max_cols))
    structure = draw(st.sampled_from(["gaussian", "low-rank", "duplicates", "graded", "zeros"]))
    scale = 10.0 ** draw(st.integers(-20, 20))
    if structure == "gaussian" or cols == 0:
        M = rng.standard_normal((rows, cols))
    elif structure == "low-rank":
        r = draw(st.integers(1, max(1, min(rows, cols))))
        M = rng.standard_normal((rows, r)) @ rng.standard_normal((r, cols))
    elif structure == "duplicates":
        base = rng.standard_normal((rows, draw(st.integers(1, cols))))
        M = base[:, rng.integers(0, base.shape[1], size=cols)] * rng.choice([-2.0, 0.5, 1.0], size=cols)
    elif structure == "graded":
        cond = 10.0 ** draw(st.integers(1, 10))
        M = rng.standard_normal((rows, cols)) * np.geomspace(1, 1 / cond, cols)
    else:
        M = rng.standard_normal((rows, cols))
        M[:, rng.random(cols) < 0.5] = 0.0
    return M * scale, rng


def has_gap(M: np.ndarray, rcond: float) -> bool:
    """No singular value within a factor 100 of the tolerance, so any correct rank decision is
    the same one."""
    if M.size == 0:
        return True
    s = np.linalg.svd(M, compute_uv=False)
    if s[0] == 0:
        return True
    rel = s / s[0]
    return not np.any((rel > rcond / 100) & (rel < rcond * 100))


@SETTINGS
@given(matrices(), st.integers(0, 30), st.sampled_from([np.float32, np.float64]), st.integers(-12, 12))
def test_encoder_properties(case, n, dtype, x_exp):
    A64, rng = case
    A = A64.astype(dtype)
    d = A.shape[0]
    X = (rng.standard_normal((n, d)) * 10.0**x_exp).astype(dtype)
    if n > 1:  # one row mostly inside span(A): maximal cancellation
        X[0] = (A @ rng.standard_normal(A.shape[1]) if A.shape[1] else X[0]).astype(dtype) + X[1] * 1e-3
    P = EncoderNullProjector(A)
    Y = P.apply(X)
    assert Y.dtype == dtype and Y.shape == X.shape
    assert ratio(A, X, Y) <= BAR[dtype]
    scale = float(np.abs(X.astype(np.float64)).max(initial=0.0))
    assert np.abs(P.apply(Y).astype(np.float64) - Y).max(initial=0.0) <= 100 * BAR[dtype] * scale
    A_exact = A.astype(np.float64)
    if has_gap(A_exact, P.rcond):
        assert P.rank == (np.linalg.matrix_rank(A_exact, tol=P.tolerance) if A.size else 0)
        ref = X.astype(np.float64) - (X.astype(np.float64) @ np.linalg.pinv(A_exact, rcond=P.rcond).T) @ A_exact.T
        s = np.linalg.svd(A_exact, compute_uv=False) if A.size else np.zeros(0)
        kept = s[s > P.tolerance]
        cond = kept[0] / kept[-1] if kept.size else 1.0
        # the span of A is determined to about eps * cond(A restricted to its kept part)
        tol = max(100 * BAR[dtype], 100 * cond * np.finfo(dtype).eps) * max(scale, 1e-300)
        assert np.abs(Y - ref).max(initial=0.0) <= tol


@SETTINGS
@given(matrices(max_rows=30, max_cols=40), st.integers(0, 20), st.sampled_from([np.float32, np.float64]), st.booleans())
def test_jacobian_properties(case, b, dtype, one_d):
    JT, rng = case  # (n, m): J^T
    J = JT.T.astype(dtype)
    n = J.shape[1]
    G = rng.standard_normal((b, n)).astype(dtype)
    if one_d:
        G = G[0] if b else rng.standard_normal(n).astype(dtype)
    Y = jacobian_null_project(J, G)
    assert Y.shape == G.shape and Y.dtype == dtype
    G2, Y2 = np.atleast_2d(G), np.atleast_2d(Y)
    assert ratio(J.T, G2, Y2) <= BAR[dtype]
    if J.shape[0] == 0:
        assert np.array_equal(Y, G)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]), st.sampled_from(["C", "F", "T", "step", "neg"]))
def test_layouts_agree_with_contiguous(seed, dtype, layout):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((17, 5))
    P = EncoderNullProjector(A)
    base = rng.standard_normal((40, 40)).astype(dtype)
    X = {
        "C": base[:9, :17],
        "F": np.asfortranarray(base[:9, :17]),
        "T": base[:17, :9].T,
        "step": base[::4, ::2][:, :17],
        "neg": base[::-3, ::-2][:, :17],
    }[layout]
    np.testing.assert_allclose(P.apply(X), P.apply(np.ascontiguousarray(X)), rtol=0, atol=50 * BAR[dtype])
