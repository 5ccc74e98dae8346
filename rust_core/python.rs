//! The binding layer `saerecover._core`: NumPy arrays in and out, dtype dispatch, zero-copy
//! strided views, the GIL released during the math, errors as ValueError / TypeError naming the
//! argument and its shape, MemoryError when an allocation fails, RuntimeError (without a Rust
//! backtrace) for an internal error. No math here; `saerecover.linalg` is the only Python
//! caller.

use crate::{factor_par, work_par};
use crate::{jacobian_null_project_with as project_jacobian, JacobianRoute};
use crate::{EncoderNullProjector, ProjectionError, Real};
use faer::{MatMut, MatRef};
use numpy::npyffi::{get_type_object, npy_intp, NpyTypes, PY_ARRAY_API};
use numpy::{
    Element, PyArray, PyArray2, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray2,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, Once};

/// The extension module `saerecover._core`.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    quiet_panics();
    m.add_class::<EncoderNullBasis>()?;
    m.add_function(wrap_pyfunction!(jacobian_null_project, m)?)?;
    m.add_function(wrap_pyfunction!(internal_error_for_tests, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

/// The factored basis of span(A) for `A` (d, k): `apply(X)` returns `X - (X U_r) U_r^T` for
/// `X` (n, d), which is `(I - A A^+) x` per row. Built with `EncoderNullBasis.from_matrix`.
#[pyclass(frozen, name = "EncoderNullBasis", module = "saerecover._core")]
struct EncoderNullBasis {
    inner: EncoderNullProjector,
}

#[pymethods]
impl EncoderNullBasis {
    /// Factors `a` (d, k), float32 or float64, with a thin SVD in float64; singular values
    /// `<= rcond * sigma_max` are dropped (`rcond=None`: `max(d, k) * 2.2e-16`).
    #[staticmethod]
    #[pyo3(signature = (a, rcond = None))]
    fn from_matrix(py: Python<'_>, a: &Bound<'_, PyAny>, rcond: Option<f64>) -> PyResult<Self> {
        let inner = match float_matrix("A", a)? {
            Float::F32(a) => {
                let (a, par) = (view("A", &a)?, factor_par(a.shape()[0], a.shape()[1]));
                detached(py, || EncoderNullProjector::from_matrix(a, rcond, par))?
            }
            Float::F64(a) => {
                let (a, par) = (view("A", &a)?, factor_par(a.shape()[0], a.shape()[1]));
                detached(py, || EncoderNullProjector::from_matrix(a, rcond, par))?
            }
        };
        Ok(Self { inner })
    }

    /// `X - (X U_r) U_r^T` for `x` (n, d), float32 or float64, any strides; a new C-ordered
    /// array of `x`'s dtype.
    fn apply<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        match float_matrix("X", x)? {
            Float::F32(x) => self.apply_typed(py, x),
            Float::F64(x) => self.apply_typed(py, x),
        }
    }

    /// Length of the projected vectors (rows of A).
    #[getter]
    fn d(&self) -> usize {
        self.inner.d()
    }

    /// Number of columns of A.
    #[getter]
    fn k(&self) -> usize {
        self.inner.k()
    }

    /// Numerical rank of A: the number of directions removed.
    #[getter]
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    /// The relative tolerance used (the default filled in).
    #[getter]
    fn rcond(&self) -> f64 {
        self.inner.span_basis().rcond()
    }

    /// The absolute tolerance `rcond * sigma_max`.
    #[getter]
    fn tolerance(&self) -> f64 {
        self.inner.span_basis().tolerance()
    }

    /// A float64 copy of the orthonormal basis U_r, shape (d, rank).
    fn basis<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let u = self.inner.span_basis().basis();
        let out = new_output::<f64>(py, u.nrows(), u.ncols(), || "copying the basis".into())?;
        output_view(&out).copy_from(u);
        Ok(out)
    }

    /// The singular values of A, nonincreasing, min(d, k) of them (empty if A is zero).
    fn singular_values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let diag = self.inner.span_basis().diag();
        let out = new_output::<f64>(py, 1, diag.len(), || "copying the singular values".into())?;
        output_view(&out)
            .row_mut(0)
            .iter_mut()
            .zip(diag)
            .for_each(|(o, &s)| *o = s);
        out.reshape([diag.len()]).map(Bound::into_any)
    }

    fn __repr__(&self) -> String {
        format!(
            "EncoderNullBasis(d={}, k={}, rank={}, rcond={:e})",
            self.d(),
            self.k(),
            self.rank(),
            self.rcond()
        )
    }
}

impl EncoderNullBasis {
    fn apply_typed<'py, T: Real + Element>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, T>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let x = view("X", &x)?;
        let out = new_output::<T>(py, x.nrows(), x.ncols(), || {
            format!(
                "projecting X of shape ({}, {}) ({})",
                x.nrows(),
                x.ncols(),
                T::NAME
            )
        })?;
        let dst = output_view(&out);
        let (n, d, r) = (x.nrows() as f64, x.ncols() as f64, self.inner.rank() as f64);
        let (inner, par) = (&self.inner, work_par(4.0 * n * d * r));
        detached(py, || inner.apply(dst, x, par))?;
        Ok(out.into_any())
    }
}

/// `(G - (J^T (J J^T)^+ J G^T)^T, rank)` for `j` (m, n) and `g` (b, n), each float32 or
/// float64, any strides. The result has `g`'s dtype; `J` is factored in float64. `route`:
/// `"auto"` (default: the Gram route when it is accurate, else the SVD), `"gram"` or `"svd"`
/// (forced, for tests and comparisons; see docs/linalg.md).
#[pyfunction]
#[pyo3(signature = (j, g, rcond = None, route = None))]
fn jacobian_null_project<'py>(
    py: Python<'py>,
    j: &Bound<'py, PyAny>,
    g: &Bound<'py, PyAny>,
    rcond: Option<f64>,
    route: Option<&str>,
) -> PyResult<(Bound<'py, PyAny>, usize)> {
    let route = match route.unwrap_or("auto") {
        "auto" => JacobianRoute::Auto,
        "gram" => JacobianRoute::Gram,
        "svd" => JacobianRoute::Svd,
        other => {
            return Err(PyValueError::new_err(format!(
                "route must be 'auto', 'gram' or 'svd', got {other:?}"
            )))
        }
    };
    match (float_matrix("J", j)?, float_matrix("G", g)?) {
        (Float::F32(j), Float::F32(g)) => jacobian_typed(py, &j, &g, rcond, route),
        (Float::F32(j), Float::F64(g)) => jacobian_typed(py, &j, &g, rcond, route),
        (Float::F64(j), Float::F32(g)) => jacobian_typed(py, &j, &g, rcond, route),
        (Float::F64(j), Float::F64(g)) => jacobian_typed(py, &j, &g, rcond, route),
    }
}

fn jacobian_typed<'py, TJ: Real + Element, T: Real + Element>(
    py: Python<'py>,
    j: &PyReadonlyArray2<'py, TJ>,
    g: &PyReadonlyArray2<'py, T>,
    rcond: Option<f64>,
    route: JacobianRoute,
) -> PyResult<(Bound<'py, PyAny>, usize)> {
    let (j, g) = (view("J", j)?, view("G", g)?);
    let out = new_output::<T>(py, g.nrows(), g.ncols(), || {
        format!(
            "projecting G of shape ({}, {}) ({})",
            g.nrows(),
            g.ncols(),
            T::NAME
        )
    })?;
    let dst = output_view(&out);
    let (m, n, b) = (j.nrows() as f64, j.ncols() as f64, g.nrows() as f64);
    let par = work_par(m * m * n + 4.0 * b * m * n + m * m * m);
    let info = detached(py, || project_jacobian(dst, j, g, rcond, route, par))?;
    Ok((out.into_any(), info.rank))
}

/// A 2-D float array after dtype dispatch, borrowed read-only.
enum Float<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

fn float_matrix<'py>(arg: &'static str, ob: &Bound<'py, PyAny>) -> PyResult<Float<'py>> {
    let arr = ob.cast::<PyUntypedArray>().map_err(|_| {
        let ty = ob
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("{arg} must be a numpy.ndarray, got {ty}"))
    })?;
    if arr.ndim() != 2 {
        return Err(PyValueError::new_err(format!(
            "{arg} must be 2-D, got a {}-D array of shape {}",
            arr.ndim(),
            shape_str(arr.shape())
        )));
    }
    let borrow = |e: numpy::BorrowError| PyValueError::new_err(format!("{arg}: {e}"));
    if let Ok(a) = ob.cast::<PyArray2<f32>>() {
        return Ok(Float::F32(a.try_readonly().map_err(borrow)?));
    }
    if let Ok(a) = ob.cast::<PyArray2<f64>>() {
        return Ok(Float::F64(a.try_readonly().map_err(borrow)?));
    }
    let dtype = arr
        .dtype()
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "?".into());
    Err(PyTypeError::new_err(format!(
        "{arg} must have dtype float32 or float64 (native byte order), got {dtype} (shape {})",
        shape_str(arr.shape())
    )))
}

/// `(3, 64)`, as Python prints a shape.
fn shape_str(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A faer view of a NumPy matrix, without copying: any element strides, negative included.
fn view<'a, T: Element>(
    arg: &'static str,
    a: &'a PyReadonlyArray2<'_, T>,
) -> PyResult<MatRef<'a, T>> {
    let (shape, strides) = (a.shape(), a.strides());
    let (nrows, ncols) = (shape[0], shape[1]);
    if nrows == 0 || ncols == 0 {
        return Ok(MatRef::from_row_major_slice(&[], nrows, ncols));
    }
    let size = std::mem::size_of::<T>() as isize;
    let ptr = a.data() as *const T;
    // A stride along an axis of length 1 is never used; numpy may leave any value there.
    let stride = |s: isize, len: usize| {
        if len == 1 {
            Some(0)
        } else {
            (s % size == 0).then_some(s / size)
        }
    };
    match (stride(strides[0], nrows), stride(strides[1], ncols)) {
        (Some(rs), Some(cs)) if (ptr as usize) % std::mem::align_of::<T>() == 0 => {
            // SAFETY: numpy guarantees that `ptr + i * rs + j * cs` is a valid, initialized
            // element for i < nrows, j < ncols, and the read-only borrow `a` keeps the array
            // alive and un-borrowed mutably by Rust for 'a.
            Ok(unsafe { MatRef::from_raw_parts(ptr, nrows, ncols, rs, cs) })
        }
        _ => Err(PyValueError::new_err(format!(
            "{arg} (shape {}, byte strides {strides:?}) is not aligned to its element size; \
             pass numpy.ascontiguousarray({arg})",
            shape_str(shape)
        ))),
    }
}

/// A fresh, uninitialized C-ordered (rows, cols) array for a projection to write into, or a
/// MemoryError naming `call` and the bytes when NumPy cannot allocate it (rust-numpy's own
/// constructor panics there).
fn new_output<'py, T: Real + Element>(
    py: Python<'py>,
    nrows: usize,
    ncols: usize,
    call: impl FnOnce() -> String,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let mut dims = [nrows as npy_intp, ncols as npy_intp];
    // SAFETY: the arguments are what `PyArray::new` passes (a new C-ordered array owning its
    // data; the descriptor reference is stolen). Floats have no invalid bit patterns and no drop
    // glue; every element is written by the projection (a copy or a fill, then in-place
    // updates) before Python can see the array, and on an error the array is dropped unseen.
    unsafe {
        let ptr = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            get_type_object(py, NpyTypes::PyArray_Type),
            T::get_dtype(py).into_dtype_ptr(),
            2,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        );
        if ptr.is_null() {
            let err = ProjectionError::OutOfMemory {
                call: call(),
                buffer: "the result",
                bytes: nrows * ncols * std::mem::size_of::<T>(),
            };
            let err = PyMemoryError::new_err(format!("{err} (shape ({nrows}, {ncols}))"));
            err.set_cause(py, PyErr::take(py));
            return Err(err);
        }
        Ok(Bound::from_owned_ptr(py, ptr).cast_into_unchecked::<PyArray<T, _>>())
    }
}

/// A mutable view of a fresh C-ordered array made by [`new_output`].
fn output_view<'a, T: Element>(out: &'a Bound<'_, PyArray2<T>>) -> MatMut<'a, T> {
    let (nrows, ncols) = (out.shape()[0], out.shape()[1]);
    if nrows == 0 || ncols == 0 {
        return MatMut::from_row_major_slice_mut(&mut [], nrows, ncols);
    }
    // SAFETY: the array is C-ordered with nrows * ncols elements; it was just created, so no
    // other reference to its data exists, and `out` outlives the view.
    unsafe { MatMut::from_raw_parts_mut(out.data(), nrows, ncols, ncols as isize, 1) }
}

/// Runs `f` with the GIL released; errors become ValueError (MemoryError for a failed
/// allocation, RuntimeError for an SVD that does not converge), a panic becomes RuntimeError.
fn detached<R: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<R, ProjectionError> + Send,
) -> PyResult<R> {
    match py.detach(move || catch_unwind(AssertUnwindSafe(f))) {
        Ok(result) => result.map_err(to_py),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let place = LAST_PANIC
                .lock()
                .ok()
                .and_then(|mut at| at.take())
                .map(|at| format!(" (at {at})"))
                .unwrap_or_default();
            Err(PyRuntimeError::new_err(format!(
                "saerecover._core internal error: {msg}{place}"
            )))
        }
    }
}

fn to_py(e: ProjectionError) -> PyErr {
    match e {
        ProjectionError::NoConvergence { .. } => PyRuntimeError::new_err(e.to_string()),
        ProjectionError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// Where the last panic of this library happened, for the RuntimeError's message.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Replaces the default panic hook of this library's copy of the Rust runtime (other extension
/// modules have their own) with one that prints nothing: the default one writes the message
/// and, under `RUST_BACKTRACE`, a backtrace to stderr, next to the Python error. The panic's
/// place is kept for the RuntimeError instead.
fn quiet_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            if let (Some(at), Ok(mut last)) = (info.location(), LAST_PANIC.lock()) {
                *last = Some(format!("{}:{}", at.file(), at.line()));
            }
        }))
    });
}

/// Panics inside the core, on the calling thread or (`in_worker=True`) on a rayon worker: what
/// an internal error looks like from Python, for the tests.
#[pyfunction(name = "_internal_error_for_tests")]
#[pyo3(signature = (in_worker = false))]
fn internal_error_for_tests(py: Python<'_>, in_worker: bool) -> PyResult<()> {
    detached(py, move || -> Result<(), ProjectionError> {
        if in_worker {
            rayon::join(|| panic!("a forced internal error (worker)"), || ());
        }
        panic!("a forced internal error")
    })
}
