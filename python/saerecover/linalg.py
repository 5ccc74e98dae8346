"""Null-space projections that keep delta off the defended features (PAPER_NOTES.md C1, J).

Two verbs, for NumPy arrays and torch tensors alike, each returning what it was given (same
kind, dtype, device and shape):

- ``EncoderNullProjector(A).apply(X)``: ``X - (X U_r) U_r^T`` per row, i.e.
  ``(I - A (A^T A)^+ A^T) x``, with ``A = A_S`` the selected encoder columns, ``W_enc[:, S]``
  of shape ``(d, k)``; ``X`` has shape ``(..., d)``.
- ``jacobian_null_project(J, G)``: ``G - (J^T (J J^T)^+ J G^T)^T`` per row, for ``J``
  ``(m, n)`` and ``G`` ``(n,)`` or ``(b, n)``.

``U_r`` is an orthonormal basis of span(A) (or of J's row space) from a thin SVD computed in
float64; singular values ``<= rcond * sigma_max`` are dropped, and ``rcond=None`` means
``max(rows, cols) * 2.2e-16`` (numpy.linalg.matrix_rank's rule). See docs/linalg.md.

Where the work runs: NumPy arrays and CPU tensors go through the Rust core
(``saerecover._core``; no copies for float32/float64 input of any strides, GIL released);
tensors on another device (CUDA) are projected there with torch, using the same float64 basis
(encoder) or the same float64 SVD rule (Jacobian). float16/bfloat16 input is projected in
float32 and cast back. Outputs are new arrays, never views of the input, and carry no
autograd history.

Finite input never gives a non-finite result: rows large enough to overflow in the products
are scaled by a power of two first (exact), and a result that is itself beyond the range of
the dtype (also when cast back to float16/bfloat16) raises ValueError. A failed allocation
raises MemoryError naming the shapes and the bytes.

This is the only module that imports ``saerecover._core``; torch is imported only when a
tensor is passed.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import TYPE_CHECKING, Any, Union, overload

import numpy as np

from saerecover import _core

if TYPE_CHECKING:
    import torch

    ArrayLike = Union[np.ndarray, torch.Tensor]
else:
    ArrayLike = Any

__all__ = ["BatchedJacobianNull", "EncoderNullProjector", "default_rcond", "jacobian_null_project",
           "jacobian_null_project_batched", "jacobian_null_project_torch"]

_EPS64 = float(np.finfo(np.float64).eps)

#: The Gram route is taken only when cond(J) is certainly at most this, by the dtype of G (the
#: Rust core's ``gram_max_cond``: the route squares the condition number; docs/linalg.md).
GRAM_MAX_COND = {"float64": 1e3, "float32": 1e6}
#: An eigenvalue of J J^T this close (relative to the largest) to the rank threshold is a rank
#: decision the Gram matrix cannot make reliably: left to the SVD (the Rust core's GRAM_NOISE).
GRAM_NOISE = 1e-12
#: The routes of :func:`jacobian_null_project_batched` (``auto`` picks one of the other two).
JACOBIAN_ROUTES = ("auto", "gram", "svd")


def default_rcond(nrows: int, ncols: int) -> float:
    """The default relative rank tolerance for a ``(nrows, ncols)`` matrix:
    ``max(nrows, ncols) * eps(float64)``."""
    return max(nrows, ncols, 1) * _EPS64


class EncoderNullProjector:
    """``P_perp = I - A (A^T A)^+ A^T`` for the encoder columns ``A`` (d, k) of a feature set.

    ``A`` is factored once (thin SVD in float64, on the CPU); ``apply`` then removes span(A)
    from every row of a batch, so that ``A^T y = 0`` to round-off (constraint C1). Any ``k``
    works: 0 (identity), ``k >= d``, duplicate, parallel or zero columns (pseudo-inverse
    semantics). ``A`` may be a NumPy array or a torch tensor of any float dtype and device;
    its dtype does not matter (the basis is kept in float64 and float32 and used in the dtype of
    the batch it is applied to).
    """

    def __init__(self, A: ArrayLike, *, rcond: float | None = None) -> None:
        _check_rcond(rcond)
        a = _to_numpy_for_factor(A, "A")
        self._core = _core.EncoderNullBasis.from_matrix(a, rcond)
        self._device_bases: dict[tuple[Any, Any], Any] = {}

    @property
    def d(self) -> int:
        """Length of the vectors projected (rows of A)."""
        return self._core.d

    @property
    def k(self) -> int:
        """Number of columns of A."""
        return self._core.k

    @property
    def rank(self) -> int:
        """Numerical rank of A: the number of directions removed."""
        return self._core.rank

    @property
    def rcond(self) -> float:
        """The relative tolerance used (the default filled in)."""
        return self._core.rcond

    @property
    def tolerance(self) -> float:
        """The absolute tolerance ``rcond * sigma_max(A)``."""
        return self._core.tolerance

    def basis(self) -> np.ndarray:
        """A float64 copy of the orthonormal basis ``U_r`` of span(A), shape (d, rank)."""
        return self._core.basis()

    def singular_values(self) -> np.ndarray:
        """The min(d, k) singular values of A, nonincreasing (empty if A is zero)."""
        return self._core.singular_values()

    @overload
    def apply(self, X: np.ndarray) -> np.ndarray: ...
    @overload
    def apply(self, X: torch.Tensor) -> torch.Tensor: ...

    def apply(self, X: ArrayLike) -> ArrayLike:
        """``X - (X U_r) U_r^T`` over the last axis: X (..., d) -> same shape, kind, dtype,
        device. Raises ValueError for a wrong last axis, NaN/Inf in X or a result beyond the
        range of X's dtype, TypeError for a non-float dtype, MemoryError when an allocation
        fails."""
        d = self.d
        if _is_tensor(X):
            _check_last_axis(X, d, "X", f"the projector was built for d={d}", min_ndim=1)
            if X.device.type != "cpu":
                return self._apply_torch_device(X)
            flat, restore = _tensor_rows(X, "X", d)
            return restore(self._core.apply(flat))
        x = _as_float_ndarray(X, "X")
        _check_last_axis(x, d, "X", f"the projector was built for d={d}", min_ndim=1)
        flat, restore = _ndarray_rows(x, "X", d)
        return restore(self._core.apply(flat))

    __call__ = apply

    def _apply_torch_device(self, X: torch.Tensor) -> torch.Tensor:
        torch = _torch()
        compute = _compute_dtype(X.dtype, "X", torch)
        _check_finite_tensor(X.detach(), "X")
        x = X.detach().reshape(_nrows(X.shape), self.d).to(compute)
        with torch.no_grad():
            if self.rank == 0:
                y = x.clone()
            elif self.rank == self.d:
                y = torch.zeros_like(x)
            else:
                y = _project_out_torch(x, self._device_basis(X.device, compute), "X", X.shape)
        return _cast_back_tensor(y.reshape(X.shape), X.dtype, "X")

    def _device_basis(self, device: Any, dtype: Any) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._device_bases:
            torch = _torch()
            self._device_bases[key] = torch.from_numpy(self.basis()).to(device=device, dtype=dtype)
        return self._device_bases[key]

    def __repr__(self) -> str:
        return f"EncoderNullProjector(d={self.d}, k={self.k}, rank={self.rank}, rcond={self.rcond:.3g})"


@overload
def jacobian_null_project(
    J: ArrayLike, G: np.ndarray, *, rcond: float | None = None
) -> np.ndarray: ...
@overload
def jacobian_null_project(
    J: ArrayLike, G: torch.Tensor, *, rcond: float | None = None
) -> torch.Tensor: ...


def jacobian_null_project(J: ArrayLike, G: ArrayLike, *, rcond: float | None = None) -> ArrayLike:
    """``G - (J^T (J J^T)^+ J G^T)^T``: each row of G with the row space of J removed.

    J: (m, n), the Jacobian of the defended features w.r.t. delta (m = 0 returns a copy of G);
    G: (n,) or (b, n). Returns G's kind, dtype, shape and device (J is moved to G's device if
    it is elsewhere). J is factored in float64: by a Cholesky factorization of the Gram matrix
    J J^T when an estimate of cond(J) shows it is accurate (cond <= 1e3 for float64 G, 1e6 for
    float32 G: the Gram route squares the condition number), else by a thin SVD of J^T
    (docs/linalg.md). Singular values ``<= rcond * sigma_max(J)`` count as zero, ``rcond=None``
    meaning ``max(m, n) * 2.2e-16``.
    """
    _check_rcond(rcond)
    if _is_tensor(G) and G.device.type != "cpu":
        return _jacobian_torch_device(J, G, rcond)
    j = _to_numpy_for_factor(J, "J")
    if _is_tensor(G):
        _check_jacobian_shapes(j.shape, G)
        flat, restore = _tensor_rows(G, "G", j.shape[1])
    else:
        g = _as_float_ndarray(G, "G")
        _check_jacobian_shapes(j.shape, g)
        flat, restore = _ndarray_rows(g, "G", j.shape[1])
    out, _rank = _core.jacobian_null_project(j, flat, rcond)
    return restore(out)


def _jacobian_torch_device(J: ArrayLike, G: torch.Tensor, rcond: float | None) -> torch.Tensor:
    return jacobian_null_project_torch(J, G, rcond=rcond)[0]


def jacobian_null_project_torch(J: ArrayLike, G: torch.Tensor, *, rcond: float | None = None,
                                route: str = "auto") -> tuple[torch.Tensor, str]:
    """:func:`jacobian_null_project` computed by torch on G's device (CUDA tensors take this path;
    CPU tensors may call it directly), and the route taken, ``"gram"`` or ``"svd"``
    (:func:`jacobian_null_project_batched`; ``"zero"`` when J has no non-zero entry)."""
    torch = _torch()
    if _is_tensor(J):
        if not J.is_floating_point():
            raise TypeError(f"J must be a floating-point tensor, got {J.dtype}")
        j = J.detach().to(device=G.device, dtype=torch.float64)
    else:
        j = torch.from_numpy(_as_float_ndarray(J, "J").astype(np.float64)).to(G.device)
    if j.ndim != 2:
        raise ValueError(f"J must be 2-D (m, n), got shape {tuple(j.shape)}")
    _check_jacobian_shapes(tuple(j.shape), G)
    _compute_dtype(G.dtype, "G", torch)
    _check_finite_tensor(j, "J")
    _check_finite_tensor(G.detach(), "G")
    g = G.detach().reshape(_nrows(G.shape), j.shape[1])
    if g.shape[0] == 0 or j.shape[1] == 0:
        return G.detach().clone(), "zero"
    # exactly-zero rows of J are left out (as the Rust core does)
    j = j[(j != 0).any(dim=1)]
    y, routes = jacobian_null_project_batched(j.unsqueeze(0), g.unsqueeze(0), rcond=rcond, route=route,
                                              dtype=G.dtype)
    y = y[0].reshape(G.shape)
    _check_overflow(torch.isfinite(y), torch.float64, "G", G.shape)
    return _cast_back_tensor(y, G.dtype, "G"), routes[0]


def jacobian_null_project_batched(J: torch.Tensor, G: torch.Tensor, *, rcond: float | None = None,
                                  route: str = "auto", dtype: Any = None) -> tuple[torch.Tensor, list[str]]:
    """``G_b - (J_b^T (J_b J_b^T)^+ J_b G_b^T)^T`` for a batch of independent problems, in torch
    (any device): J (B, m, n), G (B, r, n); returns (Y (B, r, n) in float64, route per problem).
    :class:`BatchedJacobianNull` factored once and applied once (``dtype``: G's unless given)."""
    if G.ndim != 3 or J.ndim != 3 or G.shape[0] != J.shape[0] or G.shape[2] != J.shape[2]:
        raise ValueError(f"J (B, m, n) and G (B, r, n) must agree, got shapes {tuple(J.shape)} and {tuple(G.shape)}")
    null = BatchedJacobianNull(J, rcond=rcond, route=route, dtype=dtype or G.dtype)
    return null.apply(G), null.routes


class BatchedJacobianNull:
    """The null spaces of a batch of Jacobians J (B, m, n), factored once (torch, J's device),
    applied to any number of G (B, r, n) by :meth:`apply`.

    The Rust core's route choice (docs/linalg.md): the **Gram route**, a Cholesky factorization
    of J J^T (float64, J scaled by a power of two), is taken when the factor shows that cond(J)
    is certainly at most ``GRAM_MAX_COND`` for ``dtype`` (float32 and lower count as float32)
    and that no eigenvalue lies near the rank threshold: lambda_min >= 1 / trace((J J^T)^-1)
    and lambda_max <= ||J J^T||_inf bound the spectrum from the safe side. Otherwise (or with
    ``route="svd"``) the **SVD route**: a thin SVD of J^T, singular values ``<= rcond *
    sigma_max`` dropped. ``route="gram"`` forces the Gram matrix, solved by its
    eigendecomposition over the eigenvalues above ``max(rcond^2, GRAM_NOISE) lambda_max``.
    Zero rows of J are allowed (they change nothing); rcond: as :func:`jacobian_null_project`,
    per problem. ``routes``: per problem, "gram", "svd" or "zero" (J = 0).
    """

    def __init__(self, J: torch.Tensor, *, rcond: float | None = None, route: str = "auto",
                 dtype: Any = None) -> None:
        torch = _torch()
        if route not in JACOBIAN_ROUTES:
            raise ValueError(f"unknown route {route!r}; valid: {', '.join(JACOBIAN_ROUTES)}")
        _check_rcond(rcond)
        if J.ndim != 3:
            raise ValueError(f"J must be 3-D (B, m, n), got shape {tuple(J.shape)}")
        batch, m, n = J.shape
        self.shape = tuple(J.shape)
        rc = default_rcond(m, n) if rcond is None else float(rcond)
        f64 = torch.float64
        self.routes: list[str] = ["zero"] * batch
        self.empty = batch == 0 or m == 0 or n == 0
        if self.empty:
            return
        # a power of two per problem (exact) puts J's largest entry in [0.5, 1)
        j = J.detach().to(f64)
        top = j.abs().amax(dim=(1, 2))
        zero = top == 0
        exponent = torch.frexp(torch.where(zero, torch.ones_like(top), top)).exponent
        j = j * torch.pow(2.0, -exponent.to(f64)).view(batch, 1, 1)
        gram = j @ j.mT
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        # an exactly-zero row is decoupled: its diagonal set to the largest one keeps the spectrum's range
        fill = diag.amax(dim=1, keepdim=True)
        fill = torch.where(fill > 0, fill, torch.ones_like(fill))
        gram = gram + torch.diag_embed(torch.where(diag == 0, fill.expand_as(diag), torch.zeros_like(diag)))
        self.j, self.zero = j, zero
        todo = ~zero
        self.eigen = self.chol = self.basis = None
        self.use_gram = torch.zeros_like(todo)
        self.use_svd = torch.zeros_like(todo)
        if route == "gram":
            lam, vec = torch.linalg.eigh(gram)
            kept = lam > max(rc * rc, GRAM_NOISE) * lam[:, -1:].clamp_min(0)
            inv = torch.where(kept, 1.0 / torch.where(kept, lam, torch.ones_like(lam)), torch.zeros_like(lam))
            self.eigen = (vec, inv)
            self.use_gram = todo
        else:
            if route == "auto":
                chol, info = torch.linalg.cholesky_ex(gram)
                factored = (info == 0) & todo
                eye = torch.eye(m, dtype=f64, device=gram.device).expand(batch, m, m)
                safe = torch.where(factored.view(batch, 1, 1), chol, eye)
                inv_l = torch.linalg.solve_triangular(safe, eye, upper=False)
                lam_min = 1.0 / inv_l.pow(2).sum(dim=(1, 2))
                lam_max = gram.abs().sum(dim=2).amax(dim=1)
                max_cond = GRAM_MAX_COND["float64" if dtype == f64 else "float32"]
                self.use_gram = factored & (lam_min * max_cond**2 >= lam_max) & (lam_min > (rc * rc + GRAM_NOISE)
                                                                                   * lam_max)
                self.chol = safe
            self.use_svd = todo & ~self.use_gram
            if bool(self.use_svd.any()):
                u, sv, _ = torch.linalg.svd(j[self.use_svd].mT, full_matrices=False)
                self.basis = u * (sv > rc * sv[:, :1]).unsqueeze(1).to(f64)
        gram_flags, svd_flags = self.use_gram.tolist(), self.use_svd.tolist()
        self.routes = ["gram" if gr else "svd" if sv_ else "zero" for gr, sv_ in zip(gram_flags, svd_flags)]

    def apply(self, G: torch.Tensor) -> torch.Tensor:
        """Y (B, r, n) in float64: each G_b with J_b's row space removed (rows of G near the ends
        of float64's range scaled by a power of two and back, exact)."""
        torch = _torch()
        if G.ndim != 3 or G.shape[0] != self.shape[0] or G.shape[2] != self.shape[2]:
            raise ValueError(f"J (B, m, n) and G (B, r, n) must agree, got shapes {self.shape} and {tuple(G.shape)}")
        f64 = torch.float64
        g, row_exp = G.detach().to(f64), None
        if self.empty:
            return g
        row_top = g.abs().amax(dim=2, keepdim=True)
        if bool(((row_top > 1e150) | ((row_top < 1e-150) & (row_top > 0))).any()):
            row_exp = torch.frexp(torch.where(row_top > 0, row_top, torch.ones_like(row_top))).exponent.to(f64)
            half = torch.div(row_exp, 2, rounding_mode="trunc")
            g = g * torch.pow(2.0, -half) * torch.pow(2.0, -(row_exp - half))
        j = self.j
        out = g.clone()
        if self.eigen is not None:
            vec, inv = self.eigen
            w = vec @ (inv.unsqueeze(-1) * (vec.mT @ (j @ g.mT)))
            y = g - w.mT @ j
            out[self.use_gram] = y[self.use_gram]
        elif bool(self.use_gram.any()):
            sel = self.use_gram
            w = torch.cholesky_solve(j[sel] @ g[sel].mT, self.chol[sel])
            out[sel] = g[sel] - w.mT @ j[sel]
        if self.basis is not None:
            gs = g[self.use_svd]
            out[self.use_svd] = gs - (gs @ self.basis) @ self.basis.mT
        return _scale_rows_back(out, row_exp)


def _scale_rows_back(y: torch.Tensor, row_exp: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`jacobian_null_project_batched`'s row scaling (two factors, each one normal)."""
    if row_exp is None:
        return y
    torch = _torch()
    half = torch.div(row_exp, 2, rounding_mode="trunc")
    return y * torch.pow(2.0, half) * torch.pow(2.0, row_exp - half)


def _project_out_torch(x: torch.Tensor, u: torch.Tensor, name: str, shape: Any) -> torch.Tensor:
    """``x - (x u) u^T`` for x (rows, d) and an orthonormal u (d, r) of x's dtype, as the Rust
    core computes it: rows whose largest entry could overflow in the products are scaled by a
    power of two first and back after (exact), and a result beyond the dtype's range raises
    ValueError (``shape``: the caller's shape of ``name``, for the message)."""
    torch = _torch()
    rows, d = x.shape
    if rows == 0 or d == 0:
        return x.clone()
    limit = torch.finfo(x.dtype).max / (4.0 * (1.0 + math.sqrt(d)))
    top = x.abs().amax(dim=1, keepdim=True)
    big = top > limit
    if not bool(big.any()):
        return x - (x @ u) @ u.T
    # 2^(e1 + e2) with the largest entry of the row in [1, 2); two factors keep each one normal
    e = torch.where(big, torch.frexp(top).exponent - 1, 0).to(torch.float64)
    e1 = torch.div(e, 2, rounding_mode="trunc")
    down = (2.0**-e1).to(x.dtype), (2.0 ** -(e - e1)).to(x.dtype)
    up = (2.0**e1).to(x.dtype), (2.0 ** (e - e1)).to(x.dtype)
    xs = x * down[0] * down[1]
    y = (xs - (xs @ u) @ u.T) * up[0] * up[1]
    _check_overflow(torch.isfinite(y), x.dtype, name, shape)
    return y


def _cast_back_tensor(y: torch.Tensor, dtype: Any, name: str) -> torch.Tensor:
    """``y`` (computed in float32 or float64) cast to ``dtype``; ValueError when an entry is
    beyond the range of ``dtype`` (float16 and bfloat16 have a smaller one than float32)."""
    out = y.to(dtype)
    if out.dtype != y.dtype:
        _check_overflow(_torch().isfinite(out), dtype, name, tuple(y.shape))
    return out


def _check_overflow(finite: Any, dtype: Any, name: str, shape: Any) -> None:
    """The Rust core's overflow error when ``finite`` (a bool mask of a result of ``dtype``,
    NumPy or torch) is not all true; the position is given in ``shape``."""
    if bool(finite.all()):
        return
    bad = np.asarray((~finite).cpu()) if _is_tensor(finite) else ~finite
    at = [int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]), tuple(shape))]
    label = str(dtype).replace("torch.", "")
    largest = float(np.finfo(dtype).max) if isinstance(dtype, np.dtype) else float(_torch().finfo(dtype).max)
    raise ValueError(
        f"the projection of {name} overflows {label} at {at}: the exact result exceeds the "
        f"largest {label}, {largest:g}; {name} has shape {tuple(shape)} (scale {name} down)"
    )


def _torch_row_space_basis(j: torch.Tensor, rcond: float | None, torch: Any) -> torch.Tensor:
    """Orthonormal basis (n, r) of the row space of ``j`` (m, n, float64), same rule as Rust."""
    m, n = j.shape
    if rcond is None:
        rcond = default_rcond(m, n)
    empty = j.new_zeros((n, 0))
    if m == 0 or n == 0:
        return empty
    max_abs = j.abs().max()
    if max_abs == 0:
        return empty
    # scale by a power of two (exact) so that the largest entry lies in [0.5, 1)
    e = int(torch.frexp(max_abs).exponent)
    scaled = j * 2.0 ** (-(e // 2)) * 2.0 ** (-(e - e // 2))
    u, s, _ = torch.linalg.svd(scaled.T, full_matrices=False)
    rank = int((s > rcond * s[0]).sum())
    return u[:, :rank]


# --- input handling -------------------------------------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def _is_tensor(x: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_rcond(rcond: object) -> None:
    if rcond is None:
        return
    if isinstance(rcond, bool) or not isinstance(rcond, numbers.Real):
        raise TypeError(f"rcond must be a float or None, got {type(rcond).__name__}")
    if not (math.isfinite(float(rcond)) and rcond >= 0):
        raise ValueError(f"rcond must be a finite number >= 0 (or None for the default), got {rcond}")


def _as_float_ndarray(x: object, name: str) -> np.ndarray:
    """``x`` as a float ndarray in native byte order (no copy unless it must)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")
    if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, float32 or float64), got {x.dtype}"
        )
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def _to_numpy_for_factor(m: object, name: str) -> np.ndarray:
    """A matrix to be factored (A or J) as a 2-D float32/float64 ndarray on the CPU."""
    if _is_tensor(m):
        if not m.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {m.dtype}")
        t = m.detach()
        if t.dtype not in (_torch().float32, _torch().float64):
            t = t.float()  # float16 / bfloat16 widen exactly
        a = t.cpu().numpy()
    else:
        a = _as_float_ndarray(m, name)
        if a.dtype == np.float16:
            a = a.astype(np.float32)
    if a.ndim != 2:
        rows = "(d, k)" if name == "A" else "(m, n)"
        raise ValueError(f"{name} must be 2-D {rows}, got shape {a.shape}")
    return _aligned(a)


def _aligned(a: np.ndarray) -> np.ndarray:
    """``a`` itself unless it is misaligned (e.g. a view at an odd byte offset)."""
    return a if a.flags.aligned else np.require(a, requirements="A")


def _check_last_axis(x: Any, n: int, name: str, reason: str, *, min_ndim: int) -> None:
    shape = tuple(x.shape)
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {shape}")
    if shape[-1] != n:
        raise ValueError(f"{name} has shape {shape}: {shape[-1]} columns, but {reason} ({name} needs {n} columns)")


def _check_jacobian_shapes(j_shape: tuple[int, ...], g: Any) -> None:
    g_shape = tuple(g.shape)
    if len(g_shape) not in (1, 2):
        raise ValueError(f"G must be 1-D (n,) or 2-D (b, n), got shape {g_shape}")
    _check_last_axis(g, j_shape[1], "G", f"J has shape {tuple(j_shape)}", min_ndim=1)


def _nrows(shape: Any) -> int:
    """Rows of ``(..., n)`` seen as ``(rows, n)``; explicit because ``reshape(-1, 0)`` is ambiguous."""
    return math.prod(tuple(shape)[:-1])


def _ndarray_rows(x: np.ndarray, name: str, n: int) -> tuple[np.ndarray, Any]:
    """``x`` (..., n) as a 2-D float32/float64 (rows, n) array, and the function that turns a
    projected (rows, n) array back into ``x``'s shape and dtype (ValueError when a float16
    result overflows)."""
    shape, dtype = x.shape, x.dtype
    if dtype == np.float16:
        x = x.astype(np.float32)
    flat = _aligned(x.reshape(_nrows(x.shape), n) if x.ndim != 2 else x)

    def restore(y: np.ndarray) -> np.ndarray:
        if y.dtype == dtype:
            return y.reshape(shape)
        with np.errstate(over="ignore"):
            out = y.reshape(shape).astype(dtype)
        _check_overflow(np.isfinite(out), dtype, name, shape)
        return out

    return flat, restore


def _tensor_rows(x: torch.Tensor, name: str, n: int) -> tuple[np.ndarray, Any]:
    """A CPU tensor (..., n) as a 2-D NumPy view (or a float32 copy for float16/bfloat16), and
    the function that turns the projected array back into a tensor like ``x``."""
    torch = _torch()
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    t = x.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(_compute_dtype(t.dtype, name, torch))
    flat = t.reshape(_nrows(t.shape), n) if t.ndim != 2 else t
    shape, dtype = x.shape, x.dtype

    def restore(y: np.ndarray) -> torch.Tensor:
        return _cast_back_tensor(torch.from_numpy(y).reshape(shape), dtype, name)

    return flat.numpy(), restore


def _compute_dtype(dtype: Any, name: str, torch: Any) -> Any:
    """float64 stays float64; float32, float16 and bfloat16 are projected in float32."""
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise TypeError(
        f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
        f"got {dtype}"
    )


def _check_finite_tensor(t: torch.Tensor, name: str) -> None:
    """The Rust core's NaN/Inf error, for tensors projected with torch on their device."""
    torch = _torch()
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        value = float(t[where])
        raise ValueError(
            f"{name} contains a non-finite value ({value}) at {list(where)}; "
            f"{name} has shape {tuple(t.shape)}"
        )
