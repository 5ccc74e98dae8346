"""saerecover.linalg at its limits: inputs near the largest value of their dtype (a finite input
never gives a non-finite result without an error), allocation failure under an address-space
limit (MemoryError, never an abort), internal errors (RuntimeError without a Rust backtrace),
and the cost of a large square Jacobian."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from saerecover import linalg
from saerecover.linalg import EncoderNullProjector, jacobian_null_project

torch = pytest.importorskip("torch")

BAR = {np.float32: 1e-5, np.float64: 1e-12}
OVERFLOWS = r"the projection of {} overflows \w+ at \[0(, 0)*\]: the exact result exceeds the largest"

# [v, -v, -v] minus its mean direction is [4v/3, -2v/3, -2v/3]: beyond the range for these v
BEYOND = [
    pytest.param(lambda: np.array([[6e4, -6e4, -6e4]], np.float16), id="numpy-float16"),
    pytest.param(lambda: np.array([[3e38, -3e38, -3e38]], np.float32), id="numpy-float32"),
    pytest.param(lambda: np.array([[1.7e308, -1.7e308, -1.7e308]]), id="numpy-float64"),
    pytest.param(lambda: torch.tensor([[3e38, -3e38, -3e38]], dtype=torch.bfloat16), id="torch-bfloat16"),
    pytest.param(lambda: torch.tensor([[6e4, -6e4, -6e4]], dtype=torch.float16), id="torch-float16"),
    pytest.param(lambda: torch.tensor([[3e38, -3e38, -3e38]]), id="torch-float32"),
]


@pytest.mark.parametrize("make", BEYOND)
def test_encoder_result_beyond_the_dtype_range_raises(make):
    """Issue item 3: returned inf before."""
    P = EncoderNullProjector(np.ones((3, 1)))
    with pytest.raises(ValueError, match=OVERFLOWS.format("X")):
        P.apply(make())


@pytest.mark.parametrize("make", BEYOND)
def test_jacobian_result_beyond_the_dtype_range_raises(make):
    G = make()
    with pytest.raises(ValueError, match=OVERFLOWS.format("G")):
        jacobian_null_project(np.ones((1, 3)), G)
    with pytest.raises(ValueError, match=OVERFLOWS.format("G")):
        jacobian_null_project(np.ones((1, 3), np.float32), G[0])


@pytest.mark.parametrize("route", ["gram", "svd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_jacobian_route_raises_on_overflow(route, dtype):
    from saerecover import _core

    v = 0.9 * float(np.finfo(dtype).max)
    G = np.array([[1.0, 2.0, 3.0], [v, -v, -v]], dtype)
    with pytest.raises(ValueError, match=r"the projection of G overflows \w+ at \[1, 0\]"):
        _core.jacobian_null_project(np.ones((1, 3)), G, None, route)


def huge_rows(dtype):
    """Rows whose products overflow unless scaled, and whose projections fit (u = (1, 1, 1) /
    sqrt(3)): [b, b, b] (projection 0, but x . u = 1.73 b), [b, -b, 0], [b, b, b/2] (x . u =
    1.44 b), with b = 0.9 * the largest value, and a small row."""
    b = 0.9 * float(np.finfo(dtype).max)
    return np.array([[b, b, b], [b, -b, 0.0], [b, b, b / 2], [1.0, 2.0, 3.0]], dtype), b


def exact_projection(X, b):
    """(I - u u^T) x per row for u = (1, 1, 1) / sqrt(3), in float64 on x / b, times b."""
    Xs = X.astype(np.float64) / b
    return (Xs - Xs.mean(axis=1, keepdims=True)) * b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_rows_are_scaled_not_overflowed(dtype):
    """Before: NaN/inf for the first and third rows (float32 and float64 alike)."""
    X, b = huge_rows(dtype)
    expected = exact_projection(X, b)
    outputs = {
        "encoder": EncoderNullProjector(np.ones((3, 1))).apply(X),
        "encoder torch": EncoderNullProjector(np.ones((3, 1))).apply(torch.from_numpy(X)).numpy(),
        "jacobian": jacobian_null_project(np.ones((1, 3)), X),
    }
    for name, Y in outputs.items():
        assert np.isfinite(Y).all(), name
        # rows 0..2 relative to b, row 3 relative to itself (it is not scaled)
        assert np.abs(Y[:3] / b - expected[:3] / b).max() <= 10 * BAR[dtype], name
        assert np.abs(Y[3] - expected[3]).max() <= 10 * BAR[dtype] * 3, name


def test_scaled_rows_in_large_batches_and_threads():
    """Rows near the largest float32 that lie almost inside span(A) (their coefficients reach
    several times the largest float32; their projection is small), spread over the blocks and
    threads of a large batch."""
    rng = np.random.default_rng(5)
    A = np.concatenate([np.ones((64, 1)), rng.standard_normal((64, 4))], axis=1)
    X = rng.standard_normal((20000, 64)).astype(np.float32)
    X[::997] = np.float32(0.9) * np.finfo(np.float32).max + X[::997] * np.float32(1e36)
    P = EncoderNullProjector(A)
    Y = P.apply(X)
    assert np.isfinite(Y).all()
    top = np.abs(X.astype(np.float64)).max(axis=1, keepdims=True)
    Xs, Ys, U = X / top, Y / top, P.basis()
    assert np.abs(Ys - (Xs - (Xs @ U) @ U.T)).max() < 1e-5


def test_half_precision_cast_back_overflow_names_the_dtype():
    """float16/bfloat16 are projected in float32: the float32 result may fit and the cast back
    not. d = 19, x = [v, -v, ..., -v]: y_0 = 36 v / 19, 3.4000e38 for this bfloat16 v (the
    largest bfloat16 is 3.3895e38, the largest float32 3.4028e38)."""
    v = 1.7944577943096364e38
    x = torch.full((1, 19), -v, dtype=torch.bfloat16)
    x[0, 0] = v
    P = EncoderNullProjector(np.ones((19, 1)))
    with pytest.raises(ValueError, match=r"overflows bfloat16 at \[0, 0\]: .* largest bfloat16, 3.3895"):
        P.apply(x)
    with pytest.raises(ValueError, match=r"overflows bfloat16 at \[0, 0\]"):
        jacobian_null_project(np.ones((1, 19)), x)
    with pytest.raises(ValueError, match=r"overflows float16 at \[1, 0, 0\].*largest float16, 65504.*X has shape \(2, 1, 3\)"):
        EncoderNullProjector(np.ones((3, 1))).apply(np.array([[[1, 2, 3]], [[6e4, -6e4, -6e4]]], np.float16))


def test_the_torch_device_path_follows_the_same_rule():
    """The CUDA path (torch on the tensor's device), run here on CPU tensors."""
    P = EncoderNullProjector(np.ones((3, 1)))
    for dtype in (np.float32, np.float64):
        X, b = huge_rows(dtype)
        expected = exact_projection(X, b)
        for Y in (
            P._apply_torch_device(torch.from_numpy(X)),
            linalg._jacobian_torch_device(np.ones((1, 3)), torch.from_numpy(X), None),
        ):
            Y = Y.numpy()
            assert np.isfinite(Y).all()
            assert np.abs(Y[:3] / b - expected[:3] / b).max() <= 10 * BAR[dtype]
        beyond = torch.from_numpy(np.array([[b, b, b], [b, -b, -b]], dtype))
        with pytest.raises(ValueError, match=r"the projection of X overflows float\d\d at \[1, 0\]"):
            P._apply_torch_device(beyond)
        with pytest.raises(ValueError, match=r"the projection of G overflows float\d\d at \[1, 0\]"):
            linalg._jacobian_torch_device(np.ones((1, 3)), beyond, None)
    for dtype, v in ((torch.float16, 6e4), (torch.bfloat16, 3e38)):
        x = torch.tensor([[v, -v, -v]], dtype=dtype)
        with pytest.raises(ValueError, match=OVERFLOWS.format("X")):
            P._apply_torch_device(x)
        with pytest.raises(ValueError, match=OVERFLOWS.format("G")):
            linalg._jacobian_torch_device(torch.ones(1, 3), x, None)


# --- memory ----------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from saerecover.linalg import EncoderNullProjector, jacobian_null_project

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    def limit(to):
        resource.setrlimit(resource.RLIMIT_AS, (to, to))

    case, x_bytes = sys.argv[1], 150_000 * 1000 * 4
    try:
        if case == "issue":  # the report: ulimit -v 1500000 (KiB), P(np.eye(1000, 4)).apply(X)
            limit(1_500_000 * 1024)
            EncoderNullProjector(np.eye(1000, 4)).apply(np.ones((150_000, 1000), np.float32))
        elif case == "factor":  # A (20000, 3000) float32: 240 MB; its float64 copy needs 480 MB
            limit(vm_bytes() + 20_000 * 3000 * 4 + (300 << 20))
            EncoderNullProjector(np.ones((20_000, 3000), np.float32))
        elif case == "jacobian":  # J (3000, 20000) float32: 240 MB; J J^T and its factors 72 MB each
            limit(vm_bytes() + 20_000 * 3000 * 4 + (200 << 20))
            J = np.random.default_rng(0).standard_normal((3000, 20_000), np.float32)
            jacobian_null_project(J, np.ones((4, 20_000), np.float32))
        else:  # room for X, and for the result when case == "output-fits", and 16 MiB
            P = EncoderNullProjector(np.eye(1000, 4))
            limit(vm_bytes() + x_bytes * (2 if case == "output-fits" else 1) + (16 << 20))
            P.apply(np.ones((150_000, 1000), np.float32))
    except MemoryError as e:
        print("MemoryError:", e)
    else:
        print("fits")
    """
)


def run_child(case: str) -> subprocess.CompletedProcess:
    # one thread where the core's own buffers, not the per-thread ones, should run out first
    threads = "1" if case in ("factor", "jacobian") else "2"
    # one BLAS thread: OpenBLAS reserves buffers per thread at import, under the same limit
    env = dict(os.environ, RUST_BACKTRACE="1", RAYON_NUM_THREADS=threads, OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", CHILD, case], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
@pytest.mark.parametrize("case", ["issue", "output-does-not-fit", "output-fits", "factor", "jacobian"])
def test_allocation_failure_is_a_memory_error_not_an_abort(case):
    """Issue item 4: under `ulimit -v 1500000` the repro aborted the process (SIGABRT, in the
    packing buffer of faer's matrix product); with less room NumPy's failed allocation of the
    result became a pyo3 PanicException, and a failed float64 copy a RuntimeError carrying a
    panic. Now: MemoryError naming the shapes and the bytes, or a result when it fits."""
    child = run_child(case)
    assert child.returncode == 0, f"rc {child.returncode}: {child.stderr[-2000:]}"
    out = child.stdout.strip()
    assert "stack backtrace" not in child.stderr and "panicked" not in child.stderr, child.stderr
    if case == "issue":
        assert out.startswith("MemoryError: out of memory while") or out == "fits", out
    else:
        assert out.startswith("MemoryError: out of memory while"), out
    if out.startswith("MemoryError"):
        shape = {"factor": "(20000, 3000)", "jacobian": "(3000, 20000)"}.get(case, "(150000, 1000)")
        assert shape in out and "bytes" in out and "MiB" in out, out


# --- internal errors -------------------------------------------------------------------------


def test_internal_error_is_a_runtime_error_without_backtrace():
    """A panic anywhere in the core (on the calling thread or a rayon worker) is a RuntimeError
    whose message names the place, with no Rust backtrace in it or on stderr, even under
    RUST_BACKTRACE=1."""
    code = textwrap.dedent(
        """
        from saerecover import _core
        for in_worker in (False, True):
            try:
                _core._internal_error_for_tests(in_worker)
            except RuntimeError as e:
                print(repr(str(e)))
        """
    )
    env = dict(os.environ, RUST_BACKTRACE="1")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert child.returncode == 0, child.stderr
    lines = child.stdout.strip().splitlines()
    assert len(lines) == 2, child.stdout
    for line in lines:
        assert "saerecover._core internal error: a forced internal error" in line, line
        assert "(at rust_core/python.rs:" in line, line
        assert "stack backtrace" not in line and "RUST_BACKTRACE" not in line, line
    assert "stack backtrace" not in child.stderr and "RUST_BACKTRACE" not in child.stderr, child.stderr
    assert "panicked" not in child.stderr, child.stderr


# --- a large square Jacobian ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SAERECOVER_BIG_JACOBIAN") != "1", reason="minutes; SAERECOVER_BIG_JACOBIAN=1")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_square_6000_jacobian_finishes(dtype):
    """Issue item 4: 'one 6000x6000 Jacobian solve hung'. It is slow, not stuck (docs/linalg.md,
    "Cost"): a J of full rank is its own row space's basis, and the result is zero."""
    rng = np.random.default_rng(0)
    J = rng.standard_normal((6000, 6000)).astype(dtype)
    G = rng.standard_normal((2, 6000)).astype(dtype)
    t = time.perf_counter()
    Y = jacobian_null_project(J, G)
    assert time.perf_counter() - t < 1800
    assert np.abs(Y).max() <= 1e-3 * np.abs(G).max()
