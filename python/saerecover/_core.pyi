# Hand-kept stub for the Rust extension (rust_core/python.rs). Use saerecover.linalg instead:
# it is the only module that imports this one. Every function raises MemoryError (naming the
# shapes and the bytes) when an allocation fails, and RuntimeError("saerecover._core internal
# error: ... (at FILE:LINE)") for a bug, without a Rust backtrace.
from typing import Literal, final

import numpy as np
import numpy.typing as npt

__version__: str

_Float = np.float32 | np.float64

@final
class EncoderNullBasis:
    """The factored basis of span(A) for A (d, k); apply(X) = X - (X U_r) U_r^T."""

    @staticmethod
    def from_matrix(a: npt.NDArray[_Float], rcond: float | None = None) -> EncoderNullBasis:
        """Thin SVD of a (d, k) in float64; drops singular values <= rcond * sigma_max
        (rcond=None: max(d, k) * 2.2e-16). ValueError on NaN/Inf or a bad rcond, TypeError on
        a dtype other than float32/float64, MemoryError."""
    def apply(self, x: npt.NDArray[_Float]) -> npt.NDArray[_Float]:
        """x (n, d), float32 or float64, any strides -> a new C-ordered (n, d) array of x's
        dtype. Rows large enough to overflow in the products are scaled by a power of two
        first. ValueError when x does not have d columns, holds NaN/Inf, or a result entry is
        beyond the range of x's dtype ("the projection of X overflows float32 at [i, j]: ...");
        MemoryError."""
    @property
    def d(self) -> int: ...
    @property
    def k(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def rcond(self) -> float: ...
    @property
    def tolerance(self) -> float: ...
    def basis(self) -> npt.NDArray[np.float64]:
        """A float64 copy of U_r, shape (d, rank)."""
    def singular_values(self) -> npt.NDArray[np.float64]:
        """The min(d, k) singular values of A, nonincreasing (empty if A is zero)."""

def jacobian_null_project(
    j: npt.NDArray[_Float],
    g: npt.NDArray[_Float],
    rcond: float | None = None,
    route: Literal["auto", "gram", "svd"] | None = None,
) -> tuple[npt.NDArray[_Float], int]:
    """(G - (J^T (J J^T)^+ J G^T)^T, rank of J) for j (m, n) and g (b, n); the result has g's
    dtype, J is factored in float64. route: "auto" (None; the Gram/Cholesky route when J is
    well conditioned, else the thin SVD of J^T), or "gram" / "svd" forced (docs/linalg.md).
    ValueError on an unknown route, NaN/Inf, or a result entry beyond the range of g's dtype
    ("the projection of G overflows ..."); MemoryError."""

def _internal_error_for_tests(in_worker: bool = False) -> None:
    """Panics inside the core (on a rayon worker with in_worker=True): always raises the
    RuntimeError an internal error gives. For the tests only."""
