//! An orthonormal basis `U_r` of the column span of a matrix, found by a rank-revealing
//! factorization with a relative rank tolerance, and the one kernel every projection uses:
//! `Y = X - (X U_r) U_r^T`, applied to the rows of a batch `X` (PAPER_NOTES.md: `P_perp` of C1
//! when the matrix is `A_S`, the Jacobian row-space projection when it is `J^T`).
//!
//! Pseudo-inverse semantics: `U_r U_r^T = M M^+` for the matrix `M` with its singular values
//! `<= rcond * sigma_max` set to zero, exactly what `numpy.linalg.pinv(M, rcond)` projects on.
//! The factorization always runs in `f64` on a copy of `M` scaled by a power of two (exact), so
//! float32 input gets a basis accurate to f64 round-off and tiny or huge scales neither
//! underflow nor overflow. A `d x d` projector is never formed.

use crate::checks::{all_finite, check_finite, check_rcond, max_abs_finite};
use crate::error::ProjectionError;
use crate::memory::{prepare_threads, try_mat, try_scratch, try_vec, try_zeros};
use crate::scalar::Real;
use faer::diag::Diag;
use faer::dyn_stack::MemStack;
use faer::linalg::householder::{
    apply_block_householder_sequence_on_the_left_in_place_scratch,
    apply_block_householder_sequence_on_the_left_in_place_with_conj,
};
use faer::linalg::matmul::matmul;
use faer::linalg::qr::col_pivoting::factor as col_piv_qr;
use faer::linalg::qr::no_pivoting::factor::recommended_block_size;
use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Conj, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;
use std::sync::OnceLock;

/// The rank-revealing factorization used to find the basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Factorization {
    /// Thin SVD, `M = U S V^T`; keeps the left singular vectors with `sigma_i > rcond *
    /// sigma_max`. Exact pseudo-inverse semantics; the default.
    #[default]
    Svd,
    /// QR with column pivoting, `M P = Q R`; keeps the first columns of `Q` with `|R_ii| >
    /// rcond * |R_00|`. Usually rank-revealing but not guaranteed to be (Kahan's matrix), and
    /// `|R_ii|` only brackets the singular values; kept for comparison (see benches).
    ColPivQr,
}

/// An orthonormal basis of the column span of an `nrows x ncols` matrix `M`.
#[derive(Debug, Clone)]
pub struct SpanBasis {
    u64: Mat<f64>,
    /// `u64` rounded to f32, made on the first f32 use
    u32: OnceLock<Mat<f32>>,
    ncols: usize,
    rcond: f64,
    diag: Vec<f64>,
    method: Factorization,
}

impl SpanBasis {
    /// The default relative tolerance: `max(nrows, ncols) * f64::EPSILON`, the default of
    /// `numpy.linalg.matrix_rank` and of `numpy.linalg.pinv(m, rtol=None)`. It sits just above
    /// the round-off level of an f64 factorization, so exact duplicates and exact zeros are
    /// dropped while every direction that float32 data can express is kept. A direction it
    /// drops costs at most `rcond` in `||M^T y|| / (||M||_2 ||x||)`.
    pub fn default_rcond(nrows: usize, ncols: usize) -> f64 {
        nrows.max(ncols).max(1) as f64 * f64::EPSILON
    }

    /// Factors `m` (`nrows x ncols`) and keeps the directions above `rcond * sigma_max`
    /// (`rcond = None`: [`Self::default_rcond`]). `arg` names `m` in error messages.
    ///
    /// Errors: `rcond` negative or NaN, a non-finite entry in `m`, SVD non-convergence, an
    /// allocation that fails.
    pub fn from_columns<T: Real>(
        arg: &'static str,
        m: MatRef<'_, T>,
        rcond: Option<f64>,
        method: Factorization,
        par: Par,
    ) -> Result<Self, ProjectionError> {
        check_rcond(rcond)?;
        check_finite(arg, m)?;
        prepare_threads(par)
            .and_then(|()| Self::factor(arg, m, rcond, method, par))
            .map_err(|e| {
                e.during(|| {
                    let (r, c) = m.shape();
                    format!("factoring {arg} of shape ({r}, {c}) ({})", T::NAME)
                })
            })
    }

    /// [`Self::from_columns`] for input the caller has already checked.
    pub(crate) fn factor<T: Real>(
        arg: &'static str,
        m: MatRef<'_, T>,
        rcond: Option<f64>,
        method: Factorization,
        par: Par,
    ) -> Result<Self, ProjectionError> {
        let (nrows, ncols) = m.shape();
        let rcond = rcond.unwrap_or_else(|| Self::default_rcond(nrows, ncols));
        // 0 for an empty matrix too (faer's norm_max)
        let max_abs = m.norm_max().to_f64();
        if max_abs == 0.0 {
            return Ok(Self::from_parts(
                Mat::zeros(nrows, 0),
                ncols,
                rcond,
                Vec::new(),
                method,
            ));
        }
        // Scale by powers of two (exact) so that the largest entry lies in [1, 2).
        let e = max_abs.log2().floor() as i32;
        let (s1, s2) = (2f64.powi(-(e / 2)), 2f64.powi(-(e - e / 2)));
        let scaled = try_mat(
            "the scaled float64 copy of the factored matrix",
            nrows,
            ncols,
            |i, j| m[(i, j)].to_f64() * s1 * s2,
        )?;
        let unscale = 2f64.powi(e / 2) * 2f64.powi(e - e / 2);

        let (u, mut diag) = match method {
            Factorization::Svd => {
                svd_basis(scaled.as_ref(), rcond, par)?.ok_or(ProjectionError::NoConvergence {
                    arg,
                    shape: (nrows, ncols),
                })?
            }
            Factorization::ColPivQr => col_piv_qr_basis(scaled, rcond, par)?,
        };
        diag.iter_mut().for_each(|s| *s *= unscale);
        Ok(Self::from_parts(u, ncols, rcond, diag, method))
    }

    fn from_parts(
        u64: Mat<f64>,
        ncols: usize,
        rcond: f64,
        diag: Vec<f64>,
        method: Factorization,
    ) -> Self {
        let u32 = OnceLock::new();
        Self {
            u64,
            u32,
            ncols,
            rcond,
            diag,
            method,
        }
    }

    /// Rows of the factored matrix: the length of the vectors the basis is applied to.
    pub fn nrows(&self) -> usize {
        self.u64.nrows()
    }

    /// Columns of the factored matrix.
    pub fn ncols(&self) -> usize {
        self.ncols
    }

    /// Number of kept directions.
    pub fn rank(&self) -> usize {
        self.u64.ncols()
    }

    /// The relative tolerance that was used (the default filled in).
    pub fn rcond(&self) -> f64 {
        self.rcond
    }

    /// The absolute tolerance `rcond * sigma_max` (0 for an empty or zero matrix).
    pub fn tolerance(&self) -> f64 {
        self.rcond * self.diag.first().copied().unwrap_or(0.0)
    }

    /// The factorization that was used.
    pub fn method(&self) -> Factorization {
        self.method
    }

    /// Singular values (SVD) or `|R_ii|` (pivoted QR) of the factored matrix, nonincreasing,
    /// all `min(nrows, ncols)` of them (empty for a zero matrix).
    pub fn diag(&self) -> &[f64] {
        &self.diag
    }

    /// The orthonormal basis `U_r` (`nrows x rank`), in f64.
    pub fn basis(&self) -> MatRef<'_, f64> {
        self.u64.as_ref()
    }

    /// The basis rounded to `T`, which is what [`Self::project_out_in_place`] applies (the
    /// float32 copy is made on the first float32 use; an error if it cannot be allocated).
    pub fn basis_as<T: Real>(&self) -> Result<MatRef<'_, T>, ProjectionError> {
        let u32 = || match self.u32.get() {
            Some(u) => Ok(u),
            None => {
                let (d, r) = self.u64.shape();
                let u = try_mat("the float32 copy of the basis", d, r, |i, j| {
                    self.u64[(i, j)] as f32
                })?;
                Ok(self.u32.get_or_init(|| u))
            }
        };
        Ok(T::pick(u32, &self.u64)?.as_ref())
    }

    /// `x <- x - (x U_r) U_r^T` for each row of `x` (`n x nrows`), which `arg` names in errors.
    /// Shapes are the caller's to check (debug-asserted); `x` must be finite.
    ///
    /// Errors: [`ProjectionError::Overflow`] when an entry of the result is beyond `T::MAX` (`x`
    /// is then partly projected), [`ProjectionError::OutOfMemory`].
    pub fn project_out_in_place<T: Real>(
        &self,
        arg: &'static str,
        x: MatMut<'_, T>,
        par: Par,
    ) -> Result<(), ProjectionError> {
        debug_assert_eq!(x.ncols(), self.nrows());
        self.project_rows(arg, x, None, false, par).map(drop)
    }

    /// `dst <- x - (x U_r) U_r^T` for each row of `x`; `dst` has the shape of `x`. As
    /// [`Self::project_out_in_place`] otherwise.
    pub fn project_out<T: Real>(
        &self,
        arg: &'static str,
        dst: MatMut<'_, T>,
        x: MatRef<'_, T>,
        par: Par,
    ) -> Result<(), ProjectionError> {
        debug_assert_eq!(dst.shape(), x.shape());
        self.project_rows(arg, dst, Some(x), false, par).map(drop)
    }

    /// `dst <- src - (src U_r) U_r^T` (`src = None`: `dst` itself), a cache-sized block of rows
    /// at a time: copy, scan (finiteness when `check`, and the largest entry), `C = B U_r` into a
    /// small buffer, `B -= C U_r^T`, so that `src` is read once and `dst` written once. Rows large
    /// enough to overflow in the products are scaled first ([`scaled_products`]). With `par` of
    /// several threads, each takes a contiguous share of the rows and runs sequentially. Returns
    /// `Ok(false)` when `check` found a non-finite value (`dst` is then partly written).
    pub(crate) fn project_rows<T: Real>(
        &self,
        arg: &'static str,
        dst: MatMut<'_, T>,
        src: Option<MatRef<'_, T>>,
        check: bool,
        par: Par,
    ) -> Result<bool, ProjectionError> {
        let (n, d) = dst.shape();
        let r = self.rank();
        if n == 0 || d == 0 {
            return Ok(true);
        }
        let mut dst = dst;
        if r == d {
            let clean = !check || src.map_or(true, all_finite);
            dst.fill(T::from_f64(0.0));
            return Ok(clean);
        }
        let u = self.basis_as::<T>()?;
        let rows = block_rows::<T>(d, r);
        let limit = overflow_free_limit::<T>(d);
        let overflow = |at| ProjectionError::Overflow {
            arg,
            shape: (n, d),
            at,
            dtype: T::NAME,
        };
        let parts = row_shares(par, n);
        let run = |(start, mut dst): (usize, MatMut<'_, T>)| -> Result<bool, ProjectionError> {
            let mut coeff = try_zeros::<T>(
                "the coefficients of a block of rows",
                rows.min(dst.nrows()),
                r,
            )?;
            let mut done = 0;
            while done < dst.nrows() {
                let len = rows.min(dst.nrows() - done);
                let mut block = dst.rb_mut().subrows_mut(done, len);
                if let Some(src) = src {
                    block.copy_from(src.subrows(start + done, len));
                }
                let largest = max_abs_finite(block.rb());
                if check && largest.is_none() {
                    return Ok(false);
                }
                if r > 0 {
                    let c = coeff.as_mut().subrows_mut(0, len);
                    if largest.is_some_and(|top| top > limit) {
                        scaled_products(block, u, c, limit)
                            .map_err(|e| e.map_row(start + done, &overflow))?;
                    } else {
                        products(block, u, c);
                    }
                }
                done += len;
            }
            Ok(true)
        };
        if parts == 1 {
            return run((0, dst));
        }
        let step = n.div_ceil(parts);
        let mut pieces = Vec::with_capacity(parts);
        let mut rest = dst;
        let mut start = 0;
        while start < n {
            let len = step.min(n - start);
            let (piece, tail) = rest.split_at_row_mut(len);
            pieces.push((start, piece));
            rest = tail;
            start += len;
        }
        let results: Vec<_> = pieces.into_par_iter().map(run).collect();
        if results.iter().any(|r| matches!(r, Ok(false))) {
            return Ok(false);
        }
        results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map(|_| true)
    }
}

/// How many threads share `n` rows: each takes a contiguous share, and a share of fewer than 16
/// rows is not worth a thread (faer's own threads lose there too: d = 4096, k = 64, n = 1 took
/// 92 us on two, 28 us on one).
fn row_shares(par: Par, n: usize) -> usize {
    par.degree().max(1).min(n / 16).max(1)
}

/// Rows whose largest entry is at most this cannot overflow in [`products`]: `|C_ik| <=
/// ||x_i||` and every partial sum of `x_i - (C U_r^T)_i` is at most `(1 + sqrt(d)) max|x_i|`
/// (`U_r` orthonormal), with a factor 2 to spare for round-off.
fn overflow_free_limit<T: Real>(d: usize) -> T {
    T::from_f64(T::MAX.to_f64() / (4.0 * (1.0 + (d as f64).sqrt())))
}

/// `C = B U_r`, `B -= C U_r^T` (`c` is `rows x r`).
fn products<T: Real>(block: MatMut<'_, T>, u: MatRef<'_, T>, c: MatMut<'_, T>) {
    let mut c = c;
    matmul(
        c.rb_mut(),
        Accum::Replace,
        block.rb(),
        u,
        T::from_f64(1.0),
        Par::Seq,
    );
    matmul(
        block,
        Accum::Add,
        c.rb(),
        u.transpose(),
        T::from_f64(-1.0),
        Par::Seq,
    );
}

/// Why [`scaled_products`] stopped.
enum Scaled {
    /// An entry of the result (row within the block, column) is beyond the type's range.
    Overflow(usize, usize),
    Failed(ProjectionError),
}

impl Scaled {
    fn map_row(
        self,
        first_row: usize,
        overflow: &impl Fn((usize, usize)) -> ProjectionError,
    ) -> ProjectionError {
        match self {
            Self::Overflow(i, j) => overflow((first_row + i, j)),
            Self::Failed(e) => e,
        }
    }
}

/// [`products`] for a block holding rows above [`overflow_free_limit`]: each such row is scaled
/// by a power of two to a largest entry in `[1, 2)` first and scaled back after (exact, short of
/// overflow or underflow), so that only a result that is itself beyond the range fails.
fn scaled_products<T: Real>(
    block: MatMut<'_, T>,
    u: MatRef<'_, T>,
    c: MatMut<'_, T>,
    limit: T,
) -> Result<(), Scaled> {
    let mut block = block;
    let len = block.nrows();
    let mut exponents = try_vec("the row scales of a block", len, 0i32).map_err(Scaled::Failed)?;
    for (i, e) in exponents.iter_mut().enumerate() {
        let top = max_abs_finite(block.rb().subrows(i, 1)).unwrap_or(T::from_f64(0.0));
        if top > limit {
            *e = top.to_f64().log2().floor() as i32;
            scale_row(block.rb_mut().subrows_mut(i, 1), -*e);
        }
    }
    products(block.rb_mut(), u, c);
    for (i, &e) in exponents.iter().enumerate() {
        if e != 0 {
            let mut row = block.rb_mut().subrows_mut(i, 1);
            scale_row(row.rb_mut(), e);
            if let Some(j) = (0..row.ncols()).find(|&j| !row[(0, j)].is_finite_value()) {
                return Err(Scaled::Overflow(i, j));
            }
        }
    }
    Ok(())
}

/// `row <- row * 2^e`, in two steps so that each factor is a normal number of the type.
fn scale_row<T: Real>(row: MatMut<'_, T>, e: i32) {
    let (f1, f2) = (
        T::from_f64(2f64.powi(e / 2)),
        T::from_f64(2f64.powi(e - e / 2)),
    );
    let mut row = row;
    for j in 0..row.ncols() {
        row[(0, j)] = row[(0, j)] * f1 * f2;
    }
}

/// Rows per block when applying a basis of rank `r` to vectors of length `d`: the block stays
/// in L2 (about 512 KiB) between its copy and its two products, and holds at least
/// `min(r, 256)` rows so that packing `U_r` for each product is amortized over the block.
fn block_rows<T>(d: usize, r: usize) -> usize {
    let in_cache = (1 << 19) / (d * std::mem::size_of::<T>()).max(1);
    in_cache.max(r.min(256)).max(8)
}

/// Left singular vectors above the tolerance, and all singular values (nonincreasing);
/// `Ok(None)` when the SVD does not converge.
fn svd_basis(
    m: MatRef<'_, f64>,
    rcond: f64,
    par: Par,
) -> Result<Option<(Mat<f64>, Vec<f64>)>, ProjectionError> {
    let (nrows, ncols) = m.shape();
    let size = nrows.min(ncols);
    let mut s = Diag::<f64>::zeros(size);
    let mut u = try_zeros::<f64>("the left singular vectors", nrows, size)?;
    let req = svd_scratch::<f64>(
        nrows,
        ncols,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::No,
        par,
        Default::default(),
    );
    let mut buf = try_scratch("the SVD's workspace", req)?;
    let converged = svd(
        m,
        s.as_mut(),
        Some(u.as_mut()),
        None,
        par,
        MemStack::new(&mut buf),
        Default::default(),
    );
    if converged.is_err() {
        return Ok(None);
    }
    let diag: Vec<f64> = (0..size).map(|i| s[i]).collect();
    let rank = kept(&diag, rcond);
    u.truncate(nrows, rank);
    Ok(Some((u, diag)))
}

/// The first columns of `Q` of `M P = Q R` above the tolerance, and `|R_ii|`.
fn col_piv_qr_basis(
    m: Mat<f64>,
    rcond: f64,
    par: Par,
) -> Result<(Mat<f64>, Vec<f64>), ProjectionError> {
    let mut qr = m;
    let (nrows, ncols) = qr.shape();
    let size = nrows.min(ncols);
    let bs = recommended_block_size::<f64>(nrows, ncols);
    let mut q_coeff = try_zeros::<f64>("the Householder coefficients", bs, size)?;
    let mut perm = vec![0usize; ncols];
    let mut perm_inv = vec![0usize; ncols];
    {
        let req = col_piv_qr::qr_in_place_scratch::<usize, f64>(
            nrows,
            ncols,
            bs,
            par,
            Default::default(),
        );
        let mut buf = try_scratch("the QR factorization's workspace", req)?;
        col_piv_qr::qr_in_place(
            qr.as_mut(),
            q_coeff.as_mut(),
            &mut perm,
            &mut perm_inv,
            par,
            MemStack::new(&mut buf),
            Default::default(),
        );
    }
    let diag: Vec<f64> = (0..size).map(|i| qr[(i, i)].abs()).collect();
    let rank = kept(&diag, rcond);
    let mut q = try_mat(
        "the basis",
        nrows,
        rank,
        |i, j| if i == j { 1.0 } else { 0.0 },
    )?;
    let req = apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(nrows, bs, rank);
    let mut buf = try_scratch("the Householder application's workspace", req)?;
    // the Householder vectors lie below the diagonal of the factored matrix; faer reads them as
    // a unit lower-trapezoidal basis (neither the diagonal, which holds R's, nor above it)
    apply_block_householder_sequence_on_the_left_in_place_with_conj(
        qr.as_ref().subcols(0, size),
        q_coeff.as_ref(),
        Conj::No,
        q.as_mut(),
        par,
        MemStack::new(&mut buf),
    );
    Ok((q, diag))
}

/// Length of the leading run of `diag` strictly above `rcond * diag[0]`.
fn kept(diag: &[f64], rcond: f64) -> usize {
    let tol = rcond * diag.first().copied().unwrap_or(0.0);
    diag.iter().take_while(|&&s| s > tol).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn svd_and_qr_find_the_same_span() {
        let mut rng = rng(1);
        for &(d, k) in &[(16, 4), (40, 40), (30, 50), (64, 1)] {
            let a = gaussian(&mut rng, d, k);
            let svd = SpanBasis::from_columns("A", a.as_ref(), None, Factorization::Svd, Par::Seq)
                .unwrap();
            let qr =
                SpanBasis::from_columns("A", a.as_ref(), None, Factorization::ColPivQr, Par::Seq)
                    .unwrap();
            assert_eq!(svd.rank(), d.min(k));
            assert_eq!(qr.rank(), d.min(k));
            assert!(orthonormality_error(svd.basis()) < 1e-13);
            assert!(orthonormality_error(qr.basis()) < 1e-13);
            // same projector: U_svd U_svd^T = U_qr U_qr^T, compared through a random batch
            let x = gaussian(&mut rng, 5, d);
            let (ys, yq) = (project(&svd, x.as_ref()), project(&qr, x.as_ref()));
            assert!(max_abs_diff(ys.as_ref(), yq.as_ref()) < 1e-12);
        }
    }

    #[test]
    fn rank_follows_the_tolerance() {
        let mut rng = rng(2);
        // singular values 1, 1e-3, 1e-6, 1e-9, 1e-12 (five directions)
        let a = with_singular_values(&mut rng, 20, &[1.0, 1e-3, 1e-6, 1e-9, 1e-12]);
        let rank = |rcond| {
            SpanBasis::from_columns("A", a.as_ref(), rcond, Factorization::Svd, Par::Seq)
                .unwrap()
                .rank()
        };
        assert_eq!(rank(None), 5);
        assert_eq!(rank(Some(1e-10)), 4);
        assert_eq!(rank(Some(1e-7)), 3);
        assert_eq!(rank(Some(1e-4)), 2);
        assert_eq!(rank(Some(0.5)), 1);
        assert_eq!(rank(Some(1.0)), 0);
        let b =
            SpanBasis::from_columns("A", a.as_ref(), None, Factorization::Svd, Par::Seq).unwrap();
        assert!((b.diag()[0] - 1.0).abs() < 1e-14);
        assert!((b.tolerance() - SpanBasis::default_rcond(20, 5)).abs() < 1e-20);
    }

    #[test]
    fn scale_does_not_matter() {
        let mut rng = rng(3);
        let a = gaussian(&mut rng, 12, 5);
        let x = gaussian(&mut rng, 3, 12);
        let reference = project(
            &SpanBasis::from_columns("A", a.as_ref(), None, Factorization::Svd, Par::Seq).unwrap(),
            x.as_ref(),
        );
        for scale in [1e-300, 1e-200, 1e-30, 1e30, 1e200, 1e300] {
            let scaled = Mat::from_fn(12, 5, |i, j| a[(i, j)] * scale);
            let b =
                SpanBasis::from_columns("A", scaled.as_ref(), None, Factorization::Svd, Par::Seq)
                    .unwrap();
            assert_eq!(b.rank(), 5);
            assert!(max_abs_diff(project(&b, x.as_ref()).as_ref(), reference.as_ref()) < 1e-13);
            assert!((b.diag()[0] / (reference_sigma_max(a.as_ref()) * scale) - 1.0).abs() < 1e-12);
        }
        // subnormal entries only
        let tiny = Mat::from_fn(12, 5, |i, j| a[(i, j)] * 1e-310);
        let b = SpanBasis::from_columns("A", tiny.as_ref(), None, Factorization::Svd, Par::Seq)
            .unwrap();
        assert_eq!(b.rank(), 5);
    }

    #[test]
    fn zero_and_empty_matrices_have_rank_zero() {
        for (d, k) in [(5, 0), (0, 3), (0, 0), (4, 4)] {
            let a = Mat::<f32>::zeros(d, k);
            for method in [Factorization::Svd, Factorization::ColPivQr] {
                let b = SpanBasis::from_columns("A", a.as_ref(), None, method, Par::Seq).unwrap();
                assert_eq!((b.nrows(), b.ncols(), b.rank()), (d, k, 0));
                assert_eq!(b.tolerance(), 0.0);
            }
        }
    }

    #[test]
    fn accessors_report_what_was_used() {
        let a = gaussian(&mut rng(4), 9, 3);
        for method in [Factorization::Svd, Factorization::ColPivQr] {
            let b = SpanBasis::from_columns("A", a.as_ref(), None, method, Par::Seq).unwrap();
            assert_eq!(b.method(), method);
            assert_eq!(b.rcond(), SpanBasis::default_rcond(9, 3));
            assert_eq!(b.rcond(), 9.0 * f64::EPSILON);
            assert_eq!(b.tolerance(), b.rcond() * b.diag()[0]);
            let given =
                SpanBasis::from_columns("A", a.as_ref(), Some(0.25), method, Par::Seq).unwrap();
            assert_eq!(given.rcond(), 0.25);
        }
    }

    #[test]
    fn blocks_stay_in_cache_and_amortize_the_basis() {
        // 512 KiB of rows, at least min(r, 256) rows, at least 8
        assert_eq!(block_rows::<f64>(4096, 4), 16);
        assert_eq!(block_rows::<f32>(4096, 4), 32);
        assert_eq!(block_rows::<f64>(3, 1), 21845);
        assert_eq!(block_rows::<f64>(4096, 64), 64);
        assert_eq!(block_rows::<f64>(4096, 1000), 256);
        assert_eq!(block_rows::<f64>(1 << 20, 1), 8);
        assert_eq!(block_rows::<f64>(0, 0), 1 << 19);
    }

    #[test]
    fn threads_share_rows_sixteen_at_least() {
        assert_eq!(row_shares(Par::Seq, 1000), 1);
        assert_eq!(row_shares(Par::rayon(2), 0), 1);
        assert_eq!(row_shares(Par::rayon(2), 31), 1);
        assert_eq!(row_shares(Par::rayon(2), 32), 2);
        assert_eq!(row_shares(Par::rayon(4), 40), 2);
        assert_eq!(row_shares(Par::rayon(4), 64), 4);
        assert_eq!(row_shares(Par::rayon(4), 100_000), 4);
    }

    /// `project_rows` says whether its check found a non-finite value, for a basis of lower
    /// rank (the blocked products) and of full rank (a zero result without products).
    #[test]
    fn project_rows_reports_what_its_check_found() {
        let mut rng = rng(5);
        let x = gaussian(&mut rng, 40, 4);
        let mut bad = x.clone();
        bad[(33, 2)] = f64::NAN;
        for k in [1, 4] {
            let a = gaussian(&mut rng, 4, k);
            let b = SpanBasis::from_columns("A", a.as_ref(), None, Factorization::Svd, Par::Seq)
                .unwrap();
            let run = |src: &Mat<f64>, check: bool| {
                let mut y = Mat::<f64>::zeros(40, 4);
                let clean = b
                    .project_rows("X", y.as_mut(), Some(src.as_ref()), check, Par::Seq)
                    .unwrap();
                (clean, y)
            };
            let (clean, y) = run(&x, true);
            assert!(clean, "k={k}");
            assert_eq!(y, project(&b, x.as_ref()));
            assert!(!run(&bad, true).0, "k={k}");
            // unchecked: the caller vouched for the input; nothing is reported
            assert!(run(&bad, false).0, "k={k}");
            let mut z = x.clone();
            assert!(b
                .project_rows("X", z.as_mut(), None, true, Par::Seq)
                .unwrap());
            assert_eq!(z, y);
        }
    }

    /// A row above [`overflow_free_limit`] is scaled by a power of two and back: a projection
    /// that is exact unscaled stays exact (`[b, b, 0]` minus its first coordinate). A row within
    /// the limit (at it, too) is not scaled, so a subnormal entry the projection leaves alone
    /// comes back.
    fn scaling_case<T: Real>() {
        let e1 = Mat::from_fn(3, 1, |i, _| if i == 0 { 1.0 } else { 0.0 });
        let b =
            SpanBasis::from_columns("A", e1.as_ref(), None, Factorization::Svd, Par::Seq).unwrap();
        assert_eq!(b.basis()[(0, 0)].abs(), 1.0);
        let big = T::from_f64(0.9 * T::MAX.to_f64());
        // three times the smallest subnormal of the type
        let tiny = T::from_f64(if T::NAME == "float32" {
            f32::from_bits(3) as f64
        } else {
            f64::from_bits(3)
        });
        assert!(tiny.to_f64() > 0.0);
        let zero = T::from_f64(0.0);
        let x = Mat::from_fn(3, 3, |i, j| match (i, j) {
            (0, 2) => zero,
            (0, _) => big,
            (1, 0) => T::from_f64(1000.0),
            (2, 0) => overflow_free_limit::<T>(3),
            (1 | 2, 1) => tiny,
            _ => zero,
        });
        let expected = Mat::from_fn(3, 3, |i, j| match (i, j) {
            (0, 1) => big,
            (1 | 2, 1) => tiny,
            _ => zero,
        });
        assert_eq!(project(&b, x.as_ref()), expected, "{}", T::NAME);
    }

    #[test]
    fn scaling_is_exact_and_only_for_rows_beyond_the_limit() {
        scaling_case::<f32>();
        scaling_case::<f64>();
    }

    /// An overflow is reported at its row of the whole batch: in a later block, and in the
    /// second thread's share of the rows.
    #[test]
    fn an_overflow_is_placed_at_its_row_in_any_block_and_share() {
        let ones = Mat::<f64>::ones(3, 1);
        let b = SpanBasis::from_columns("A", ones.as_ref(), None, Factorization::Svd, Par::Seq)
            .unwrap();
        let n = 50_000;
        assert!(block_rows::<f64>(3, 1) < 30_000);
        let top = 0.9 * f64::MAX;
        let mut x = Mat::<f64>::zeros(n, 3);
        x.row_mut(30_000)
            .copy_from(Mat::from_fn(1, 3, |_, j| if j == 0 { top } else { -top }).row(0));
        for par in [Par::Seq, Par::rayon(2)] {
            let mut y = Mat::<f64>::zeros(n, 3);
            assert_eq!(
                b.project_out("X", y.as_mut(), x.as_ref(), par),
                Err(ProjectionError::Overflow {
                    arg: "X",
                    shape: (n, 3),
                    at: (30_000, 0),
                    dtype: "float64",
                })
            );
        }
    }
}
