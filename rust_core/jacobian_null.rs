//! The Jacobian null-space projection of the cross-layer mode (PAPER_NOTES.md: `J_t =
//! dPhi/d delta`): `g <- g - J^T (J J^T)^+ J g` for every row `g` of a batch `G`.
//!
//! Computed without the Gram matrix `J J^T` (which squares the condition number): a thin SVD of
//! `J^T` (`n x m`, in f64) gives an orthonormal basis `U_r` of the row space of `J`, and
//! `G - (G U_r) U_r^T` is subtracted. With pseudo-inverse semantics, rows of `J` that are
//! (numerically) dependent are fine; the tolerance is relative to the largest singular value.

use crate::checks::{check_cols, check_finite, check_output_shape, check_rcond};
use crate::error::ProjectionError;
use crate::scalar::Real;
use crate::span_basis::{Factorization, SpanBasis};
use faer::reborrow::Reborrow;
use faer::{MatMut, MatRef, Par};

/// `dst <- G - (J^T (J J^T)^+ J G^T)^T`, i.e. each row of `g` with the row space of `j`
/// removed. `j` is `m x n` (`m = 0` returns `g`), `g` is `b x n` (any `b`), `dst` is `b x n`;
/// any strides. `J` is factored in f64 whatever `TJ` is; the batch is processed in `T`.
/// Singular values of `J` `<= rcond * sigma_max` are treated as zero; `rcond = None` means
/// `max(m, n) * f64::EPSILON`. Returns the numerical rank of `j`.
///
/// Errors: `g` without `n` columns, `dst` of another shape, NaN or infinity in `j` or `g`,
/// `rcond` negative or NaN.
pub fn jacobian_null_project<TJ: Real, T: Real>(
    dst: MatMut<'_, T>,
    j: MatRef<'_, TJ>,
    g: MatRef<'_, T>,
    rcond: Option<f64>,
    par: Par,
) -> Result<usize, ProjectionError> {
    let basis = checked_row_space(j, g, rcond, par)?;
    check_output_shape(dst.shape(), g.shape())?;
    basis.project_out(dst, g, par);
    Ok(basis.rank())
}

/// [`jacobian_null_project`] in place: `g <- g - (J^T (J J^T)^+ J g^T)^T`.
pub fn jacobian_null_project_in_place<TJ: Real, T: Real>(
    g: MatMut<'_, T>,
    j: MatRef<'_, TJ>,
    rcond: Option<f64>,
    par: Par,
) -> Result<usize, ProjectionError> {
    let basis = checked_row_space(j, g.rb(), rcond, par)?;
    basis.project_out_in_place(g, par);
    Ok(basis.rank())
}

fn checked_row_space<TJ: Real, T: Real>(
    j: MatRef<'_, TJ>,
    g: MatRef<'_, T>,
    rcond: Option<f64>,
    par: Par,
) -> Result<SpanBasis, ProjectionError> {
    check_rcond(rcond)?;
    let (m, n) = j.shape();
    check_cols("G", g, n, || format!("J has shape ({m}, {n})"))?;
    check_finite("J", j)?;
    check_finite("G", g)?;
    SpanBasis::factor("J", j.transpose(), rcond, Factorization::Svd, par)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use faer::Mat;

    fn run<TJ: Real, T: Real>(
        j: &Mat<f64>,
        g: &Mat<f64>,
        rcond: Option<f64>,
    ) -> (Mat<T>, usize, f64) {
        let (jt, gt) = (cast::<TJ>(j.as_ref()), cast::<T>(g.as_ref()));
        let mut y = Mat::<T>::zeros(g.nrows(), g.ncols());
        let rank =
            jacobian_null_project(y.as_mut(), jt.as_ref(), gt.as_ref(), rcond, Par::Seq).unwrap();
        let ratio = orthogonality_ratio(widen(jt.as_ref()).transpose(), gt.as_ref(), y.as_ref());
        (y, rank, ratio)
    }

    #[test]
    fn random_and_rank_deficient() {
        let mut rng = rng(20);
        for &(m, n, b) in &[(5, 40, 9), (40, 40, 3), (60, 20, 4), (1, 7, 1)] {
            let j = gaussian(&mut rng, m, n);
            let g = gaussian(&mut rng, b, n);
            let q = gram_schmidt(j.transpose().to_owned().as_ref(), 1e-10);
            let (y, rank, ratio) = run::<f64, f64>(&j, &g, None);
            assert_eq!(rank, m.min(n));
            assert!(ratio < 1e-12, "{ratio:e}");
            let reference = reference_project(q.as_ref(), g.as_ref());
            assert!(max_abs_diff(y.as_ref(), reference.as_ref()) < 1e-12);
            let (_, _, ratio) = run::<f32, f32>(&j, &g, None);
            assert!(ratio < 1e-5, "{ratio:e}");
            let (_, _, ratio) = run::<f32, f64>(&j, &g, None);
            assert!(ratio < 1e-12, "{ratio:e}");
        }
        // dependent rows: J = C B with B (3 x n)
        let b = gaussian(&mut rng, 3, 30);
        let j = gaussian(&mut rng, 8, 3) * &b;
        let g = gaussian(&mut rng, 6, 30);
        let (y, rank, ratio) = run::<f64, f64>(&j, &g, None);
        assert_eq!(rank, 3);
        assert!(ratio < 1e-12);
        let q = gram_schmidt(b.transpose().to_owned().as_ref(), 1e-10);
        assert!(
            max_abs_diff(
                y.as_ref(),
                reference_project(q.as_ref(), g.as_ref()).as_ref()
            ) < 1e-12
        );
    }

    #[test]
    fn ill_conditioned_jacobian() {
        let mut rng = rng(21);
        for cond in [1e6f64, 1e8, 1e10] {
            let s: Vec<f64> = (0..12).map(|i| cond.powf(-(i as f64) / 11.0)).collect();
            let j = with_singular_values(&mut rng, 50, &s)
                .transpose()
                .to_owned(); // 12 x 50
            let g = gaussian(&mut rng, 10, 50);
            let (y, rank, ratio) = run::<f64, f64>(&j, &g, None);
            assert_eq!(rank, 12);
            assert!(ratio < 1e-12, "cond {cond:e}: {ratio:e}");
            // every direction of the row space is removed, the weakest included
            let q = gram_schmidt(j.transpose().to_owned().as_ref(), 1e-14);
            let diff = max_abs_diff(
                y.as_ref(),
                reference_project(q.as_ref(), g.as_ref()).as_ref(),
            );
            assert!(
                diff < 10.0 * cond * f64::EPSILON,
                "cond {cond:e}: differs by {diff:e}"
            );
            let (_, _, ratio) = run::<f32, f32>(&j, &g, None);
            assert!(ratio < 1e-5, "cond {cond:e}: {ratio:e}");
        }
    }

    #[test]
    fn gram_route_would_fail_where_this_succeeds() {
        // Solving (J J^T) c = J g through the Gram matrix loses cond(J)^2 * eps; the basis
        // route does not. Documented in docs/linalg.md; here for the record.
        let mut rng = rng(22);
        let s: Vec<f64> = (0..6).map(|i| 1e8f64.powf(-(i as f64) / 5.0)).collect();
        let j = with_singular_values(&mut rng, 30, &s)
            .transpose()
            .to_owned();
        let g = gaussian(&mut rng, 1, 30);
        let (_, _, ratio) = run::<f64, f64>(&j, &g, None);
        let gram = &j * j.transpose();
        let rhs = &j * g.transpose();
        let c = faer::linalg::solvers::Solve::solve(&gram.partial_piv_lu(), &rhs);
        let y_gram = &g - (j.transpose() * c).transpose();
        let gram_ratio = orthogonality_ratio(j.transpose(), g.as_ref(), y_gram.as_ref());
        assert!(
            ratio < 1e-14 && gram_ratio > 1e3 * ratio,
            "{ratio:e} vs gram {gram_ratio:e}"
        );
    }

    #[test]
    fn empty_cases() {
        let mut rng = rng(23);
        let g = gaussian(&mut rng, 4, 9);
        let (y, rank, _) = run::<f64, f64>(&Mat::zeros(0, 9), &g, None);
        assert_eq!((rank, y), (0, g.clone()));
        let (y, rank, _) = run::<f64, f64>(&gaussian(&mut rng, 3, 9), &Mat::zeros(0, 9), None);
        assert_eq!((rank, y.shape()), (3, (0, 9)));
        let (y, rank, _) = run::<f32, f32>(&Mat::zeros(3, 0), &Mat::zeros(2, 0), None);
        assert_eq!((rank, y.shape()), (0, (2, 0)));
        let mut h = g.clone();
        let j = gaussian(&mut rng, 9, 9);
        assert_eq!(
            jacobian_null_project_in_place(h.as_mut(), j.as_ref(), None, Par::Seq),
            Ok(9)
        );
        assert_eq!(h, Mat::<f64>::zeros(4, 9));
    }

    #[test]
    fn errors() {
        let j = Mat::<f64>::zeros(3, 10);
        let g = Mat::<f32>::zeros(2, 9);
        let mut y = Mat::<f32>::zeros(2, 9);
        let msg = jacobian_null_project(y.as_mut(), j.as_ref(), g.as_ref(), None, Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("G has shape (2, 9)") && msg.contains("J has shape (3, 10)"),
            "{msg}"
        );
        let mut j = Mat::<f32>::zeros(3, 9);
        j[(2, 8)] = f32::NAN;
        let msg = jacobian_null_project(y.as_mut(), j.as_ref(), g.as_ref(), None, Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("J contains a non-finite value (NaN) at [2, 8]"),
            "{msg}"
        );
        let j = Mat::<f32>::zeros(3, 9);
        let mut g = g;
        g[(1, 0)] = f32::INFINITY;
        let msg = jacobian_null_project(y.as_mut(), j.as_ref(), g.as_ref(), None, Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("G contains a non-finite value (inf) at [1, 0]"),
            "{msg}"
        );
        let g = Mat::<f32>::zeros(2, 9);
        let err = jacobian_null_project(y.as_mut(), j.as_ref(), g.as_ref(), Some(-0.5), Par::Seq);
        assert_eq!(err, Err(ProjectionError::InvalidRcond { value: -0.5 }));
    }
}
