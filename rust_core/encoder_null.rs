//! The encoder null-space projector of constraint C1 (PAPER_NOTES.md):
//! `P_perp = I - A (A^T A)^+ A^T`, with `A = A_S` the selected encoder columns (`d x k`, the
//! columns of sae_lens' `W_enc[:, S]`). Factor `A` once, apply `P_perp` to every row of many
//! batches: `Y = X - (X U_r) U_r^T`, so that `A^T y = 0` to round-off.

use crate::checks::{check_cols, check_finite, check_output_shape};
use crate::error::ProjectionError;
use crate::memory::prepare_threads;
use crate::scalar::Real;
use crate::span_basis::{Factorization, SpanBasis};
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{MatMut, MatRef, Par};

/// `P_perp = I - A A^+` for a fixed `A` (`d x k`), factored once (see [`SpanBasis`]).
#[derive(Debug, Clone)]
pub struct EncoderNullProjector {
    basis: SpanBasis,
}

impl EncoderNullProjector {
    /// Factors `a` (`d x k`; any `k`, including 0 and `k >= d`; duplicate, parallel or zero
    /// columns are fine) with a thin SVD in f64. Directions with singular value `<= rcond *
    /// sigma_max` are treated as absent; `rcond = None` means
    /// [`SpanBasis::default_rcond`]`(d, k)` = `max(d, k) * f64::EPSILON`.
    ///
    /// Errors: a NaN or infinity in `a`; `rcond` negative or NaN.
    pub fn from_matrix<T: Real>(
        a: MatRef<'_, T>,
        rcond: Option<f64>,
        par: Par,
    ) -> Result<Self, ProjectionError> {
        Self::from_matrix_with(a, rcond, Factorization::Svd, par)
    }

    /// [`Self::from_matrix`] with a chosen factorization.
    pub fn from_matrix_with<T: Real>(
        a: MatRef<'_, T>,
        rcond: Option<f64>,
        method: Factorization,
        par: Par,
    ) -> Result<Self, ProjectionError> {
        Ok(Self {
            basis: SpanBasis::from_columns("A", a, rcond, method, par)?,
        })
    }

    /// Length of the vectors it projects (rows of `A`).
    pub fn d(&self) -> usize {
        self.basis.nrows()
    }

    /// Number of columns of `A`.
    pub fn k(&self) -> usize {
        self.basis.ncols()
    }

    /// Numerical rank of `A` under the tolerance: the dimension that is projected out.
    pub fn rank(&self) -> usize {
        self.basis.rank()
    }

    /// The factored basis of `span(A)`.
    pub fn span_basis(&self) -> &SpanBasis {
        &self.basis
    }

    /// `dst <- x - (x U_r) U_r^T` per row; `x` is `n x d` (any `n`, any strides) and `dst`
    /// has the same shape. The arithmetic runs in `T` with the basis rounded to `T`; rows whose
    /// entries are large enough to overflow in it are scaled by a power of two first (exact).
    ///
    /// Errors: `x` without `d` columns, `dst` of another shape, a NaN or infinity in `x`, an
    /// entry of the result beyond the range of `T` ([`ProjectionError::Overflow`]), an
    /// allocation that fails. `dst` may be partly written when it errs.
    pub fn apply<T: Real>(
        &self,
        dst: MatMut<'_, T>,
        x: MatRef<'_, T>,
        par: Par,
    ) -> Result<(), ProjectionError> {
        let d = self.d();
        check_cols("X", x, d, || format!("the projector was built for d={d}"))?;
        check_output_shape(dst.shape(), x.shape())?;
        prepare_threads(par)
            .and_then(|()| self.project_checked(dst, x, par))
            .map_err(|e| self.during_apply(e, x.shape(), T::NAME))
    }

    /// The projection, with the finiteness check riding along with the copy of each block of
    /// `X` into `dst` (no extra pass over `X`); a NaN or infinity is reported before an
    /// overflow.
    fn project_checked<T: Real>(
        &self,
        dst: MatMut<'_, T>,
        x: MatRef<'_, T>,
        par: Par,
    ) -> Result<(), ProjectionError> {
        let mut dst = dst;
        match self
            .basis
            .project_rows("X", dst.rb_mut(), Some(x), true, par)
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                check_finite("X", x)?;
                self.basis.project_out("X", dst, x, par)
            }
            Err(e) => {
                check_finite("X", x)?;
                Err(e)
            }
        }
    }

    /// [`Self::apply`] in place: `x <- x - (x U_r) U_r^T` per row. Checked for NaN and
    /// infinity first; an overflow error leaves `x` partly projected.
    pub fn apply_in_place<T: Real>(
        &self,
        x: MatMut<'_, T>,
        par: Par,
    ) -> Result<(), ProjectionError> {
        let d = self.d();
        check_cols("X", x.rb(), d, || {
            format!("the projector was built for d={d}")
        })?;
        check_finite("X", x.rb())?;
        let shape = x.shape();
        prepare_threads(par)
            .and_then(|()| self.basis.project_out_in_place("X", x, par))
            .map_err(|e| self.during_apply(e, shape, T::NAME))
    }

    fn during_apply(
        &self,
        e: ProjectionError,
        shape: (usize, usize),
        dtype: &str,
    ) -> ProjectionError {
        e.during(|| {
            format!(
                "projecting X of shape ({}, {}) ({dtype}) with a basis of rank {}",
                shape.0,
                shape.1,
                self.rank()
            )
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::*;
    use faer::{Mat, MatRef};

    fn bar<T: Real>() -> f64 {
        if T::NAME == "float32" {
            1e-5
        } else {
            1e-12
        }
    }

    /// Applies the projector built from `a` (in `T`) to `x` (in `T`) and checks the ratio bar,
    /// idempotence and agreement with the Gram-Schmidt reference `q` (to `agree` times the
    /// bar, times `max |x|`: the span of an ill-conditioned `A` is itself only determined to
    /// about `eps * cond(A)`). Returns the ratio.
    fn check_case<T: Real>(
        a: &Mat<f64>,
        x: &Mat<f64>,
        q: &Mat<f64>,
        rcond: Option<f64>,
        agree: f64,
    ) -> f64 {
        let (at, xt) = (cast::<T>(a.as_ref()), cast::<T>(x.as_ref()));
        let p = EncoderNullProjector::from_matrix(at.as_ref(), rcond, Par::Seq).unwrap();
        assert_eq!(p.rank(), q.ncols(), "rank ({} x {})", a.nrows(), a.ncols());
        assert_eq!((p.d(), p.k()), a.shape());
        let mut y = Mat::<T>::zeros(x.nrows(), x.ncols());
        p.apply(y.as_mut(), xt.as_ref(), Par::Seq).unwrap();
        let ratio = orthogonality_ratio(widen(at.as_ref()).as_ref(), xt.as_ref(), y.as_ref());
        assert!(ratio <= bar::<T>(), "{}: ratio {ratio:e}", T::NAME);
        // idempotent
        let mut yy = y.clone();
        p.apply_in_place(yy.as_mut(), Par::rayon(2)).unwrap();
        let scale = x.norm_max().max(f64::MIN_POSITIVE);
        let tol = 50.0 * bar::<T>();
        assert!(max_abs_diff(yy.as_ref(), y.as_ref()) <= tol * scale);
        // agrees with the reference projector of the same span
        let reference = reference_project(q.as_ref(), widen(xt.as_ref()).as_ref());
        let diff = max_abs_diff(widen(y.as_ref()).as_ref(), reference.as_ref());
        assert!(
            diff <= agree * bar::<T>() * scale,
            "{}: differs by {diff:e}",
            T::NAME
        );
        ratio
    }

    #[test]
    fn random_full_rank() {
        let mut rng = rng(10);
        for &(d, k, n) in &[(64, 16, 33), (100, 99, 7), (8, 1, 300), (37, 5, 1)] {
            let a = gaussian(&mut rng, d, k);
            let x = gaussian(&mut rng, n, d);
            let q = gram_schmidt(a.as_ref(), 1e-10);
            check_case::<f64>(&a, &x, &q, None, 50.0);
            check_case::<f32>(&a, &x, &q, None, 50.0);
        }
    }

    #[test]
    fn rank_deficient_duplicates_and_zero_columns() {
        let mut rng = rng(11);
        let (d, r) = (48, 6);
        let b = gaussian(&mut rng, d, r);
        let c = gaussian(&mut rng, r, 20);
        let mut a = &b * &c; // rank 6, 20 columns
        for i in 0..d {
            a[(i, 3)] = a[(i, 0)]; // duplicate
            a[(i, 4)] = -2.5 * a[(i, 1)]; // parallel
            a[(i, 5)] = 0.0; // zero
        }
        let q = gram_schmidt(b.as_ref(), 1e-10);
        // x mostly inside span(A): the hardest case for cancellation
        let inside = gaussian(&mut rng, 40, r) * b.transpose();
        let x = Mat::from_fn(40, d, |i, j| 1e3 * inside[(i, j)]) + gaussian(&mut rng, 40, d);
        check_case::<f64>(&a, &x, &q, None, 50.0);
        // in f32 the product B C is not exactly rank 6; with f32 input and the default tolerance
        // every direction the f32 numbers express is kept, so give a tolerance above f32 noise.
        check_case::<f32>(&a, &x, &q, Some(1e-5), 50.0);
    }

    #[test]
    fn ill_conditioned() {
        let mut rng = rng(12);
        for cond in [1e4f64, 1e8, 1e12] {
            let s: Vec<f64> = (0..10).map(|i| cond.powf(-(i as f64) / 9.0)).collect();
            let a = with_singular_values(&mut rng, 30, &s);
            let q = gram_schmidt(a.as_ref(), 1e-14);
            assert_eq!(q.ncols(), 10);
            let x = gaussian(&mut rng, 20, 30);
            check_case::<f64>(&a, &x, &q, None, 0.05 * cond);
            // f32 rounding of A moves its small singular directions by up to eps32 * cond; the
            // ratio is measured against the f32 A that was factored, so it holds regardless.
            let a32 = cast::<f32>(a.as_ref());
            let p = EncoderNullProjector::from_matrix(a32.as_ref(), None, Par::Seq).unwrap();
            let x32 = cast::<f32>(x.as_ref());
            let mut y = Mat::<f32>::zeros(20, 30);
            p.apply(y.as_mut(), x32.as_ref(), Par::Seq).unwrap();
            let ratio = orthogonality_ratio(widen(a32.as_ref()).as_ref(), x32.as_ref(), y.as_ref());
            assert!(ratio <= 1e-5, "cond {cond:e}: ratio {ratio:e}");
        }
    }

    #[test]
    fn tiny_and_huge_scales() {
        let mut rng = rng(13);
        let a0 = gaussian(&mut rng, 24, 7);
        let x0 = gaussian(&mut rng, 9, 24);
        let q = gram_schmidt(a0.as_ref(), 1e-10);
        for (sa, sx) in [
            (1e-30, 1.0),
            (1e30, 1.0),
            (1.0, 1e-25),
            (1.0, 1e25),
            (1e-20, 1e20),
        ] {
            let a = Mat::from_fn(24, 7, |i, j| a0[(i, j)] * sa);
            let x = Mat::from_fn(9, 24, |i, j| x0[(i, j)] * sx);
            check_case::<f64>(&a, &x, &q, None, 50.0);
            check_case::<f32>(&a, &x, &q, None, 50.0);
        }
        for (sa, sx) in [(1e-250, 1e150), (1e250, 1e-150)] {
            let a = Mat::from_fn(24, 7, |i, j| a0[(i, j)] * sa);
            let x = Mat::from_fn(9, 24, |i, j| x0[(i, j)] * sx);
            let p = EncoderNullProjector::from_matrix(a.as_ref(), None, Par::Seq).unwrap();
            let mut y = Mat::<f64>::zeros(9, 24);
            p.apply(y.as_mut(), x.as_ref(), Par::Seq).unwrap();
            let expected = reference_project(q.as_ref(), x0.as_ref());
            let y_unit = Mat::from_fn(9, 24, |i, j| y[(i, j)] / sx);
            assert!(max_abs_diff(y_unit.as_ref(), expected.as_ref()) < 1e-12);
        }
    }

    #[test]
    fn k_zero_is_identity_and_full_rank_is_zero() {
        let mut rng = rng(14);
        let x = gaussian(&mut rng, 5, 12);
        let p =
            EncoderNullProjector::from_matrix(Mat::<f64>::zeros(12, 0).as_ref(), None, Par::Seq)
                .unwrap();
        assert_eq!((p.d(), p.k(), p.rank()), (12, 0, 0));
        let mut y = Mat::<f64>::zeros(5, 12);
        p.apply(y.as_mut(), x.as_ref(), Par::Seq).unwrap();
        assert_eq!(y, x);

        let a = gaussian(&mut rng, 12, 30); // k >= d
        let p = EncoderNullProjector::from_matrix(a.as_ref(), None, Par::Seq).unwrap();
        assert_eq!(p.rank(), 12);
        p.apply(y.as_mut(), x.as_ref(), Par::Seq).unwrap();
        assert_eq!(y, Mat::<f64>::zeros(5, 12));
    }

    #[test]
    fn empty_batch_and_strided_views() {
        let mut rng = rng(15);
        let a = gaussian(&mut rng, 16, 3);
        let p = EncoderNullProjector::from_matrix(a.as_ref(), None, Par::Seq).unwrap();
        let empty = Mat::<f32>::zeros(0, 16);
        let mut out = Mat::<f32>::zeros(0, 16);
        p.apply(out.as_mut(), empty.as_ref(), Par::Seq).unwrap();

        // x given as the transpose of a column-major matrix (row-major rows), with reversed rows
        let xt = gaussian(&mut rng, 16, 11);
        let x = xt.as_ref().transpose().reverse_rows();
        let mut y = Mat::<f64>::zeros(11, 16);
        p.apply(y.as_mut(), x, Par::Seq).unwrap();
        let expected = reference_project(
            gram_schmidt(a.as_ref(), 1e-10).as_ref(),
            x.to_owned().as_ref(),
        );
        assert!(max_abs_diff(y.as_ref(), expected.as_ref()) < 1e-13);
        // and written into a transposed destination
        let mut yt = Mat::<f64>::zeros(16, 11);
        p.apply(yt.as_mut().transpose_mut(), x, Par::Seq).unwrap();
        assert!(max_abs_diff(yt.as_ref().transpose(), expected.as_ref()) < 1e-13);
    }

    #[test]
    fn large_batches_span_several_blocks() {
        let mut rng = rng(16);
        let a = gaussian(&mut rng, 32, 20);
        let x = gaussian(&mut rng, 70_000, 32);
        let p = EncoderNullProjector::from_matrix(a.as_ref(), None, Par::rayon(0)).unwrap();
        let mut y = Mat::<f64>::zeros(70_000, 32);
        p.apply(y.as_mut(), x.as_ref(), Par::rayon(0)).unwrap();
        assert!(orthogonality_ratio(a.as_ref(), x.as_ref(), y.as_ref()) < 1e-13);
    }

    #[test]
    fn non_finite_rows_are_found_in_any_block() {
        // the check rides along with the blocked copy: every block, every thread, every rank
        let mut rng = rng(17);
        let (d, n) = (48, 5000);
        for k in [0, 5, 48] {
            let a = gaussian(&mut rng, d, k);
            let p = EncoderNullProjector::from_matrix(a.as_ref(), None, Par::Seq).unwrap();
            for &(i, j, bad) in &[
                (0, 0, f32::NAN),
                (4999, 47, f32::INFINITY),
                (2600, 7, f32::NEG_INFINITY),
            ] {
                let mut x = cast::<f32>(gaussian(&mut rng, n, d).as_ref());
                x[(i, j)] = bad;
                if i + 1 < n {
                    x[(i + 1, j)] = f32::NAN; // a later one is not the one reported
                }
                for par in [Par::Seq, Par::rayon(2)] {
                    let mut y = Mat::<f32>::zeros(n, d);
                    let msg = p
                        .apply(y.as_mut(), x.as_ref(), par)
                        .unwrap_err()
                        .to_string();
                    assert!(
                        msg.contains(&format!(
                            "X contains a non-finite value ({bad}) at [{i}, {j}]"
                        )),
                        "k={k}: {msg}"
                    );
                }
            }
        }
    }

    /// `[[b, b, b], [b, -b, 0], [b, b, b/2], [1, 2, 3]]` with `b` = 0.9 times the largest
    /// value: the products overflow unless the rows are scaled (`x . u` = 1.73 b and 1.44 b for
    /// `u = (1, 1, 1) / sqrt(3)`), the projections fit. With it, the exact projections.
    pub(crate) fn huge_rows<T: Real>() -> (Mat<T>, Mat<f64>) {
        let b = 0.9 * T::MAX.to_f64();
        let rows = [[b, b, b], [b, -b, 0.0], [b, b, b / 2.0], [1.0, 2.0, 3.0]];
        let x = Mat::from_fn(4, 3, |i, j| T::from_f64(rows[i][j]));
        let exact = Mat::from_fn(4, 3, |i, j| {
            let s = if i < 3 { b } else { 1.0 };
            let row: Vec<f64> = (0..3).map(|l| x[(i, l)].to_f64() / s).collect();
            (row[j] - row.iter().sum::<f64>() / 3.0) * s
        });
        (x, exact)
    }

    /// `max |y - exact|` relative to each row's largest entry of `x`.
    pub(crate) fn row_relative_error<T: Real>(
        x: &Mat<T>,
        y: MatRef<'_, T>,
        exact: &Mat<f64>,
    ) -> f64 {
        let mut worst: f64 = 0.0;
        for i in 0..x.nrows() {
            let top = (0..x.ncols()).fold(0.0f64, |m, j| m.max(x[(i, j)].to_f64().abs()));
            for j in 0..x.ncols() {
                worst = worst.max((y[(i, j)].to_f64() - exact[(i, j)]).abs() / top);
            }
        }
        worst
    }

    fn huge_rows_case<T: Real>() {
        let p = EncoderNullProjector::from_matrix(Mat::<f64>::ones(3, 1).as_ref(), None, Par::Seq)
            .unwrap();
        let (x, exact) = huge_rows::<T>();
        let mut y = Mat::<T>::zeros(4, 3);
        p.apply(y.as_mut(), x.as_ref(), Par::Seq).unwrap();
        assert!(row_relative_error(&x, y.as_ref(), &exact) < 10.0 * bar::<T>());
        let mut z = x.clone();
        p.apply_in_place(z.as_mut(), Par::Seq).unwrap();
        assert_eq!(z, y);
        // [b, -b, -b] projects to [4b/3, -2b/3, -2b/3]: beyond the range
        let b = T::from_f64(0.9 * T::MAX.to_f64());
        let mut bad = x.clone();
        bad.row_mut(1)
            .copy_from(Mat::from_fn(1, 3, |_, j| if j == 0 { b } else { -b }).row(0));
        let expected = ProjectionError::Overflow {
            arg: "X",
            shape: (4, 3),
            at: (1, 0),
            dtype: T::NAME,
        };
        assert_eq!(
            p.apply(y.as_mut(), bad.as_ref(), Par::Seq),
            Err(expected.clone())
        );
        assert_eq!(
            p.apply_in_place(bad.as_mut(), Par::Seq),
            Err(expected.clone())
        );
        let msg = expected.to_string();
        assert!(
            msg.starts_with(&format!(
                "the projection of X overflows {0} at [1, 0]: the exact result exceeds the largest {0}",
                T::NAME
            )) && msg.ends_with("X has shape (4, 3) (scale X down)"),
            "{msg}"
        );
    }

    #[test]
    fn huge_rows_are_scaled_and_a_result_out_of_range_is_an_error() {
        huge_rows_case::<f32>();
        huge_rows_case::<f64>();
    }

    #[test]
    fn errors_name_the_argument_and_shape() {
        let a = Mat::<f64>::from_fn(8, 2, |i, j| (i + j) as f64);
        let p = EncoderNullProjector::from_matrix(a.as_ref(), None, Par::Seq).unwrap();
        let x = Mat::<f64>::zeros(3, 7);
        let mut y = Mat::<f64>::zeros(3, 7);
        let msg = p
            .apply(y.as_mut(), x.as_ref(), Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("X has shape (3, 7)") && msg.contains("built for d=8"),
            "{msg}"
        );

        let x = Mat::<f64>::zeros(3, 8);
        let msg = p
            .apply(y.as_mut(), x.as_ref(), Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dst has shape (3, 7)"), "{msg}");

        let mut x = Mat::<f32>::zeros(3, 8);
        x[(2, 5)] = f32::NEG_INFINITY;
        let mut y = Mat::<f32>::zeros(3, 8);
        let msg = p
            .apply(y.as_mut(), x.as_ref(), Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("X contains a non-finite value (-inf) at [2, 5]"),
            "{msg}"
        );

        let mut bad = a.clone();
        bad[(1, 1)] = f64::NAN;
        let msg = EncoderNullProjector::from_matrix(bad.as_ref(), None, Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("A contains a non-finite value (NaN) at [1, 1]"),
            "{msg}"
        );
        for rcond in [-1.0, f64::NAN] {
            let err = EncoderNullProjector::from_matrix(a.as_ref(), Some(rcond), Par::Seq);
            assert!(matches!(err, Err(ProjectionError::InvalidRcond { .. })));
        }
    }
}

#[cfg(test)]
mod measure {
    //! `cargo test --release -- --ignored --nocapture measure`: the worst ratios on
    //! adversarial inputs at model sizes, as quoted in docs/linalg.md.
    use super::*;
    use crate::testing::*;
    use faer::Mat;

    fn worst<T: Real>(a: &Mat<f64>, x: &Mat<f64>) -> f64 {
        let (at, xt) = (cast::<T>(a.as_ref()), cast::<T>(x.as_ref()));
        let p = EncoderNullProjector::from_matrix(at.as_ref(), None, Par::rayon(0)).unwrap();
        let mut y = Mat::<T>::zeros(x.nrows(), x.ncols());
        p.apply(y.as_mut(), xt.as_ref(), Par::rayon(0)).unwrap();
        orthogonality_ratio(widen(at.as_ref()).as_ref(), xt.as_ref(), y.as_ref())
    }

    #[test]
    #[ignore]
    fn measure_worst_ratios() {
        let mut rng = rng(99);
        let d = 2304;
        for k in [16, 256, 1024] {
            let a = gaussian(&mut rng, d, k);
            let s: Vec<f64> = (0..k)
                .map(|i| 1e10f64.powf(-(i as f64) / (k - 1) as f64))
                .collect();
            let ill = with_singular_values(&mut rng, d, &s);
            let mut dup = a.clone();
            for j in (1..k).step_by(2) {
                for i in 0..d {
                    dup[(i, j)] = dup[(i, j - 1)] * 3.0;
                }
            }
            // x mostly inside span(A), plus a little noise: maximal cancellation
            let inside = gaussian(&mut rng, 256, k) * a.transpose();
            let x_in = inside + Mat::from_fn(256, d, |_, _| 1e-6);
            let x = gaussian(&mut rng, 256, d);
            for (name, a, x) in [
                ("random", &a, &x),
                ("inside-span", &a, &x_in),
                ("cond 1e10", &ill, &x),
                ("duplicates", &dup, &x),
            ] {
                println!(
                    "d={d} k={k:5} {name:12}  f64 {:9.2e}  f32 {:9.2e}",
                    worst::<f64>(a, x),
                    worst::<f32>(a, x)
                );
            }
        }
    }
}
