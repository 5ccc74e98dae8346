"""The implementations compared: the Rust core, NumPy and torch formulations of both
projections, the paper's per-row ridge solve; float64 ground truths and flop counts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Impl:
    """One way to compute a projection. `call` is what is timed; `verify_rows(p)` (per-row
    reference only) computes the first p rows, to verify and estimate a call too slow to run."""

    name: str
    call: Callable[[], Any]
    phase: str = "apply"  # "apply" (verified against the truth) or "factor" (timed only)
    rust: bool = False
    anchor: bool = False  # never skipped: the core and the cheapest NumPy / torch formulation
    same_as: str | None = None  # the same computation as this implementation (for estimates)
    extra_tol: float = 0.0
    verify_rows: Callable[[int], Any] | None = None


def as_numpy(result: Any) -> np.ndarray:
    """A result (NumPy array or CPU torch tensor) as a NumPy array."""
    if isinstance(result, np.ndarray):
        return result
    detach = getattr(result, "detach", None)
    if detach is not None:
        return detach().cpu().numpy()
    return np.asarray(result)


def default_rcond(shape: Sequence[int], dtype: str) -> float:
    """NumPy's matrix_rank convention: singular values below max(shape) * eps * s_max are dropped."""
    return max(shape) * float(np.finfo(dtype).eps)


def numpy_basis(A: np.ndarray, rcond: float) -> np.ndarray:
    """Orthonormal basis U_r (d, r) of span(A) by thin SVD, rank by relative tolerance `rcond`."""
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    r = int(np.count_nonzero(s > rcond * s[0])) if s.size and s[0] > 0 else 0
    return np.ascontiguousarray(U[:, :r])


def torch_basis(A: Any, rcond: float) -> Any:
    import torch

    U, s, _ = torch.linalg.svd(A, full_matrices=False)
    r = int((s > rcond * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    return U[:, :r].contiguous()


def numpy_encoder_apply(X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """X - (X U) U^T with two GEMMs and one in-place subtraction (no d x d matrix)."""
    Y = (X @ U) @ U.T
    np.subtract(X, Y, out=Y)
    return Y


def torch_encoder_apply(X: Any, U: Any) -> Any:
    """X - (X U) U^T; the second GEMM fused with the subtraction (addmm, beta=1, alpha=-1)."""
    import torch

    return torch.addmm(X, X @ U, U.T, alpha=-1.0)


def reference_rowsolve(X: Any, A: Any, ridge: float) -> Any:
    """The paper's reference encoder projection, as its code runs it every optimizer step.

    Mirrors project_to_encoder_null in Mingyuee88/sae-post-intervention-recovery
    (recovery_core/core.py), called once per row of the gradient: per row, the Gram matrix
    A^T A, the ridge solve (A^T A + ridge I) c = A^T x, then x - A c; rows stacked at the end.
    Only the column gather W_enc[:, idx] is left out (it would add cost). Written from scratch.
    """
    import torch

    def project_row(vec: Any) -> Any:
        cols = A.to(vec.device, dtype=vec.dtype)
        gram = cols.T @ cols
        eye = torch.eye(gram.shape[0], device=vec.device, dtype=vec.dtype)
        coeff = torch.linalg.solve(gram + ridge * eye, cols.T @ vec)
        return vec - cols @ coeff

    return torch.stack([project_row(row) for row in X], dim=0)


def encoder_impls(
    A: np.ndarray,
    X: np.ndarray,
    *,
    core: Any | None,
    rcond: float | None,
    ridge: float,
    kappa: float = 1.0,
    sigma_min: float = 1.0,
) -> list[Impl]:
    """Every encoder-projection implementation on the same A (d, k) and X (n, d).

    `kappa` and `sigma_min` (of A) size the tolerance allowances of the Gram-based per-row
    solve: it squares the condition number and its ridge biases the result by up to
    ridge / sigma_min^2 relative to ||x||.
    """
    import torch

    dtype = str(A.dtype)
    eps = float(np.finfo(dtype).eps)
    tol_rcond = rcond if rcond is not None else default_rcond(A.shape, dtype)
    At, Xt = torch.from_numpy(A), torch.from_numpy(X)
    U = numpy_basis(A, tol_rcond)
    Ut = torch_basis(At, tol_rcond)
    impls: list[Impl] = []
    if core is not None:
        projector = core.EncoderNullProjector(A, rcond=rcond)
        impls += [
            Impl("rust", lambda: projector.apply(X), rust=True, anchor=True),
            Impl("rust_torch", lambda: projector.apply(Xt), rust=True, same_as="rust"),
            Impl(
                "rust_factor",
                lambda: core.EncoderNullProjector(A, rcond=rcond),
                phase="factor",
                rust=True,
                anchor=True,
            ),
        ]
    impls += [
        Impl("numpy", lambda: numpy_encoder_apply(X, U), anchor=True),
        Impl("torch", lambda: torch_encoder_apply(Xt, Ut), anchor=True),
        Impl(
            "rowsolve",
            lambda: reference_rowsolve(Xt, At, ridge),
            extra_tol=2.0 * ridge / max(sigma_min, 1e-30) ** 2 + 50.0 * eps * kappa**2,
            verify_rows=lambda p: reference_rowsolve(Xt[:p], At, ridge),
        ),
        Impl("numpy_factor", lambda: numpy_basis(A, tol_rcond), phase="factor"),
        Impl("torch_factor", lambda: torch_basis(At, tol_rcond), phase="factor"),
    ]
    return impls


def numpy_jacobian_gram(J: np.ndarray, G: np.ndarray) -> np.ndarray:
    """G - ((G J^T) (J J^T)^+) J: the formula as written, with a Hermitian pseudo-inverse."""
    K = J @ J.T
    C = (G @ J.T) @ np.linalg.pinv(K, hermitian=True)
    return G - C @ J


def numpy_jacobian_svd(J: np.ndarray, G: np.ndarray, rcond: float) -> np.ndarray:
    """Thin SVD of J; the rows of V_r^T span J's row space; G - (G V_r) V_r^T."""
    _, s, Vt = np.linalg.svd(J, full_matrices=False)
    r = int(np.count_nonzero(s > rcond * s[0])) if s.size and s[0] > 0 else 0
    V = Vt[:r]
    return G - (G @ V.T) @ V


def numpy_jacobian_pinv(J: np.ndarray, G: np.ndarray) -> np.ndarray:
    """G - G (J^+ J)^T = G - (G J^T) (J^+)^T."""
    P = np.linalg.pinv(J)
    return G - (G @ J.T) @ P.T


def numpy_jacobian_lstsq(J: np.ndarray, G: np.ndarray) -> np.ndarray:
    """The row-space component of each g is J^T c with c = argmin ||J^T c - g|| (gelsd)."""
    c = np.linalg.lstsq(J.T, G.T, rcond=None)[0]
    return G - (J.T @ c).T


def torch_jacobian_gram(J: Any, G: Any) -> Any:
    import torch

    K = J @ J.T
    C = (G @ J.T) @ torch.linalg.pinv(K, hermitian=True)
    return torch.addmm(G, C, J, alpha=-1.0)


def torch_jacobian_svd(J: Any, G: Any, rcond: float) -> Any:
    import torch

    _, s, Vt = torch.linalg.svd(J, full_matrices=False)
    r = int((s > rcond * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    V = Vt[:r]
    return torch.addmm(G, G @ V.T, V, alpha=-1.0)


def torch_jacobian_pinv(J: Any, G: Any) -> Any:
    import torch

    P = torch.linalg.pinv(J)
    return torch.addmm(G, G @ J.T, P.T, alpha=-1.0)


def torch_jacobian_lstsq(J: Any, G: Any) -> Any:
    import torch

    c = torch.linalg.lstsq(J.T, G.T).solution  # CPU default driver: gelsy
    return G - (J.T @ c).T


def jacobian_impls(
    J: np.ndarray, G: np.ndarray, *, core: Any | None, rcond: float | None, kappa: float = 1.0
) -> list[Impl]:
    """Every Jacobian-projection implementation on the same J (m, n) and G (b, n); each call
    factorizes J (it changes every step). `kappa` (of J) sizes the allowance of the Gram forms."""
    import torch

    dtype = str(J.dtype)
    eps = float(np.finfo(dtype).eps)
    tol_rcond = rcond if rcond is not None else default_rcond(J.shape, dtype)
    gram_tol = 50.0 * eps * kappa**2
    Jt, Gt = torch.from_numpy(J), torch.from_numpy(G)
    impls: list[Impl] = []
    if core is not None:
        impls += [
            Impl("rust", lambda: core.jacobian_null_project(J, G, rcond=rcond), rust=True, anchor=True),
            Impl("rust_torch", lambda: core.jacobian_null_project(Jt, Gt, rcond=rcond), rust=True, same_as="rust"),
        ]
    impls += [
        Impl("numpy_gram", lambda: numpy_jacobian_gram(J, G), extra_tol=gram_tol, anchor=True),
        Impl("numpy_svd", lambda: numpy_jacobian_svd(J, G, tol_rcond)),
        Impl("numpy_pinv", lambda: numpy_jacobian_pinv(J, G)),
        Impl("numpy_lstsq", lambda: numpy_jacobian_lstsq(J, G)),
        Impl("torch_gram", lambda: torch_jacobian_gram(Jt, Gt), extra_tol=gram_tol, anchor=True),
        Impl("torch_svd", lambda: torch_jacobian_svd(Jt, Gt, tol_rcond)),
        Impl("torch_pinv", lambda: torch_jacobian_pinv(Jt, Gt)),
        Impl("torch_lstsq", lambda: torch_jacobian_lstsq(Jt, Gt)),
    ]
    return impls


def encoder_truth(A: np.ndarray, X: np.ndarray, rcond: float) -> dict[str, Any]:
    """float64 result, rank and singular-value extremes of A."""
    A64 = A.astype(np.float64)
    U, s, _ = np.linalg.svd(A64, full_matrices=False)
    r = int(np.count_nonzero(s > rcond * s[0])) if s.size and s[0] > 0 else 0
    Ur = U[:, :r]
    X64 = X.astype(np.float64)
    Y = X64 - (X64 @ Ur) @ Ur.T
    s_min = float(s[r - 1]) if r else 0.0
    return {"Y": Y, "rank": r, "kappa": float(s[0] / s_min) if s_min else math.inf, "sigma_min": s_min}


def jacobian_truth(J: np.ndarray, G: np.ndarray, rcond: float) -> dict[str, Any]:
    """float64 result by an eigendecomposition of J J^T (cheaper than an SVD of J; exact to
    ~kappa^2 * 1e-16, far below the float32 tolerance), rank and condition number of J."""
    J64 = J.astype(np.float64)
    G64 = G.astype(np.float64)
    w, V = np.linalg.eigh(J64 @ J64.T)
    sig = np.sqrt(np.clip(w, 0.0, None))
    keep = sig > rcond * sig.max() if sig.size and sig.max() > 0 else np.zeros_like(sig, dtype=bool)
    Vr, wr = V[:, keep], w[keep]
    C = ((G64 @ J64.T) @ Vr / wr) @ Vr.T
    Y = G64 - C @ J64
    r = int(keep.sum())
    s_min = float(sig[keep].min()) if r else 0.0
    return {"Y": Y, "rank": r, "kappa": float(sig.max() / s_min) if s_min else math.inf}


def rel_row_error(Y: np.ndarray, Y_true: np.ndarray, scale: float) -> float:
    """max_i ||y_i - y_i*|| / scale, with scale = max_i ||x_i|| of the input rows."""
    Y = np.asarray(Y)
    if Y.shape != Y_true.shape:
        raise ValueError(f"result has shape {Y.shape}, expected {Y_true.shape}")
    diff = Y.astype(np.float64) - Y_true
    return float(np.sqrt((diff * diff).sum(axis=1)).max() / scale) if diff.size else 0.0


def qr_flops(rows: int, cols: int) -> float:
    """Householder QR of a tall rows x cols matrix: 2 cols^2 (rows - cols/3)."""
    p, q = min(rows, cols), max(rows, cols)
    return 2.0 * p * p * (q - p / 3.0)


def encoder_apply_flops(d: int, n: int, r: int) -> float:
    return 4.0 * n * d * r


def jacobian_flops(m: int, n: int, b: int, r: int) -> float:
    """Nominal useful work per call: a QR-sized factorization of J plus the two thin GEMMs.
    The same count for every implementation, so GFLOP/s compares like with like."""
    return qr_flops(n, m) + 4.0 * b * n * r
