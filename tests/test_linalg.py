"""saerecover.linalg against float64 NumPy references (pinv / SVD): orthogonality ratio bars,
idempotence, agreement, adversarial inputs, layouts, torch in/out, and error messages."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from saerecover import linalg
from saerecover.linalg import EncoderNullProjector, jacobian_null_project

torch = pytest.importorskip("torch")

BAR = {np.float32: 1e-5, np.float64: 1e-12}


# --- references ----------------------------------------------------------------------------


def ratio(M: np.ndarray, X: np.ndarray, Y: np.ndarray) -> float:
    """max_i ||M^T y_i|| / (||M||_2 ||x_i||), in float64 (M is (d, k): A, or J^T)."""
    M, X, Y = (np.asarray(v, dtype=np.float64) for v in (M, X, Y))
    X, Y = X.reshape(-1, M.shape[0]), Y.reshape(-1, M.shape[0])
    if M.size == 0 or X.shape[0] == 0:
        return 0.0
    sigma = np.linalg.norm(M, 2)
    xn = np.linalg.norm(X, axis=1)
    keep = xn > 0
    if sigma == 0 or not keep.any():
        return 0.0
    return float(np.max(np.linalg.norm(Y[keep] @ M, axis=1) / (sigma * xn[keep])))


def ref_project(M: np.ndarray, X: np.ndarray, rcond: float) -> np.ndarray:
    """(I - M M^+) x per row with numpy.linalg.pinv in float64."""
    M64, X64 = M.astype(np.float64), X.astype(np.float64)
    return X64 - (X64 @ np.linalg.pinv(M64, rcond=rcond).T) @ M64.T


def with_singular_values(rng, d: int, s) -> np.ndarray:
    q1, _ = np.linalg.qr(rng.standard_normal((d, len(s))))
    q2, _ = np.linalg.qr(rng.standard_normal((len(s), len(s))))
    return (q1 * np.asarray(s)) @ q2.T


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --- encoder: accuracy ---------------------------------------------------------------------


def check_encoder(A, X, dtype, *, rcond=None, agree=100.0):
    """Builds from A (cast to dtype), applies to X (cast to dtype); checks the bar, idempotence
    and agreement with the pinv reference. Returns (projector, ratio)."""
    A, X = A.astype(dtype), X.astype(dtype)
    P = EncoderNullProjector(A, rcond=rcond)
    Y = P.apply(X)
    assert Y.dtype == dtype and Y.shape == X.shape
    r = ratio(A, X, Y)
    assert r <= BAR[dtype], r
    scale = max(np.abs(X).max(initial=0.0), np.finfo(np.float64).tiny)
    assert np.abs(P.apply(Y) - Y).max(initial=0) <= 100 * BAR[dtype] * scale
    ref = ref_project(A, X, P.rcond)
    assert np.abs(Y - ref).max(initial=0) <= agree * BAR[dtype] * scale
    return P, r


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,k,n", [(64, 16, 50), (64, 63, 5), (32, 1, 200), (100, 40, 1)])
def test_encoder_random(rng, dtype, d, k, n):
    P, _ = check_encoder(rng.standard_normal((d, k)), rng.standard_normal((n, d)), dtype)
    assert (P.d, P.k, P.rank) == (d, k, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encoder_rank_deficient(rng, dtype):
    d = 48
    B = rng.standard_normal((d, 5)).astype(dtype)
    # duplicate, exactly parallel (power-of-two multiple) and zero columns
    A = np.concatenate([B, B[:, :2], -2.0 * B[:, 2:3], np.zeros((d, 2), dtype), B[:, 4:]], axis=1)
    X = 1e3 * rng.standard_normal((30, 5)) @ B.T + rng.standard_normal((30, d))
    P, _ = check_encoder(A, X, dtype)
    assert P.rank == 5 == np.linalg.matrix_rank(A.astype(np.float64))


def test_float32_near_parallel_columns_are_kept_by_default(rng):
    """float32 data is taken as exact: a column parallel only up to float32 rounding is a
    (weak) direction of its own under the default tolerance; rcond above float32 round-off
    merges it."""
    b = rng.standard_normal((32, 1))
    A = np.concatenate([b, -3.0 * b], axis=1).astype(np.float32)  # -3 b rounds differently
    assert EncoderNullProjector(A).rank == 2
    assert EncoderNullProjector(A, rcond=1e-6).rank == 1
    assert EncoderNullProjector(A.astype(np.float64)).rank == 2
    assert EncoderNullProjector(np.concatenate([b, -3.0 * b], axis=1)).rank in (1, 2)


@pytest.mark.parametrize("cond", [1e6, 1e8, 1e10])
def test_encoder_ill_conditioned(rng, cond):
    A = with_singular_values(rng, 40, np.geomspace(1, 1 / cond, 12))
    X = rng.standard_normal((25, 40))
    # the span of an ill-conditioned A is itself determined only to about eps * cond
    P, _ = check_encoder(A, X, np.float64, agree=max(100.0, cond * 1e-3))
    assert P.rank == 12
    A32 = A.astype(np.float32)
    Y = EncoderNullProjector(A32).apply(X.astype(np.float32))
    assert ratio(A32, X, Y) <= 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sa,sx", [(1e-20, 1.0), (1e20, 1.0), (1.0, 1e-15), (1.0, 1e15), (1e-15, 1e15)])
def test_encoder_scales(rng, dtype, sa, sx):
    A, X = rng.standard_normal((30, 6)) * sa, rng.standard_normal((10, 30)) * sx
    check_encoder(A, X, dtype)


def test_encoder_extreme_f64_scales(rng):
    A0, X0 = rng.standard_normal((20, 4)), rng.standard_normal((6, 20))
    expected = ref_project(A0, X0, 1e-13)
    for sa, sx in [(1e-300, 1e150), (1e300, 1e-150)]:
        Y = EncoderNullProjector(A0 * sa).apply(X0 * sx)
        assert np.abs(Y / sx - expected).max() < 1e-12


def test_rcond_controls_rank(rng):
    A = with_singular_values(rng, 20, [1.0, 1e-3, 1e-6, 1e-9])
    assert EncoderNullProjector(A).rank == 4
    assert EncoderNullProjector(A, rcond=1e-7).rank == 3
    assert EncoderNullProjector(A, rcond=1e-2).rank == 1
    P = EncoderNullProjector(A, rcond=1e-7)
    np.testing.assert_allclose(P.singular_values(), [1, 1e-3, 1e-6, 1e-9], rtol=1e-6)
    assert P.rcond == 1e-7 and P.tolerance == pytest.approx(1e-7)
    assert EncoderNullProjector(A).rcond == linalg.default_rcond(20, 4) == 20 * np.finfo(float).eps
    U = P.basis()
    assert U.shape == (20, 3) and np.allclose(U.T @ U, np.eye(3), atol=1e-14)


def test_k_zero_zero_matrix_and_full_rank(rng):
    X = rng.standard_normal((7, 12))
    for A in (np.zeros((12, 0)), np.zeros((12, 5))):
        P = EncoderNullProjector(A)
        assert P.rank == 0
        assert np.array_equal(P.apply(X), X)
    P = EncoderNullProjector(rng.standard_normal((12, 30)))  # k >= d
    assert P.rank == 12
    assert np.array_equal(P.apply(X), np.zeros_like(X))


def test_empty_batches_and_batch_shapes(rng):
    A = rng.standard_normal((16, 4))
    P = EncoderNullProjector(A)
    for shape in [(0, 16), (3, 0, 16), (16,), (2, 3, 16)]:
        X = rng.standard_normal(shape)
        Y = P.apply(X)
        assert Y.shape == X.shape
        np.testing.assert_allclose(Y.reshape(-1, 16), ref_project(A, X.reshape(-1, 16), 1e-13), atol=1e-13)


# --- encoder: layouts, no copies, threads ----------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts(rng, dtype):
    A = rng.standard_normal((24, 5)).astype(dtype)
    P = EncoderNullProjector(np.asfortranarray(A[:, ::-1]))  # same span, strided A
    base = rng.standard_normal((40, 60)).astype(dtype)
    views = {
        "C": base[:10, :24],
        "F": np.asfortranarray(base[:10, :24]),
        "transposed": base[:24, :10].T,
        "steps": base[::3, 1:49:2],
        "negative": base[::-2, ::-1][:, :24],
        "broadcast": np.broadcast_to(base[0, :24], (6, 24)),
    }
    for name, X in views.items():
        Y = P.apply(X)
        assert Y.flags.c_contiguous and Y.dtype == dtype, name
        np.testing.assert_allclose(Y, ref_project(A, X, P.rcond), atol=50 * BAR[dtype], err_msg=name)


def test_unaligned_and_non_native_inputs_are_copied(rng):
    A = rng.standard_normal((8, 3))
    P = EncoderNullProjector(A.astype(">f8"))
    buf = np.zeros(8 * 5 * 8 + 1, dtype=np.uint8)
    X = np.frombuffer(buf.data, dtype=np.float64, count=40, offset=1).reshape(5, 8)
    assert not X.flags.aligned
    assert P.apply(X).shape == (5, 8)
    Xb = rng.standard_normal((5, 8)).astype(">f8")
    np.testing.assert_allclose(P.apply(Xb), ref_project(A, Xb, 1e-13), atol=1e-13)


def test_fortran_input_is_not_copied(rng):
    """Peak traced NumPy memory during apply is the output alone (no input copy)."""
    A = rng.standard_normal((256, 8))
    P = EncoderNullProjector(A)
    for X in (np.asfortranarray(rng.standard_normal((4000, 256))), rng.standard_normal((256, 4000)).T):
        tracemalloc.start()
        Y = P.apply(X)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 1.3 * Y.nbytes, (peak, Y.nbytes)


def test_rayon_thread_count_does_not_change_results(tmp_path):
    code = (
        "import numpy as np; from saerecover.linalg import EncoderNullProjector as E;"
        "r=np.random.default_rng(5); A=r.standard_normal((300,40)); X=r.standard_normal((3000,300));"
        f"np.save(r'{tmp_path}/' + __import__('os').environ['RAYON_NUM_THREADS'] + '.npy', E(A).apply(X))"
    )
    for threads in ("1", "2"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
    one, two = np.load(tmp_path / "1.npy"), np.load(tmp_path / "2.npy")
    np.testing.assert_allclose(one, two, atol=1e-13)


def test_gil_is_released_during_apply(rng):
    """A Python thread gets to run while the Rust core works."""
    import threading
    import time

    P = EncoderNullProjector(rng.standard_normal((512, 256)))
    X = rng.standard_normal((16000, 512))  # ~8 GFLOP: long enough to tell, even when fast
    seen = []
    t = threading.Thread(target=lambda: (time.sleep(0.02), seen.append(time.perf_counter())))
    t0 = time.perf_counter()
    t.start()
    P.apply(X)
    t1 = time.perf_counter()
    t.join()
    if t1 - t0 < 0.1:
        pytest.skip(f"apply took {t1 - t0:.3f} s: too fast to tell")
    assert seen[0] < t1, (seen[0] - t0, t1 - t0)


# --- torch -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_cpu_in_out(rng, dtype):
    A = torch.from_numpy(rng.standard_normal((32, 6)))
    P = EncoderNullProjector(A.to(torch.float32))
    X = torch.randn(4, 7, 32, dtype=dtype, requires_grad=True)
    before = X.detach().clone()
    Y = P.apply(X)
    assert isinstance(Y, torch.Tensor) and Y.dtype == dtype and Y.shape == X.shape
    assert Y.device.type == "cpu" and not Y.requires_grad
    assert torch.equal(X.detach(), before)
    bar = 1e-5 if dtype == torch.float32 else 1e-12
    assert ratio(A.float().numpy(), X.detach().numpy(), Y.numpy()) <= bar
    # strided tensor view (transpose) goes through without error and agrees
    Xt = torch.randn(32, 9, dtype=dtype).T
    np.testing.assert_allclose(P.apply(Xt).numpy(), P.apply(Xt.contiguous().numpy()), atol=0)


def test_torch_cpu_tensor_is_not_copied(rng):
    P = EncoderNullProjector(rng.standard_normal((256, 8)))
    X = torch.randn(256, 4000, dtype=torch.float64).T  # non-contiguous view
    tracemalloc.start()
    Y = P.apply(X)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.3 * Y.numel() * 8, peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors(rng, dtype):
    A = rng.standard_normal((32, 6))
    P = EncoderNullProjector(torch.from_numpy(A).to(dtype))  # factored from the widened values
    X = torch.randn(10, 32).to(dtype)
    Y = P.apply(X)
    assert Y.dtype == dtype and Y.shape == X.shape
    # projected in float32, then rounded to the half type: orthogonal to half-precision rounding
    expected = P.apply(X.float()).to(dtype)
    assert torch.equal(Y, expected)
    eps = torch.finfo(dtype).eps
    assert ratio(torch.from_numpy(A).to(dtype).double().numpy(), X.double().numpy(), Y.double().numpy()) < 4 * eps


def test_numpy_float16(rng):
    A = rng.standard_normal((16, 3))
    X = rng.standard_normal((5, 16)).astype(np.float16)
    Y = EncoderNullProjector(A).apply(X)
    assert Y.dtype == np.float16
    np.testing.assert_array_equal(Y, EncoderNullProjector(A).apply(X.astype(np.float32)).astype(np.float16))


def test_torch_device_path_matches_rust(rng):
    """The torch implementation used for CUDA tensors, exercised on CPU tensors."""
    A = rng.standard_normal((40, 12))
    P = EncoderNullProjector(A)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        X = torch.randn(3, 5, 40).to(dtype)
        Yd = P._apply_torch_device(X)
        assert Yd.dtype == dtype and Yd.shape == X.shape
        np.testing.assert_allclose(Yd.float().numpy(), P.apply(X).float().numpy(), atol=1e-5)
    J = torch.from_numpy(with_singular_values(rng, 40, np.geomspace(1, 1e-10, 8)).T.copy())
    G = torch.randn(6, 40, dtype=torch.float64)
    Yd = linalg._jacobian_torch_device(J, G, None)
    assert ratio(J.numpy().T, G.numpy(), Yd.numpy()) <= 1e-12
    # with cond(J) = 1e10 the row space itself is determined only to about eps * cond
    np.testing.assert_allclose(Yd.numpy(), jacobian_null_project(J, G).numpy(), atol=1e-5)
    Jr = torch.randn(8, 40, dtype=torch.float64)
    Yr = linalg._jacobian_torch_device(Jr, G, None)
    np.testing.assert_allclose(Yr.numpy(), jacobian_null_project(Jr, G).numpy(), atol=1e-13)
    assert torch.equal(linalg._jacobian_torch_device(torch.zeros(0, 40), G, None), G)
    with pytest.raises(ValueError, match=r"^G contains a non-finite value \(nan\) at \[1, 2\]"):
        G[1, 2] = float("nan")
        linalg._jacobian_torch_device(J, G, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors(rng):
    A = rng.standard_normal((64, 16))
    P = EncoderNullProjector(torch.from_numpy(A).cuda())
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        X = torch.randn(8, 64, device="cuda").to(dtype)
        Y = P.apply(X)
        assert Y.device == X.device and Y.dtype == dtype
        np.testing.assert_allclose(Y.cpu().float().numpy(), P.apply(X.cpu()).float().numpy(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    J = torch.randn(10, 64, device="cuda", dtype=torch.float64)
    G = torch.randn(5, 64, device="cuda")
    Y = jacobian_null_project(J, G)
    assert Y.device == G.device and Y.dtype == G.dtype
    assert ratio(J.cpu().numpy().T, G.cpu().numpy(), Y.cpu().numpy()) <= 1e-5


# --- Jacobian --------------------------------------------------------------------------------


@pytest.mark.parametrize("jdtype", [np.float32, np.float64])
@pytest.mark.parametrize("gdtype", [np.float32, np.float64])
def test_jacobian_random_and_mixed_dtypes(rng, jdtype, gdtype):
    J = rng.standard_normal((12, 50)).astype(jdtype)
    G = rng.standard_normal((7, 50)).astype(gdtype)
    Y = jacobian_null_project(J, G)
    assert Y.dtype == gdtype and Y.shape == G.shape
    assert ratio(J.T, G, Y) <= BAR[gdtype]
    np.testing.assert_allclose(Y, ref_project(J.T, G, 1e-13), atol=100 * BAR[gdtype])


def test_jacobian_rank_deficient_and_1d(rng):
    B = rng.standard_normal((3, 30))
    J = rng.standard_normal((8, 3)) @ B  # 8 rows spanning 3 directions
    G = rng.standard_normal(30)
    Y = jacobian_null_project(J, G)
    assert Y.shape == (30,)
    np.testing.assert_allclose(Y, ref_project(B.T, G[None], 1e-13)[0], atol=1e-13)
    assert ratio(J.T, G, Y) <= 1e-12


@pytest.mark.parametrize("cond", [1e6, 1e8, 1e10])
def test_jacobian_ill_conditioned(rng, cond):
    J = with_singular_values(rng, 60, np.geomspace(1, 1 / cond, 15)).T  # (15, 60)
    G = rng.standard_normal((9, 60))
    Y = jacobian_null_project(J, G)
    assert ratio(J.T, G, Y) <= 1e-12
    assert np.abs(Y - ref_project(J.T, G, 1e-13)).max() <= max(1e-10, cond * 1e-14)
    # the plain Gram solve loses cond^2 * eps: for the record, why "auto" takes the SVD route
    # here (cond(J) > 1e3 for a float64 result, docs/linalg.md)
    c = np.linalg.solve(J @ J.T, J @ G.T)
    assert ratio(J.T, G, G - (J.T @ c).T) > 1e3 * ratio(J.T, G, Y)
    Y32 = jacobian_null_project(J.astype(np.float32), G.astype(np.float32))
    assert ratio(J.astype(np.float32).T, G.astype(np.float32), Y32) <= 1e-5


# The core has two Jacobian routes (docs/linalg.md): "gram" (J J^T in float64, eigen or
# Cholesky) and "svd" (thin SVD of J^T); "auto" picks the Gram route only where it is accurate.
# _core is called directly to force a route; linalg always uses "auto".


def core_jacobian(J, G, route, rcond=None):
    from saerecover import _core

    return _core.jacobian_null_project(J, G, rcond, route=route)


def adversarial_jacobians(rng, m=24, n=200):
    """(name, J (m, n) float64, G (b, n) float64): well- and ill-conditioned, dependent and
    zero rows, tiny and huge scales; G holds Gaussian rows, rows inside the row space and rows
    along its weakest directions (the worst case of the Gram route)."""
    cases = [("gaussian", rng.standard_normal((m, n)))]
    for cond in [1e2, 1e3, 1e4, 1e6, 1e8, 1e10]:
        cases.append((f"cond {cond:.0e}", with_singular_values(rng, n, np.geomspace(1, 1 / cond, m)).T))
    dup = rng.standard_normal((m, n))
    dup[1::2] = 3.0 * dup[::2]
    cases.append(("duplicates", dup))
    zero = rng.standard_normal((m, n))
    zero[::3] = 0.0
    cases.append(("zero rows", zero))
    base = rng.standard_normal((m, n))
    cases += [("scale 1e-30", base * 1e-30), ("scale 1e30", base * 1e30)]
    out = []
    for name, J in cases:
        _, s, vt = np.linalg.svd(J, full_matrices=False)
        weak = vt[: int((s > 1e-14 * s[0]).sum())][-3:]
        G = np.concatenate(
            [rng.standard_normal((4, n)), rng.standard_normal((3, m)) @ J, weak + 1e-6 * rng.standard_normal(weak.shape)]
        )
        out.append((name, J, G))
    return out


@pytest.mark.parametrize("route", ["auto", "gram", "svd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jacobian_routes_on_random_input(rng, route, dtype):
    J = rng.standard_normal((16, 300)).astype(dtype)
    G = rng.standard_normal((5, 300)).astype(dtype)
    Y, rank = core_jacobian(J, G, route)
    assert rank == 16 and Y.dtype == dtype
    assert ratio(J.T, G, Y) <= BAR[dtype]
    np.testing.assert_allclose(Y, ref_project(J.T, G, 1e-13), atol=100 * BAR[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jacobian_auto_meets_the_bars_on_adversarial_input(rng, dtype):
    """Whatever route "auto" takes, the bar holds; forced, the SVD route always meets it and the
    Gram route does on well-conditioned input (cond <= 1e3 for float64, <= 1e6 for float32)."""
    for name, J64, G64 in adversarial_jacobians(rng):
        J, G = J64.astype(dtype), G64.astype(dtype)
        for route in ["auto", "svd"]:
            Y, _ = core_jacobian(J, G, route)
            assert ratio(J.T, G, Y) <= BAR[dtype], (name, route)
        if name in ("gaussian", "cond 1e+02", "zero rows", "scale 1e-30", "scale 1e30") or (
            dtype == np.float32 and name in ("cond 1e+03", "cond 1e+04", "cond 1e+06")
        ):
            Y, _ = core_jacobian(J, G, "gram")
            assert ratio(J.T, G, Y) <= BAR[dtype], (name, "gram")


def test_jacobian_gram_route_loses_accuracy_where_auto_declines_it(rng):
    """float64 output, cond(J) = 1e6, G along the weakest direction: the forced Gram route misses
    the 1e-12 bar by orders of magnitude (it loses ~eps * cond); "auto" takes the SVD route."""
    J = with_singular_values(rng, 200, np.geomspace(1, 1e-6, 24)).T
    _, _, vt = np.linalg.svd(J, full_matrices=False)
    G = vt[-1:] + 1e-6 * rng.standard_normal((1, 200))
    Y_gram, _ = core_jacobian(J, G, "gram")
    Y_auto, _ = core_jacobian(J, G, "auto")
    Y_svd, _ = core_jacobian(J, G, "svd")
    assert ratio(J.T, G, Y_gram) > 1e-11
    assert ratio(J.T, G, Y_auto) <= 1e-12
    np.testing.assert_array_equal(Y_auto, Y_svd)


def test_jacobian_route_argument_errors(rng):
    with pytest.raises(ValueError, match="route must be 'auto', 'gram' or 'svd'"):
        core_jacobian(np.eye(3), np.eye(3), "qr")


def test_jacobian_gram_route_finds_non_finite_values(rng):
    J = rng.standard_normal((8, 5000)).astype(np.float32)
    G = rng.standard_normal((3, 5000)).astype(np.float32)
    for route in ["auto", "gram", "svd"]:
        Jb = J.copy()
        Jb[7, 4999] = np.inf
        with pytest.raises(ValueError, match=r"^J contains a non-finite value \(inf\) at \[7, 4999\]"):
            core_jacobian(Jb, G, route)
        Gb = G.copy()
        Gb[2, 2500] = np.nan
        with pytest.raises(ValueError, match=r"^G contains a non-finite value \(NaN\) at \[2, 2500\]"):
            core_jacobian(J, Gb, route)


def test_jacobian_empty_cases(rng):
    G = rng.standard_normal((4, 9))
    assert np.array_equal(jacobian_null_project(np.zeros((0, 9)), G), G)
    assert jacobian_null_project(rng.standard_normal((3, 9)), np.zeros((0, 9))).shape == (0, 9)
    assert np.abs(jacobian_null_project(rng.standard_normal((12, 9)), G)).max() < 1e-14


def test_jacobian_torch_cpu(rng):
    J = torch.randn(5, 20, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        G = torch.randn(3, 20).to(dtype)
        Y = jacobian_null_project(J, G)
        assert isinstance(Y, torch.Tensor) and Y.dtype == dtype and Y.shape == G.shape
    Y = jacobian_null_project(J.numpy(), torch.randn(20))
    assert isinstance(Y, torch.Tensor) and Y.shape == (20,)


# --- errors ----------------------------------------------------------------------------------


def test_shape_errors(rng):
    P = EncoderNullProjector(rng.standard_normal((64, 4)))
    with pytest.raises(ValueError, match=r"^X has shape \(3, 63\): 63 columns, but the projector was built for d=64"):
        P.apply(np.zeros((3, 63)))
    with pytest.raises(ValueError, match=r"^X has shape \(2, 5, 63\)"):
        P.apply(torch.zeros(2, 5, 63))
    with pytest.raises(ValueError, match="^X must have at least 1 dimension"):
        P.apply(np.zeros(()))
    with pytest.raises(ValueError, match=r"^A must be 2-D \(d, k\), got shape \(64,\)"):
        EncoderNullProjector(np.zeros(64))
    with pytest.raises(ValueError, match=r"^G has shape \(2, 9\): 9 columns, but J has shape \(3, 10\)"):
        jacobian_null_project(np.zeros((3, 10)), np.zeros((2, 9)))
    with pytest.raises(ValueError, match=r"^G must be 1-D \(n,\) or 2-D \(b, n\), got shape \(1, 2, 10\)"):
        jacobian_null_project(np.zeros((3, 10)), np.zeros((1, 2, 10)))
    with pytest.raises(ValueError, match=r"^J must be 2-D \(m, n\)"):
        jacobian_null_project(np.zeros(10), np.zeros(10))


def test_non_finite_errors(rng):
    A = rng.standard_normal((8, 2))
    P = EncoderNullProjector(A)
    bad = A.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"^A contains a non-finite value \(inf\) at \[3, 1\]; A has shape \(8, 2\)"):
        EncoderNullProjector(bad)
    X = np.zeros((4, 8), np.float32)
    X[2, 6] = np.nan
    with pytest.raises(ValueError, match=r"^X contains a non-finite value \(NaN\) at \[2, 6\]"):
        P.apply(X)
    with pytest.raises(ValueError, match=r"^X contains a non-finite value"):
        P.apply(torch.from_numpy(X))
    J = np.zeros((2, 8))
    J[1, 0] = -np.inf
    with pytest.raises(ValueError, match=r"^J contains a non-finite value \(-inf\) at \[1, 0\]"):
        jacobian_null_project(J, np.zeros((1, 8)))
    with pytest.raises(ValueError, match=r"^G contains a non-finite value \(NaN\) at \[0, 6\]"):
        jacobian_null_project(np.ones((2, 8)), X[2])


@pytest.mark.parametrize("value", [np.zeros((4, 8), np.int64), np.zeros((4, 8), np.complex128), np.zeros((4, 8), bool)])
def test_dtype_errors(rng, value):
    P = EncoderNullProjector(rng.standard_normal((8, 2)))
    with pytest.raises(TypeError, match=f"^X must have a floating-point dtype .*got {value.dtype}"):
        P.apply(value)
    with pytest.raises(TypeError, match="^A must have a floating-point dtype"):
        EncoderNullProjector(value.T)
    with pytest.raises(TypeError, match="^G must have a floating-point dtype"):
        jacobian_null_project(np.zeros((2, 8)), value)
    with pytest.raises(TypeError, match="^X must be a floating-point tensor"):
        P.apply(torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="^X must be a numpy.ndarray or a torch.Tensor, got list"):
        P.apply([[0.0] * 8])


def test_rcond_errors(rng):
    A = rng.standard_normal((8, 2))
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rcond must be a finite number >= 0"):
            EncoderNullProjector(A, rcond=bad)
        with pytest.raises(ValueError, match="rcond must be a finite number >= 0"):
            jacobian_null_project(A.T, A.T, rcond=bad)
    with pytest.raises(TypeError, match="rcond must be a float or None, got str"):
        EncoderNullProjector(A, rcond="1e-3")


def test_core_errors_directly():
    """The extension's own checks (bypassing linalg's): TypeError/ValueError naming the
    argument; never a crash."""
    from saerecover import _core

    b = _core.EncoderNullBasis.from_matrix(np.eye(4)[:, :2])
    with pytest.raises(TypeError, match="^X must have dtype float32 or float64.*got int64"):
        b.apply(np.zeros((2, 4), np.int64))
    with pytest.raises(TypeError, match="^X must be a numpy.ndarray, got list"):
        b.apply([[1.0]])
    with pytest.raises(ValueError, match=r"^X must be 2-D, got a 1-D array of shape \(4,\)"):
        b.apply(np.zeros(4))
    with pytest.raises(ValueError, match="rcond"):
        _core.EncoderNullBasis.from_matrix(np.eye(3), -1.0)
    with pytest.raises(TypeError, match=">f8"):
        _core.jacobian_null_project(np.eye(3), np.eye(3).astype(">f8"))
    out, rank = _core.jacobian_null_project(np.eye(3)[:2], np.eye(3, dtype=np.float32))
    assert rank == 2 and out.dtype == np.float32
    assert "rank=2" in repr(b)


def test_cpu_tensors_go_through_the_rust_core(rng, monkeypatch):
    """CPU tensors are projected by the Rust core (without copies); only other devices take the
    torch route."""
    def refuse(*args, **kwargs):
        raise AssertionError("the torch device route was taken for a CPU tensor")

    monkeypatch.setattr(EncoderNullProjector, "_apply_torch_device", refuse)
    monkeypatch.setattr(linalg, "_jacobian_torch_device", refuse)
    A = rng.standard_normal((6, 2))
    X = torch.from_numpy(rng.standard_normal((3, 6)))
    np.testing.assert_allclose(EncoderNullProjector(A).apply(X).numpy(), EncoderNullProjector(A).apply(X.numpy()))
    np.testing.assert_allclose(jacobian_null_project(torch.from_numpy(A.T), X).numpy(),
                               jacobian_null_project(A.T, X.numpy()))


def test_the_torch_device_route_names_the_argument_in_its_errors(rng):
    """The route CUDA tensors take, run on CPU tensors: each error names X, G or J."""
    P = EncoderNullProjector(rng.standard_normal((6, 2)))
    X = torch.zeros(2, 6)
    X[1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"^X contains a non-finite value \(inf\) at \[1, 4\]; X has shape \(2, 6\)"):
        P._apply_torch_device(X)
    with pytest.raises(TypeError, match=r"^X must be a floating-point tensor .*got torch.complex64"):
        P._apply_torch_device(torch.zeros(2, 6, dtype=torch.complex64))
    J = torch.ones(2, 6)
    G = torch.zeros(3, 6)
    with pytest.raises(TypeError, match=r"^G must be a floating-point tensor .*got torch.complex64"):
        linalg._jacobian_torch_device(J, G.to(torch.complex64), None)
    J[0, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^J contains a non-finite value \(nan\) at \[0, 5\]; J has shape \(2, 6\)"):
        linalg._jacobian_torch_device(J, G, None)
    with pytest.raises(ValueError, match=r"^J contains a non-finite value \(nan\) at \[0, 5\]"):
        linalg._jacobian_torch_device(J.numpy(), G, None)
    with pytest.raises(TypeError, match=r"^J must have a floating-point dtype"):
        linalg._jacobian_torch_device(np.ones((2, 6), np.int64), G, None)
    with pytest.raises(TypeError, match=r"^J must be a floating-point tensor, got torch.int64"):
        linalg._jacobian_torch_device(torch.ones(2, 6, dtype=torch.int64), G, None)
    with pytest.raises(ValueError, match=r"^J must be 2-D \(m, n\), got shape \(6,\)"):
        linalg._jacobian_torch_device(torch.ones(6), G, None)
    # the NumPy J is read in float64 and moved to G's device; the result keeps G's dtype and shape
    Jn = rng.standard_normal((2, 6)).astype(np.float32)
    Gt = torch.from_numpy(rng.standard_normal((4, 6)))
    Y = linalg._jacobian_torch_device(Jn, Gt, None)
    assert Y.dtype == torch.float64 and Y.shape == (4, 6)
    np.testing.assert_allclose(Y.numpy(), jacobian_null_project(Jn.astype(np.float64), Gt.numpy()), atol=1e-12)


def test_rcond_check_alone():
    """linalg's own rcond check (the Rust core checks again): 0 and finite positives pass."""
    for ok in (None, 0, 0.0, 1e-3, 2):
        linalg._check_rcond(ok)
    for bad in (-1e-300, math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="rcond must be a finite number >= 0"):
            linalg._check_rcond(bad)
    for bad in (True, "1", None.__class__):
        with pytest.raises(TypeError, match="rcond must be a float or None"):
            linalg._check_rcond(bad)
