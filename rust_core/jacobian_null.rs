//! The Jacobian null-space projection of the cross-layer mode (PAPER_NOTES.md: `J_t =
//! dPhi/d delta`): `g <- g - J^T (J J^T)^+ J g` for every row `g` of a batch `G`.
//!
//! Two routes (docs/linalg.md, "Jacobian: the Gram route when it is accurate, else the SVD"):
//!
//! - **Gram** (fast): one pass over `J` forms `M = J J^T` and `C = J G^T` in f64; `W = M^+ C`
//!   by Cholesky (when the spectrum is certainly fine) or by the self-adjoint eigendecomposition
//!   `M = V L V^T`, `W = V_r L_r^-1 V_r^T C`; a second pass writes `Y = G - W^T J` (f64
//!   arithmetic, rounded once to `G`'s type). No `n x m` basis and no copy of `J` are made; the
//!   cost is about `m^2 n` flops plus an `m x m` factorization.
//! - **SVD** (robust): a thin SVD of `J^T` (`n x m`, f64) gives an orthonormal basis `U_r` of the
//!   row space, and `G - (G U_r) U_r^T` is subtracted (see [`SpanBasis`]).
//!
//! The Gram route squares the condition number: its error in `||J y|| / (||J||_2 ||g||)` grows
//! like `eps * cond(J)` and its eigenvalues carry an absolute error of about `eps * ||J||^2`,
//! so it cannot tell a singular value below `~1e-7 sigma_max` from round-off. [`JacobianRoute::
//! Auto`] therefore takes the Gram route only when the kept eigenvalues show `cond(J) <=`
//! [`gram_max_cond`] for the output type and no eigenvalue sits near the rank threshold `rcond^2
//! lambda_max` (the SVD's rule `sigma_i > rcond sigma_max`, squared); otherwise the SVD route.

use crate::checks::{
    all_finite, check_cols, check_finite, check_output_shape, check_rcond, max_abs_finite,
};
use crate::error::ProjectionError;
use crate::memory::{prepare_threads, try_mat, try_resize, try_scratch, try_zeros};
use crate::scalar::Real;
use crate::span_basis::{Factorization, SpanBasis};
use faer::diag::Diag;
use faer::dyn_stack::MemStack;
use faer::linalg::cholesky::llt::factor::{
    cholesky_in_place, cholesky_in_place_scratch, LltRegularization,
};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::reborrow::{IntoConst, Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

/// How [`jacobian_null_project_with`] computes the projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JacobianRoute {
    /// The Gram route when its eigenvalues show it is accurate (see the module docs), else the
    /// SVD route. The default.
    #[default]
    Auto,
    /// Always the Gram route: eigenvalues `> max(rcond^2, GRAM_NOISE) * lambda_max` are inverted,
    /// whatever the conditioning (for comparison and tests). Falls back to the SVD route only
    /// when a float64 `J` has entries beyond `~1e+-120` (the Gram matrix could over- or
    /// underflow) or an intermediate overflows.
    Gram,
    /// Always the thin SVD of `J^T`.
    Svd,
}

/// What a Jacobian projection did: the numerical rank of `J` and the route that ran
/// ([`JacobianRoute::Gram`] or [`JacobianRoute::Svd`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JacobianInfo {
    /// Number of directions removed.
    pub rank: usize,
    /// The route that computed the result.
    pub route: JacobianRoute,
}

/// Relative absolute error, in units of `lambda_max`, that the computed eigenvalues of the Gram
/// matrix are trusted to: eigenvalues within this of the rank threshold are ambiguous.
/// Round-off puts the null eigenvalues of an exactly rank-deficient `J` at `~1e-16..1e-14`
/// (measured up to `m = 2048`, `n = 65536`, docs/linalg.md); this is 100x above that.
pub const GRAM_NOISE: f64 = 1e-12;

/// The largest `cond(J)` (over the kept directions) for which [`JacobianRoute::Auto`] uses the
/// Gram route when the output has type `T`. The Gram route's ratio `||J y|| / (||J||_2 ||g||)`
/// is about `eps64 * cond(J)` in the worst case (`g` along the weakest direction), measured in
/// docs/linalg.md: float64 needs `<= 1e-12`, so `cond <= 1e3`; float32 needs `<= 1e-5` and
/// the limit is where the Gram matrix itself gets close to singular, `cond <= 1e6`.
pub fn gram_max_cond<T: Real>() -> f64 {
    if T::NAME == "float64" {
        1e3
    } else {
        1e6
    }
}

/// `dst <- G - (J^T (J J^T)^+ J G^T)^T`, i.e. each row of `g` with the row space of `j`
/// removed. `j` is `m x n` (`m = 0` returns `g`), `g` is `b x n` (any `b`), `dst` is `b x n`;
/// any strides. `J` is factored in f64 whatever `TJ` is, and the update is accumulated in f64
/// and rounded once to `T`. Singular values of `J` `<= rcond * sigma_max` are treated as zero;
/// `rcond = None` means `max(m, n) * f64::EPSILON`. Returns the numerical rank of `j`. The
/// route is [`JacobianRoute::Auto`].
///
/// Errors: `g` without `n` columns, `dst` of another shape, NaN or infinity in `j` or `g`,
/// `rcond` negative or NaN, an entry of the result beyond the range of `T`
/// ([`ProjectionError::Overflow`]; `dst`, or an in-place `g`, is then partly written), an
/// allocation that fails.
pub fn jacobian_null_project<TJ: Real, T: Real>(
    dst: MatMut<'_, T>,
    j: MatRef<'_, TJ>,
    g: MatRef<'_, T>,
    rcond: Option<f64>,
    par: Par,
) -> Result<usize, ProjectionError> {
    jacobian_null_project_with(dst, j, g, rcond, JacobianRoute::Auto, par).map(|info| info.rank)
}

/// [`jacobian_null_project`] with a chosen route; also says which route ran.
pub fn jacobian_null_project_with<TJ: Real, T: Real>(
    dst: MatMut<'_, T>,
    j: MatRef<'_, TJ>,
    g: MatRef<'_, T>,
    rcond: Option<f64>,
    route: JacobianRoute,
    par: Par,
) -> Result<JacobianInfo, ProjectionError> {
    check_rcond(rcond)?;
    let (m, n) = j.shape();
    check_cols("G", g, n, || format!("J has shape ({m}, {n})"))?;
    check_output_shape(dst.shape(), g.shape())?;
    project(Batch::Separate { dst, g }, j, rcond, route, par)
}

/// [`jacobian_null_project`] in place: `g <- g - (J^T (J J^T)^+ J g^T)^T`.
pub fn jacobian_null_project_in_place<TJ: Real, T: Real>(
    g: MatMut<'_, T>,
    j: MatRef<'_, TJ>,
    rcond: Option<f64>,
    par: Par,
) -> Result<usize, ProjectionError> {
    jacobian_null_project_in_place_with(g, j, rcond, JacobianRoute::Auto, par).map(|i| i.rank)
}

/// [`jacobian_null_project_in_place`] with a chosen route; also says which route ran.
pub fn jacobian_null_project_in_place_with<TJ: Real, T: Real>(
    g: MatMut<'_, T>,
    j: MatRef<'_, TJ>,
    rcond: Option<f64>,
    route: JacobianRoute,
    par: Par,
) -> Result<JacobianInfo, ProjectionError> {
    check_rcond(rcond)?;
    let (m, n) = j.shape();
    check_cols("G", g.rb(), n, || format!("J has shape ({m}, {n})"))?;
    project(Batch::InPlace(g), j, rcond, route, par)
}

/// The batch: read from `g` and written to `dst`, or updated in place.
enum Batch<'a, T> {
    Separate {
        dst: MatMut<'a, T>,
        g: MatRef<'a, T>,
    },
    InPlace(MatMut<'a, T>),
}

impl<T: Real> Batch<'_, T> {
    fn g(&self) -> MatRef<'_, T> {
        match self {
            Self::Separate { g, .. } => *g,
            Self::InPlace(g) => g.rb(),
        }
    }

    /// `dst <- g`, for results that leave the batch unchanged.
    fn copy_through(self) {
        if let Self::Separate { mut dst, g } = self {
            dst.copy_from(g);
        }
    }
}

fn project<TJ: Real, T: Real>(
    batch: Batch<'_, T>,
    j: MatRef<'_, TJ>,
    rcond: Option<f64>,
    route: JacobianRoute,
    par: Par,
) -> Result<JacobianInfo, ProjectionError> {
    let (m, n) = j.shape();
    let b = batch.g().nrows();
    let call = || {
        format!(
            "projecting G of shape ({b}, {n}) ({}) off the row space of J of shape ({m}, {n}) ({})",
            T::NAME,
            TJ::NAME
        )
    };
    let rcond = rcond.unwrap_or_else(|| SpanBasis::default_rcond(n, m));
    let routed = |()| {
        if route == JacobianRoute::Svd || m == 0 || n == 0 {
            return svd_route(batch, j, rcond, par);
        }
        match gram_route(batch, j, rcond, route == JacobianRoute::Gram, par)? {
            GramOutcome::Done(rank) => Ok(JacobianInfo {
                rank,
                route: JacobianRoute::Gram,
            }),
            GramOutcome::Declined(batch) => svd_route(batch, j, rcond, par),
        }
    };
    prepare_threads(par)
        .and_then(routed)
        .map_err(|e| e.during(call))
}

fn svd_route<TJ: Real, T: Real>(
    batch: Batch<'_, T>,
    j: MatRef<'_, TJ>,
    rcond: f64,
    par: Par,
) -> Result<JacobianInfo, ProjectionError> {
    check_finite("J", j)?;
    check_finite("G", batch.g())?;
    // faer's SVD loses time to threads when the smaller side is small (see `factor_par`)
    let factor = if crate::factor_on_one_thread(j.nrows(), j.ncols()) {
        Par::Seq
    } else {
        par
    };
    let basis = SpanBasis::factor("J", j.transpose(), Some(rcond), Factorization::Svd, factor)?;
    match batch {
        Batch::Separate { dst, g } => basis.project_out("G", dst, g, par)?,
        Batch::InPlace(g) => basis.project_out_in_place("G", g, par)?,
    }
    Ok(JacobianInfo {
        rank: basis.rank(),
        route: JacobianRoute::Svd,
    })
}

enum GramOutcome<'a, T> {
    Done(usize),
    /// The Gram route does not apply (accuracy, scale); the batch is untouched.
    Declined(Batch<'a, T>),
}

/// Bounds on `max_i ||J_i||^2` for the Gram route: outside them a float64 `J` has entries
/// beyond `~1e+-120`, products could over- or underflow, and the SVD route (which rescales)
/// takes over. A float32 `J` is always inside.
const GRAM_DIAG_MIN: f64 = 1e-240;
const GRAM_DIAG_MAX: f64 = 1e240;

/// Whether every row of `g` has its largest entry in `[1e-150, 1e150]` (or is zero), so that
/// with `J` inside the bounds above (`|J| ~ a` within `1e+-120`) neither `J G^T ~ a g` nor `W
/// ~ g / a` leaves the normal float64 range (a row of 1e-275 lost every digit in `J G^T`).
/// Only a float64 `G` can be outside; its batches then take the SVD route, which keeps every
/// row's scale. One pass over a float64 `G`.
fn rows_in_gram_range<T: Real>(g: MatRef<'_, T>) -> bool {
    T::NAME != "float64"
        || (0..g.nrows()).all(|i| match max_abs_finite(g.subrows(i, 1)) {
            Some(top) => top == T::from_f64(0.0) || (1e-150..=1e150).contains(&top.to_f64()),
            None => true, // NaN / inf: reported by the Gram pass
        })
}

fn gram_route<'a, TJ: Real, T: Real>(
    batch: Batch<'a, T>,
    j: MatRef<'_, TJ>,
    rcond: f64,
    forced: bool,
    par: Par,
) -> Result<GramOutcome<'a, T>, ProjectionError> {
    let m = j.nrows();
    if !rows_in_gram_range(batch.g()) {
        return Ok(GramOutcome::Declined(batch));
    }
    let chunks = column_chunks(j.ncols(), par);
    let (gram, c) = gram_pass(j, batch.g(), &chunks)?;

    // NaN / inf in J reach the diagonal of J J^T, in G every entry of its column of J G^T:
    // IEEE arithmetic cannot cancel them. A non-finite value with finite inputs is overflow.
    let diag: Vec<f64> = (0..m).map(|i| gram[(i, i)]).collect();
    let diag_finite = diag.iter().all(|d| d.is_finite());
    if !diag_finite {
        check_finite("J", j)?;
    }
    let c_finite = (0..c.ncols()).all(|k| c.col(k).iter().all(|x| x.is_finite()));
    if !c_finite {
        check_finite("J", j)?;
        check_finite("G", batch.g())?;
    }
    let largest = diag.iter().copied().fold(0.0, f64::max);
    if largest == 0.0 && j.norm_max().to_f64() == 0.0 {
        batch.copy_through();
        return Ok(GramOutcome::Done(0));
    }
    if !(diag_finite && c_finite && (GRAM_DIAG_MIN..=GRAM_DIAG_MAX).contains(&largest)) {
        return Ok(GramOutcome::Declined(batch));
    }

    // Exactly zero rows add nothing to the row space; leaving them out keeps their exact zero
    // eigenvalues from turning into round-off that would look ambiguous.
    let live: Vec<usize> = (0..m).filter(|&i| diag[i] > 0.0).collect();
    let ml = live.len();
    // scaled by a power of two (exact) to a largest diagonal entry in [1, 2): faer's
    // eigensolver is not scale-invariant for entries far from 1 (a Gram matrix of a 1e-30 J
    // lost all accuracy at m = 256)
    let unscale = 2f64.powi(largest.log2().floor() as i32);
    let gram_live = try_mat("the scaled Gram matrix", ml, ml, |a, b| {
        let (i, k) = (live[a.max(b)], live[a.min(b)]);
        gram[(i, k)] / unscale
    })?;
    drop(gram);
    let b = c.ncols();
    let c_live = try_mat("J G^T without the zero rows of J", ml, b, |i, k| {
        c[(live[i], k)]
    })?;
    let limits = Limits {
        threshold: rcond * rcond,
        floor: if forced {
            0.0
        } else {
            gram_max_cond::<T>().powi(-2)
        },
    };
    let solved = match cholesky_coeffs(gram_live.as_ref(), c_live.as_ref(), limits, par)? {
        Cholesky::Solved(w) => Some((w, ml)),
        Cholesky::Declines => None,
        Cholesky::Undecided => {
            eigen_coeffs(gram_live.as_ref(), c_live.as_ref(), limits, forced, par)?
        }
    };
    let Some((w_live, rank)) = solved else {
        return Ok(GramOutcome::Declined(batch));
    };
    if rank == 0 {
        batch.copy_through();
        return Ok(GramOutcome::Done(0));
    }
    if rank == j.ncols() {
        // the row space is everything: the projection is exactly zero
        match batch {
            Batch::Separate { mut dst, .. } => dst.fill(T::from_f64(0.0)),
            Batch::InPlace(mut g) => g.fill(T::from_f64(0.0)),
        }
        return Ok(GramOutcome::Done(rank));
    }
    // W = (J J^T)^+ J G^T (m x b), zero on the rows of J that are zero
    let mut w = try_zeros::<f64>("(J J^T)^+ J G^T", m, b)?;
    for (a, &i) in live.iter().enumerate() {
        for k in 0..b {
            w[(i, k)] = w_live[(a, k)] / unscale;
        }
    }
    // |(W^T J)_kl| <= sum_i |W_ik| ||J_i||: keeps every partial sum of the second pass finite.
    let bound = (0..b)
        .map(|k| {
            (0..m)
                .map(|i| w[(i, k)].abs() * diag[i].sqrt())
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    if !bound.is_finite() || bound >= 1e300 {
        return Ok(GramOutcome::Declined(batch));
    }
    update_pass(batch, j, w.as_ref(), &chunks)?;
    Ok(GramOutcome::Done(rank))
}

/// Which eigenvalues of the Gram matrix the route may invert, relative to `lambda_max`.
#[derive(Clone, Copy)]
struct Limits {
    /// `rcond^2`: eigenvalues at or below `threshold * lambda_max` count as zero (the SVD rule).
    threshold: f64,
    /// `1 / gram_max_cond^2` (0 when the route is forced): a kept eigenvalue below `floor *
    /// lambda_max` makes the Gram route too inaccurate.
    floor: f64,
}

/// What [`cholesky_coeffs`] found.
enum Cholesky {
    /// `M^-1 C`: every eigenvalue is certainly kept, unambiguously, and above the floor.
    Solved(Mat<f64>),
    /// The eigendecomposition must decide.
    Undecided,
    /// The eigendecomposition would certainly decline: the SVD route, without computing it.
    Declines,
}

/// `M^-1 C` by Cholesky, when that is certain to be what the eigendecomposition would decide:
/// every eigenvalue kept, unambiguously, and above the floor. Certain because `1 / trace(M^-1)
/// = 1 / ||L^-1||_F^2 <= lambda_min` and `||M||_inf >= lambda_max` bound the spectrum from the
/// safe side. Much cheaper than the eigenvalues (m = 2048, one thread: Cholesky 0.14 s,
/// eigenvalues alone 0.9 s, with eigenvectors 1.9 s). Also the opposite certainty
/// ([`certainly_declines`]), which saves the eigendecomposition where the SVD route follows
/// it anyway (m = 6000: several minutes, docs/linalg.md).
fn cholesky_coeffs(
    gram: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    limits: Limits,
    par: Par,
) -> Result<Cholesky, ProjectionError> {
    let m = gram.nrows();
    let full = |i: usize, k: usize| gram[(i.max(k), i.min(k))];
    // max_i M_ii <= lambda_max <= ||M||_inf
    let lambda_max = (
        (0..m).map(|i| gram[(i, i)]).fold(0.0, f64::max),
        (0..m)
            .map(|i| (0..m).map(|k| full(i, k).abs()).sum::<f64>())
            .fold(0.0, f64::max),
    );
    let Some(l) = cholesky_factor(gram, 0.0, par)? else {
        // not positive definite in floating point: shifted by a quarter of the floor, it is
        // when every eigenvalue is a fair way above round-off
        let shift = 0.25 * limits.floor * lambda_max.0;
        if !may_decline(limits) {
            return Ok(Cholesky::Undecided);
        }
        return Ok(match cholesky_factor(gram, shift, par)? {
            Some(l) if certainly_declines(gram, l.as_ref(), lambda_max, limits, par)? => {
                Cholesky::Declines
            }
            _ => Cholesky::Undecided,
        });
    };
    let mut l_inv = try_zeros::<f64>("the inverse Cholesky factor", m, m)?;
    invert_lower_triangular(l_inv.as_mut(), l.as_ref(), par);
    let trace_inv = l_inv.squared_norm_l2();
    let lambda_min_lb = 1.0 / trace_inv;
    let margin = (limits.threshold + GRAM_NOISE).max(limits.floor);
    if !(trace_inv.is_finite() && lambda_min_lb > margin * lambda_max.1) {
        let declines =
            may_decline(limits) && certainly_declines(gram, l.as_ref(), lambda_max, limits, par)?;
        return Ok(if declines {
            Cholesky::Declines
        } else {
            Cholesky::Undecided
        });
    }
    // M^-1 C = L^-T (L^-1 C)
    let mut z = try_zeros::<f64>("L^-1 J G^T", m, c.ncols())?;
    triangular::matmul(
        z.as_mut(),
        BlockStructure::Rectangular,
        Accum::Replace,
        l_inv.as_ref(),
        BlockStructure::TriangularLower,
        c,
        BlockStructure::Rectangular,
        1.0,
        par,
    );
    let mut w = try_zeros::<f64>("(J J^T)^-1 J G^T", m, c.ncols())?;
    triangular::matmul(
        w.as_mut(),
        BlockStructure::Rectangular,
        Accum::Replace,
        l_inv.transpose(),
        BlockStructure::TriangularUpper,
        z.as_ref(),
        BlockStructure::Rectangular,
        1.0,
        par,
    );
    Ok(Cholesky::Solved(w))
}

/// The lower Cholesky factor of `M + shift I` (`M` symmetric, lower half read), `None` when
/// that is not positive definite in floating point.
fn cholesky_factor(
    gram: MatRef<'_, f64>,
    shift: f64,
    par: Par,
) -> Result<Option<Mat<f64>>, ProjectionError> {
    let m = gram.nrows();
    let mut l = try_mat("the Cholesky factor", m, m, |i, k| {
        if i > k {
            gram[(i, k)]
        } else if i == k {
            gram[(i, k)] + shift
        } else {
            0.0
        }
    })?;
    let req = cholesky_in_place_scratch::<f64>(m, par, Default::default());
    let mut buf = try_scratch("the Cholesky factorization's workspace", req)?;
    let factored = cholesky_in_place(
        l.as_mut(),
        LltRegularization::default(),
        par,
        MemStack::new(&mut buf),
        Default::default(),
    );
    Ok(factored.is_ok().then_some(l))
}

/// Whether the eigendecomposition's verdict can be known to be "decline" without it: with the
/// rank threshold at or below the noise level (the default `rcond` and anything up to 1e-6) an
/// eigenvalue below the floor is either kept and too small (`ill`) or near the threshold
/// (`ambiguous`); never quietly dropped. Needs a floor well above the noise level, so that a
/// bound computed in floating point settles it: float64 results (floor 1e-6), not forced.
fn may_decline(limits: Limits) -> bool {
    limits.threshold <= GRAM_NOISE && limits.floor >= 1e3 * GRAM_NOISE
}

/// Whether `M` certainly has an eigenvalue below `floor * lambda_max`: a Rayleigh quotient
/// `v^T M v` (an upper bound on `lambda_min` for any unit `v`) with `v` from three steps of
/// inverse iteration on `M + shift I = L L^T`, plus its round-off bound, against `floor` times
/// a lower bound on `lambda_max` (`lambda_max`: lower and upper bounds). `O(m^2)`. An iteration
/// that has not found the smallest eigenvalue only makes the quotient larger: the answer is
/// then "not certain".
fn certainly_declines(
    gram: MatRef<'_, f64>,
    l: MatRef<'_, f64>,
    lambda_max: (f64, f64),
    limits: Limits,
    par: Par,
) -> Result<bool, ProjectionError> {
    let m = gram.nrows();
    let full = |i: usize, k: usize| gram[(i.max(k), i.min(k))];
    let (lambda_max_lb, lambda_max_ub) = lambda_max;
    let mut v = try_mat("an inverse-iteration vector", m, 1, |i, _| {
        // a fixed start with uneven entries
        1.0 + ((i * 7919) % 101) as f64 / 101.0
    })?;
    for _ in 0..3 {
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(l, v.as_mut(), par);
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(
            l.transpose(),
            v.as_mut(),
            par,
        );
        let norm = v.norm_l2();
        if !(norm.is_finite() && norm > 0.0) {
            return Ok(false);
        }
        v.col_mut(0).iter_mut().for_each(|x| *x /= norm);
    }
    let rayleigh: f64 = (0..m)
        .map(|i| v[(i, 0)] * (0..m).map(|k| full(i, k) * v[(k, 0)]).sum::<f64>())
        .sum();
    let round_off = (GRAM_NOISE + m as f64 * f64::EPSILON) * lambda_max_ub;
    Ok(rayleigh.is_finite() && rayleigh + round_off < limits.floor * lambda_max_lb)
}

/// `(V_r L_r^-1 V_r^T C, r)` from the eigendecomposition `M = V L V^T`, keeping the eigenvalues
/// above `threshold * lambda_max` (and, when `forced`, above `GRAM_NOISE * lambda_max`);
/// `None` when the route must decline: an eigenvalue within `GRAM_NOISE * lambda_max` of the
/// threshold (ambiguous rank) or a kept one below the floor (too inaccurate).
fn eigen_coeffs(
    gram: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    limits: Limits,
    forced: bool,
    par: Par,
) -> Result<Option<(Mat<f64>, usize)>, ProjectionError> {
    let m = gram.nrows();
    let Some((values, vectors)) = self_adjoint_eigen(gram, par)? else {
        return Ok(None);
    };
    let lambda_max = values[m - 1];
    let threshold = limits.threshold * lambda_max;
    let noise = GRAM_NOISE * lambda_max;
    let kept: Vec<usize> = (0..m)
        .filter(|&i| values[i] > threshold && (!forced || values[i] > noise))
        .collect();
    if !forced {
        let ambiguous = values.iter().any(|&v| (v - threshold).abs() <= noise);
        let ill = kept.iter().any(|&i| values[i] < limits.floor * lambda_max);
        if ambiguous || ill {
            return Ok(None);
        }
    }
    let rank = kept.len();
    let v_kept = try_mat("the kept eigenvectors", m, rank, |i, k| {
        vectors[(i, kept[k])]
    })?;
    drop(vectors);
    let mut z = try_zeros::<f64>("V_r^T J G^T", rank, c.ncols())?;
    matmul(z.as_mut(), Accum::Replace, v_kept.transpose(), c, 1.0, par);
    for (row, &i) in kept.iter().enumerate() {
        let inv = 1.0 / values[i];
        z.row_mut(row).iter_mut().for_each(|x| *x *= inv);
    }
    let mut w = try_zeros::<f64>("(J J^T)^+ J G^T", m, c.ncols())?;
    matmul(
        w.as_mut(),
        Accum::Replace,
        v_kept.as_ref(),
        z.as_ref(),
        1.0,
        par,
    );
    Ok(Some((w, rank)))
}

/// Eigenvalues (nondecreasing) and eigenvectors of the symmetric `a` (lower half read);
/// `Ok(None)` when the eigensolver does not converge.
fn self_adjoint_eigen(
    a: MatRef<'_, f64>,
    par: Par,
) -> Result<Option<(Vec<f64>, Mat<f64>)>, ProjectionError> {
    let n = a.nrows();
    let mut s = Diag::<f64>::zeros(n);
    let mut u = try_zeros::<f64>("the eigenvectors of the Gram matrix", n, n)?;
    let req = self_adjoint_evd_scratch::<f64>(n, ComputeEigenvectors::Yes, par, Default::default());
    let mut buf = try_scratch("the eigendecomposition's workspace", req)?;
    let converged = self_adjoint_evd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        par,
        MemStack::new(&mut buf),
        Default::default(),
    );
    if converged.is_err() {
        return Ok(None);
    }
    Ok(Some(((0..n).map(|i| s[i]).collect(), u)))
}

/// Columns of `J` handled per block: the f64 copy of a block (`m x width`, and `b x width` of
/// `G`) stays near 256 KiB, in L2 while it is used, and at least 256 columns keep the
/// rank-`width` updates of `M` efficient (m = 16, n = 65536: 1.3 ms with 256 KiB blocks, 1.5 ms
/// with 1 MiB, 3.9 ms with 4 MiB).
fn block_width(m: usize, b: usize) -> usize {
    ((1 << 15) / m.max(b).max(1)).clamp(256, 8192)
}

/// Splits `0..n` into one contiguous range per thread (at least 4096 columns each), each
/// processed sequentially: threads then never wait on each other inside a block.
fn column_chunks(n: usize, par: Par) -> Vec<(usize, usize)> {
    let parts = par.degree().max(1).min(n.div_ceil(4096)).max(1);
    let step = n.div_ceil(parts);
    (0..parts)
        .map(|p| (p * step, ((p + 1) * step).min(n)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// `(M, C)` with `M = J J^T` (lower triangle) and `C = J G^T`, in f64.
fn gram_pass<TJ: Real, T: Real>(
    j: MatRef<'_, TJ>,
    g: MatRef<'_, T>,
    chunks: &[(usize, usize)],
) -> Result<(Mat<f64>, Mat<f64>), ProjectionError> {
    let (m, b) = (j.nrows(), g.nrows());
    let partial = |&(start, end): &(usize, usize)| -> Result<_, ProjectionError> {
        let mut gram = try_zeros::<f64>("the Gram matrix J J^T", m, m)?;
        let mut c = try_zeros::<f64>("J G^T", m, b)?;
        let width = block_width(m, b);
        let (mut jbuf, mut gbuf) = (Widened::new(), Widened::new());
        let mut k = start;
        while k < end {
            let w = width.min(end - k);
            let jb = jbuf.load(j.subcols(k, w))?;
            let gb = gbuf.load(g.subcols(k, w))?;
            triangular::matmul(
                gram.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Add,
                jb,
                BlockStructure::Rectangular,
                jb.transpose(),
                BlockStructure::Rectangular,
                1.0,
                Par::Seq,
            );
            matmul(c.as_mut(), Accum::Add, jb, gb.transpose(), 1.0, Par::Seq);
            k += w;
        }
        Ok((gram, c))
    };
    if chunks.len() == 1 {
        return partial(&chunks[0]);
    }
    let parts = chunks
        .par_iter()
        .map(partial)
        .collect::<Result<Vec<_>, _>>()?;
    let mut parts = parts.into_iter();
    let (mut gram, mut c) = parts.next().expect("at least one chunk");
    for (gp, cp) in parts {
        gram += gp;
        c += cp;
    }
    Ok((gram, c))
}

/// `Y = G - W^T J`, in f64, rounded once to `T`, written over the batch's output. Errors with
/// [`ProjectionError::Overflow`] when an entry of `Y` is beyond the range of `T` (the partial
/// sums are bounded by the caller, so that only a result that is itself out of range, or within
/// `1e300` of `f64::MAX`, gets there).
fn update_pass<TJ: Real, T: Real>(
    batch: Batch<'_, T>,
    j: MatRef<'_, TJ>,
    w: MatRef<'_, f64>,
    chunks: &[(usize, usize)],
) -> Result<(), ProjectionError> {
    let (dst, g) = match batch {
        Batch::Separate { dst, g } => (dst, Some(g)),
        Batch::InPlace(g) => (g, None),
    };
    let shape = dst.shape();
    let b = dst.nrows();
    let run = |(start, mut dst): (usize, MatMut<'_, T>)| -> Result<(), ProjectionError> {
        let end = start + dst.ncols();
        let width = block_width(j.nrows(), b);
        let (mut jbuf, mut ybuf) = (Widened::new(), Mat::<f64>::new());
        let mut k = start;
        while k < end {
            let cols = width.min(end - k);
            let jb = jbuf.load(j.subcols(k, cols))?;
            let g = g.map(|g| g.subcols(k, cols));
            match T::as_f64_mut(dst.rb_mut().subcols_mut(k - start, cols)) {
                Ok(mut out) => {
                    if let Some(g) = g.and_then(T::as_f64) {
                        out.copy_from(g);
                    }
                    matmul(out, Accum::Add, w.transpose(), jb, -1.0, Par::Seq);
                }
                Err(mut out) => {
                    let mut y = scratch_like(&mut ybuf, out.rb())?;
                    convert(y.rb_mut(), g.unwrap_or(out.rb()), T::to_f64);
                    matmul(y.rb_mut(), Accum::Add, w.transpose(), jb, -1.0, Par::Seq);
                    convert(out.rb_mut(), y.rb(), T::from_f64);
                }
            }
            let out = dst.rb().subcols(k - start, cols);
            if !all_finite(out) {
                let (i, l) = first_non_finite(out);
                return Err(ProjectionError::Overflow {
                    arg: "G",
                    shape,
                    at: (i, k + l),
                    dtype: T::NAME,
                });
            }
            k += cols;
        }
        Ok(())
    };
    if chunks.len() == 1 {
        return run((0, dst));
    }
    let mut pieces = Vec::with_capacity(chunks.len());
    let mut rest = dst;
    let mut taken = 0;
    for &(start, end) in chunks {
        let (piece, tail) = rest.split_at_col_mut(end - taken);
        pieces.push((start, piece));
        rest = tail;
        taken = end;
    }
    let results: Vec<_> = pieces.into_par_iter().map(run).collect();
    // the error of the leftmost share of columns that overflowed
    results.into_iter().collect()
}

/// The (row, column) of the first non-finite entry of `m` in row-major order.
fn first_non_finite<T: Real>(m: MatRef<'_, T>) -> (usize, usize) {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |l| (i, l)))
        .find(|&(i, l)| !m[(i, l)].is_finite_value())
        .unwrap_or((0, 0))
}

/// A reusable f64 copy of blocks of a matrix; float64 blocks are borrowed, not copied.
struct Widened {
    buf: Mat<f64>,
}

impl Widened {
    fn new() -> Self {
        Self { buf: Mat::new() }
    }

    /// `block` as f64.
    fn load<'s, 'a: 's, T: Real>(
        &'s mut self,
        block: MatRef<'a, T>,
    ) -> Result<MatRef<'s, f64>, ProjectionError> {
        if let Some(b) = T::as_f64(block) {
            return Ok(b);
        }
        let mut buf = scratch_like(&mut self.buf, block)?;
        convert(buf.rb_mut(), block, T::to_f64);
        Ok(buf.into_const())
    }
}

/// `buf` resized to the shape of `like`, as a view in `like`'s memory order (row- or
/// column-major), so that copies between them run over contiguous memory.
fn scratch_like<'s, T>(
    buf: &'s mut Mat<f64>,
    like: MatRef<'_, T>,
) -> Result<MatMut<'s, f64>, ProjectionError> {
    const BLOCK: &str = "a float64 block of columns";
    let (r, c) = like.shape();
    Ok(
        if like.col_stride().unsigned_abs() < like.row_stride().unsigned_abs() {
            try_resize(BLOCK, buf, c, r, |_, _| 0.0)?;
            buf.as_mut().transpose_mut()
        } else {
            try_resize(BLOCK, buf, r, c, |_, _| 0.0)?;
            buf.as_mut()
        },
    )
}

/// `dst[i, j] <- f(src[i, j])`, along contiguous lines where both have them.
fn convert<S: Copy, D: Copy>(dst: MatMut<'_, D>, src: MatRef<'_, S>, f: impl Fn(S) -> D) {
    let transposed = src.row_stride().unsigned_abs() > src.col_stride().unsigned_abs();
    let (mut dst, src) = if transposed {
        (dst.transpose_mut(), src.transpose())
    } else {
        (dst, src)
    };
    for k in 0..src.ncols() {
        let s = src.col(k);
        let contiguous = s.try_as_col_major().map(|s| s.as_slice());
        match (dst.rb_mut().col_mut(k).try_as_col_major_mut(), contiguous) {
            (Some(d), Some(s)) => {
                let d = d.as_slice_mut();
                d.iter_mut().zip(s).for_each(|(d, &s)| *d = f(s));
            }
            _ => {
                let mut d = dst.rb_mut().col_mut(k);
                for i in 0..s.nrows() {
                    d[i] = f(s[i]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    fn run<TJ: Real, T: Real>(
        j: &Mat<f64>,
        g: &Mat<f64>,
        rcond: Option<f64>,
    ) -> (Mat<T>, usize, f64) {
        let (y, info, ratio) = run_route::<TJ, T>(j, g, rcond, JacobianRoute::Auto);
        (y, info.rank, ratio)
    }

    fn run_route<TJ: Real, T: Real>(
        j: &Mat<f64>,
        g: &Mat<f64>,
        rcond: Option<f64>,
        route: JacobianRoute,
    ) -> (Mat<T>, JacobianInfo, f64) {
        let (jt, gt) = (cast::<TJ>(j.as_ref()), cast::<T>(g.as_ref()));
        let mut y = Mat::<T>::zeros(g.nrows(), g.ncols());
        let info = jacobian_null_project_with(
            y.as_mut(),
            jt.as_ref(),
            gt.as_ref(),
            rcond,
            route,
            Par::Seq,
        )
        .unwrap();
        let ratio = orthogonality_ratio(widen(jt.as_ref()).transpose(), gt.as_ref(), y.as_ref());
        (y, info, ratio)
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
    fn each_route_meets_the_bars_and_they_agree() {
        let mut rng = rng(24);
        for &(m, n, b) in &[(5, 40, 9), (16, 300, 4), (40, 41, 3)] {
            let j = gaussian(&mut rng, m, n);
            let g = gaussian(&mut rng, b, n);
            let (y_auto, auto, r_auto) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
            let (y_gram, gram, r_gram) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Gram);
            let (y_svd, svd, r_svd) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Svd);
            assert_eq!(auto.route, JacobianRoute::Gram, "{m}x{n}: well-conditioned");
            assert_eq!(
                (gram.route, svd.route),
                (JacobianRoute::Gram, JacobianRoute::Svd)
            );
            assert_eq!((auto.rank, gram.rank, svd.rank), (m, m, m));
            for r in [r_auto, r_gram, r_svd] {
                assert!(r < 1e-12, "{m}x{n}: {r:e}");
            }
            assert_eq!(y_auto, y_gram);
            assert!(max_abs_diff(y_gram.as_ref(), y_svd.as_ref()) < 1e-12);
            for route in [JacobianRoute::Gram, JacobianRoute::Svd] {
                let (_, info, r) = run_route::<f32, f32>(&j, &g, None, route);
                assert!(r < 1e-5 && info.route == route, "{route:?}: {r:e}");
                let (_, _, r) = run_route::<f32, f64>(&j, &g, None, route);
                assert!(r < 1e-12, "{route:?}: {r:e}");
            }
        }
    }

    #[test]
    fn auto_declines_the_gram_route_where_it_would_be_inaccurate() {
        let mut rng = rng(25);
        for cond in [1e2f64, 1e4, 1e5, 1e7, 1e9] {
            let s: Vec<f64> = (0..10).map(|i| cond.powf(-(i as f64) / 9.0)).collect();
            let j = with_singular_values(&mut rng, 80, &s)
                .transpose()
                .to_owned();
            let mut g = gaussian(&mut rng, 6, 80);
            // the weakest direction of the row space: the worst case of the Gram route
            let v = gram_schmidt(j.transpose().to_owned().as_ref(), 1e-14);
            for k in 0..80 {
                g[(0, k)] = v[(k, 9)];
            }
            let (_, info64, r64) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
            let (_, info32, r32) = run_route::<f32, f32>(&j, &g, None, JacobianRoute::Auto);
            assert!(r64 < 1e-12 && r32 < 1e-5, "cond {cond:e}: {r64:e} {r32:e}");
            let expect = |limit: f64| {
                if cond <= limit {
                    JacobianRoute::Gram
                } else {
                    JacobianRoute::Svd
                }
            };
            assert_eq!(
                info64.route,
                expect(gram_max_cond::<f64>()),
                "cond {cond:e}"
            );
            assert_eq!(
                info32.route,
                expect(gram_max_cond::<f32>()),
                "cond {cond:e}"
            );
            assert_eq!((info64.rank, info32.rank), (10, 10));
        }
    }

    #[test]
    fn rank_decisions_follow_the_svd_rule() {
        let mut rng = rng(26);
        let b = gaussian(&mut rng, 4, 50);
        let mut j = gaussian(&mut rng, 9, 4) * &b; // 9 rows spanning 4 directions
        j.row_mut(2).fill(0.0);
        j.row_mut(7).fill(0.0);
        let g = gaussian(&mut rng, 5, 50);
        let q = gram_schmidt(b.transpose().to_owned().as_ref(), 1e-10);
        let reference = reference_project(q.as_ref(), g.as_ref());
        // default rcond: the round-off eigenvalues of the dependent rows are ambiguous
        let (y, info, _) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
        assert_eq!((info.rank, info.route), (4, JacobianRoute::Svd));
        assert!(max_abs_diff(y.as_ref(), reference.as_ref()) < 1e-12);
        // a tolerance far above round-off makes the same decision certain
        let (y, info, _) = run_route::<f64, f64>(&j, &g, Some(1e-4), JacobianRoute::Auto);
        assert_eq!((info.rank, info.route), (4, JacobianRoute::Gram));
        assert!(max_abs_diff(y.as_ref(), reference.as_ref()) < 1e-12);
        // forced, the Gram route drops what is below its noise level
        let (y, info, _) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Gram);
        assert_eq!((info.rank, info.route), (4, JacobianRoute::Gram));
        assert!(max_abs_diff(y.as_ref(), reference.as_ref()) < 1e-12);
        // zero rows alone do not make the rank ambiguous
        let mut j = gaussian(&mut rng, 9, 50);
        j.row_mut(0).fill(0.0);
        j.row_mut(5).fill(0.0);
        let (_, info, r) = run_route::<f32, f32>(&j, &g, None, JacobianRoute::Auto);
        assert_eq!((info.rank, info.route), (7, JacobianRoute::Gram));
        assert!(r < 1e-5);
        // a zero J, and a tolerance that drops everything
        let (y, info, _) = run_route::<f64, f64>(&Mat::zeros(3, 50), &g, None, JacobianRoute::Auto);
        assert_eq!((y, info.rank), (g.clone(), 0));
        let (y, info, _) = run_route::<f64, f64>(&j, &g, Some(2.0), JacobianRoute::Auto);
        assert_eq!((y, info.rank), (g.clone(), 0));
    }

    #[test]
    fn extreme_float64_scales_take_the_svd_route() {
        let mut rng = rng(27);
        let j0 = gaussian(&mut rng, 6, 30);
        let g = gaussian(&mut rng, 4, 30);
        let (reference, _, _) = run_route::<f64, f64>(&j0, &g, None, JacobianRoute::Svd);
        for (scale, route) in [
            (1e-200, JacobianRoute::Svd),
            (1e-100, JacobianRoute::Gram),
            (1e100, JacobianRoute::Gram),
            (1e200, JacobianRoute::Svd),
        ] {
            let j = Mat::from_fn(6, 30, |i, k| j0[(i, k)] * scale);
            let (y, info, r) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
            assert_eq!((info.route, info.rank), (route, 6), "scale {scale:e}");
            assert!(r < 1e-12, "scale {scale:e}: {r:e}");
            assert!(max_abs_diff(y.as_ref(), reference.as_ref()) < 1e-12);
        }
        // float32 data spans too little range to need it
        for scale in [1e-30, 1e30] {
            let j = Mat::from_fn(6, 30, |i, k| j0[(i, k)] * scale);
            let (_, info, r) = run_route::<f32, f32>(&j, &g, None, JacobianRoute::Auto);
            assert_eq!(info.route, JacobianRoute::Gram);
            assert!(r < 1e-5, "scale {scale:e}: {r:e}");
        }
    }

    #[test]
    fn gram_route_layouts_threads_and_in_place() {
        let mut rng = rng(28);
        let (m, n, b) = (12, 9000, 5); // several column blocks, two thread chunks
        let j = gaussian(&mut rng, m, n);
        let g = gaussian(&mut rng, b, n);
        let (reference, info, _) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
        assert_eq!(info.route, JacobianRoute::Gram);
        // J column-major with reversed rows, G transposed storage, two threads
        let j_cm = j.as_ref().reverse_rows().to_owned();
        let j_view = j_cm.as_ref().reverse_rows();
        let gt = g.transpose().to_owned();
        let mut y = Mat::<f64>::zeros(b, n);
        let info = jacobian_null_project_with(
            y.as_mut(),
            j_view,
            gt.as_ref().transpose(),
            None,
            JacobianRoute::Auto,
            Par::rayon(2),
        )
        .unwrap();
        assert_eq!(info.route, JacobianRoute::Gram);
        assert!(max_abs_diff(y.as_ref(), reference.as_ref()) < 1e-13);
        // in place, float32 batch, into a transposed destination
        let mut h = cast::<f32>(g.as_ref()).transpose().to_owned();
        let info = jacobian_null_project_in_place_with(
            h.as_mut().transpose_mut(),
            j.as_ref(),
            None,
            JacobianRoute::Gram,
            Par::rayon(2),
        )
        .unwrap();
        assert_eq!((info.route, info.rank), (JacobianRoute::Gram, m));
        let h64 = widen(h.as_ref().transpose());
        assert!(max_abs_diff(h64.as_ref(), reference.as_ref()) < 1e-5);
    }

    #[test]
    fn non_finite_values_are_found_wherever_they_are() {
        let mut rng = rng(29);
        let (m, n, b) = (7, 9000, 3);
        for route in [JacobianRoute::Auto, JacobianRoute::Gram, JacobianRoute::Svd] {
            for &(i, k, bad) in &[
                (0, 0, f64::NAN),
                (6, 8999, f64::INFINITY),
                (3, 4500, -f64::INFINITY),
            ] {
                let mut j = gaussian(&mut rng, m, n);
                let g = gaussian(&mut rng, b, n);
                j[(i, k)] = bad;
                let mut y = Mat::<f32>::zeros(b, n);
                let j32 = cast::<f32>(j.as_ref());
                let err = jacobian_null_project_with(
                    y.as_mut(),
                    j32.as_ref(),
                    cast::<f32>(g.as_ref()).as_ref(),
                    None,
                    route,
                    Par::rayon(2),
                )
                .unwrap_err();
                assert!(
                    err.to_string().contains(&format!(
                        "J contains a non-finite value ({}) at [{i}, {k}]",
                        bad as f32
                    )),
                    "{route:?}: {err}"
                );
                // G: the batch is left untouched by the in-place variant
                let j = gaussian(&mut rng, m, n);
                let mut g = gaussian(&mut rng, b, n);
                g[(i % b, k)] = bad;
                let before = g.clone();
                let err = jacobian_null_project_in_place_with(
                    g.as_mut(),
                    j.as_ref(),
                    None,
                    route,
                    Par::Seq,
                )
                .unwrap_err();
                let at = format!("at [{}, {k}]", i % b);
                assert!(
                    err.to_string().contains("G contains a non-finite value")
                        && err.to_string().contains(&at),
                    "{route:?}: {err}"
                );
                assert!(g.as_ref().col_iter().zip(before.col_iter()).all(|(a, b)| a
                    .iter()
                    .zip(b.iter())
                    .all(|(x, y)| x.to_bits() == y.to_bits())));
            }
        }
        // J overflowing the Gram matrix but finite: no error, the SVD route
        let mut j = gaussian(&mut rng, 4, 20);
        j[(1, 3)] = 1e300;
        let g = gaussian(&mut rng, 2, 20);
        let (_, info, r) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
        assert_eq!(info.route, JacobianRoute::Svd);
        assert!(r < 1e-12);
    }

    #[test]
    fn cholesky_settles_what_it_can_without_the_eigendecomposition() {
        let mut rng = rng(30);
        let limits = |floor: f64| Limits {
            threshold: SpanBasis::default_rcond(80, 10).powi(2),
            floor,
        };
        let (f64_limits, f32_limits, forced) = (
            limits(gram_max_cond::<f64>().powi(-2)),
            limits(gram_max_cond::<f32>().powi(-2)),
            limits(0.0),
        );
        let outcome = |j: &Mat<f64>, limits| {
            let gram = j * j.transpose();
            let c = Mat::from_fn(j.nrows(), 2, |i, k| (i + k) as f64);
            match cholesky_coeffs(gram.as_ref(), c.as_ref(), limits, Par::Seq).unwrap() {
                Cholesky::Solved(_) => "solved",
                Cholesky::Undecided => "undecided",
                Cholesky::Declines => "declines",
            }
        };
        for (cond, expected64) in [(1e1f64, "solved"), (1e5, "declines"), (1e7, "declines")] {
            let s: Vec<f64> = (0..10).map(|i| cond.powf(-(i as f64) / 9.0)).collect();
            let j = with_singular_values(&mut rng, 80, &s)
                .transpose()
                .to_owned();
            assert_eq!(outcome(&j, f64_limits), expected64, "cond {cond:e}");
            // float32 and forced routes never decline on a bound
            assert_ne!(outcome(&j, f32_limits), "declines", "cond {cond:e}");
            assert_ne!(outcome(&j, forced), "declines", "cond {cond:e}");
        }
        // dependent rows: not positive definite in floating point; shifted, the bound settles it
        let j = gaussian(&mut rng, 10, 3) * gaussian(&mut rng, 3, 80);
        assert_eq!(outcome(&j, f64_limits), "declines");
        assert_eq!(outcome(&j, f32_limits), "undecided");
        // and the routes are those of the eigendecomposition: dependent rows go to the SVD
        let g = gaussian(&mut rng, 3, 80);
        let (_, info, r) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
        assert_eq!((info.route, info.rank), (JacobianRoute::Svd, 3));
        assert!(r < 1e-12);
    }

    fn diag(values: &[f64]) -> Mat<f64> {
        Mat::from_fn(values.len(), values.len(), |i, k| {
            if i == k {
                values[i]
            } else {
                0.0
            }
        })
    }

    /// The float64, float32 and forced limits at a rank threshold far below round-off.
    const F64: Limits = Limits {
        threshold: 1e-30,
        floor: 1e-6,
    };
    const F32: Limits = Limits {
        threshold: 1e-30,
        floor: 1e-12,
    };
    const FORCED: Limits = Limits {
        threshold: 1e-30,
        floor: 0.0,
    };

    fn verdict(values: &[f64], limits: Limits) -> &'static str {
        let c = Mat::from_fn(values.len(), 2, |i, k| (1 + i + k) as f64);
        match cholesky_coeffs(diag(values).as_ref(), c.as_ref(), limits, Par::Seq).unwrap() {
            Cholesky::Solved(_) => "solved",
            Cholesky::Undecided => "undecided",
            Cholesky::Declines => "declines",
        }
    }

    #[test]
    fn cholesky_verdicts_on_hand_spectra() {
        assert_eq!(
            (F64.floor, F32.floor),
            (
                gram_max_cond::<f64>().powi(-2),
                gram_max_cond::<f32>().powi(-2)
            )
        );
        // M = diag(2, 3e-6): 1 / trace(M^-1) = 1 / (0.5 + 333333.3) = 3.0e-6 > 1e-6 * ||M||_inf = 2e-6
        assert_eq!(verdict(&[2.0, 3e-6], F64), "solved");
        // M = diag(2, 1.5e-6): the bound 1.5e-6 is not above 2e-6 (above 1e-6 / 2, the wrong way
        // round, it would be); the Rayleigh quotient 1.5e-6 is below 1e-6 * 2: declines
        assert_eq!(verdict(&[2.0, 1.5e-6], F64), "declines");
        // three eigenvalues 2e-6: the bound 1 / (1 + 1.5e6) = 6.7e-7 settles nothing, the
        // quotient 2e-6 is above the floor: the eigendecomposition decides
        assert_eq!(verdict(&[1.0, 2e-6, 2e-6, 2e-6], F64), "undecided");
        // 1e-14: too small for a bound to settle the float32 floor (1e-12, near round-off), and
        // a forced route inverts what is above the noise level: both to the eigendecomposition
        assert_eq!(verdict(&[1.0, 1e-14], F32), "undecided");
        assert_eq!(verdict(&[1.0, 1e-14], FORCED), "undecided");
        // not positive definite: shifted by a quarter of the floor (2.5e-7) the zero eigenvalue
        // is found by three steps of inverse iteration (a shift of 0.25 would not find it)
        assert_eq!(verdict(&[1.0, 0.5, 0.0], F64), "declines");
        assert_eq!(verdict(&[1.0, 0.5, 0.0], F32), "undecided");
    }

    fn certainly(values: &[f64], floor: f64) -> bool {
        let gram = diag(values);
        let l = cholesky_factor(gram.as_ref(), 0.0, Par::Seq)
            .unwrap()
            .unwrap();
        let top = values.iter().copied().fold(0.0, f64::max); // both bounds, for a diagonal M
        let limits = Limits {
            threshold: 1e-30,
            floor,
        };
        certainly_declines(gram.as_ref(), l.as_ref(), (top, top), limits, Par::Seq).unwrap()
    }

    #[test]
    fn certainly_declines_counts_the_round_off_of_its_quotient() {
        // quotient 1e-6, round-off bound (1e-12 + 2 eps) * 2: 1e-6 + 2e-12 < 1e-6 * 2
        assert!(certainly(&[2.0, 1e-6], 1e-6));
        // 5e-13 below the floor is within the round-off bound (1.0004e-12): not certain
        assert!(!certainly(&[1.0, 1e-6 - 5e-13], 1e-6));
        // 2e-12 below it is beyond: certain
        assert!(certainly(&[1.0, 1e-6 - 2e-12], 1e-6));
        // the floor is relative to lambda_max (3): 4e-6 is above 3e-6, 2e-6 below
        assert!(!certainly(&[1.0, 4e-6, 3.0], 1e-6));
        assert!(certainly(&[1.0, 2e-6, 3.0], 1e-6));
    }

    fn eigen(
        values: &[f64],
        threshold: f64,
        floor: f64,
        forced: bool,
    ) -> Option<(Vec<f64>, usize)> {
        let c = Mat::from_fn(values.len(), 1, |i, _| 1.0 + i as f64);
        let limits = Limits { threshold, floor };
        eigen_coeffs(diag(values).as_ref(), c.as_ref(), limits, forced, Par::Seq)
            .unwrap()
            .map(|(w, rank)| ((0..values.len()).map(|i| w[(i, 0)]).collect(), rank))
    }

    #[test]
    fn eigen_coeffs_keep_drop_and_decline_by_hand() {
        // W = M^+ C on the kept eigenvalues: C = (1, 2, 3), M = diag(2, 0.5, 1e-30), the
        // threshold 0.01 x 2 (far from every eigenvalue: nothing ambiguous)
        let (w, rank) = eigen(&[2.0, 0.5, 1e-30], 0.01, 1e-6, false).unwrap();
        assert_eq!(rank, 2);
        let want = [0.5, 4.0, 0.0];
        assert!(
            w.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-15),
            "{w:?}"
        );
        // a zero-ish eigenvalue near a tiny threshold is ambiguous (within 1e-12 x 2 of 2e-20)
        assert_eq!(eigen(&[2.0, 0.5, 1e-30], 1e-20, 1e-6, false), None);
        // forced: an eigenvalue exactly at the threshold (0.25 of 1) or below the noise level
        // (1e-12 of 1) is dropped (the solver returns a diagonal 1e-12 as 1.00003e-12: round-off
        // of the order of eps x lambda_max, so "exactly at the noise level" cannot be set up)
        assert_eq!(eigen(&[1.0, 0.25], 0.25, 0.0, true).map(|e| e.1), Some(1));
        assert_eq!(eigen(&[1.0, 0.9e-12], 0.0, 0.0, true).map(|e| e.1), Some(1));
        assert_eq!(eigen(&[1.0, 1.1e-12], 0.0, 0.0, true).map(|e| e.1), Some(2));
        // not forced: exactly at the threshold is ambiguous; kept below the floor is ill
        assert_eq!(eigen(&[1.0, 1e-4], 1e-4, 0.0, false), None);
        assert_eq!(eigen(&[1.0, 1e-8], 1e-30, 1e-6, false), None);
        // the floor is relative to lambda_max: 1.5e-6 is below 1e-6 x 2
        assert_eq!(eigen(&[2.0, 1.5e-6], 1e-30, 1e-6, false), None);
        assert_eq!(
            eigen(&[1.0, 2e-6], 1e-30, 1e-6, false).map(|e| e.1),
            Some(2)
        );
        // the noise level scales with lambda_max: 1e-12 from the threshold 2e-4 is within
        // 1e-12 * 2, ambiguous; 3e-12 from it is not
        assert_eq!(eigen(&[2.0, 2e-4 + 1e-12], 1e-4, 0.0, false), None);
        assert_eq!(
            eigen(&[2.0, 2e-4 + 3e-12], 1e-4, 0.0, false).map(|e| e.1),
            Some(2)
        );
    }

    #[test]
    fn overflow_is_placed_in_the_column_of_its_block() {
        // G 128 x 600 (blocks of 256 columns), row 5 = 3e38 at columns 300..304; J = (1, 1, 1, -1)
        // there: g.v = 3e38 for v = J / 2, so column 303 becomes 3e38 + 1.5e38, beyond f32::MAX
        let j = Mat::<f32>::from_fn(1, 600, |_, k| match k {
            300..=302 => 1.0,
            303 => -1.0,
            _ => 0.0,
        });
        let g = Mat::<f32>::from_fn(128, 600, |i, k| {
            if i == 5 && (300..304).contains(&k) {
                3e38
            } else {
                0.0
            }
        });
        assert_eq!(block_width(1, 128), 256);
        for route in [JacobianRoute::Gram, JacobianRoute::Svd] {
            let mut y = Mat::<f32>::zeros(128, 600);
            let result = jacobian_null_project_with(
                y.as_mut(),
                j.as_ref(),
                g.as_ref(),
                None,
                route,
                Par::Seq,
            );
            assert_eq!(
                result,
                Err(ProjectionError::Overflow {
                    arg: "G",
                    shape: (128, 600),
                    at: (5, 303),
                    dtype: "float32"
                }),
                "{route:?}"
            );
        }
    }

    #[test]
    fn column_blocks_and_thread_chunks() {
        // 2^15 values of J per block row, between 256 and 8192 columns
        assert_eq!(block_width(16, 5), 2048);
        assert_eq!(block_width(5, 16), 2048);
        assert_eq!((block_width(0, 0), block_width(1, 1)), (8192, 8192));
        assert_eq!(block_width(1000, 3), 256);
        // one contiguous range per thread, at least 4096 columns each, none empty
        assert_eq!(column_chunks(0, Par::rayon(4)), vec![]);
        assert_eq!(column_chunks(9000, Par::Seq), vec![(0, 9000)]);
        assert_eq!(
            column_chunks(9000, Par::rayon(4)),
            vec![(0, 3000), (3000, 6000), (6000, 9000)]
        );
        assert_eq!(column_chunks(4096, Par::rayon(4)), vec![(0, 4096)]);
    }

    #[test]
    fn gram_route_fast_paths_tolerance_and_range() {
        let mut rng = rng(33);
        let g = gaussian(&mut rng, 3, 20);
        // a zero J is settled by the Gram pass: rank 0, G unchanged
        let (y, info, _) = run_route::<f64, f64>(&Mat::zeros(4, 20), &g, None, JacobianRoute::Auto);
        assert_eq!(
            (y, info.rank, info.route),
            (g.clone(), 0, JacobianRoute::Gram)
        );
        // rcond applies to singular values, i.e. rcond^2 to eigenvalues: sigma (1, 1e-5) keeps
        // both with rcond 1e-6 (the SVD route: 1e-10 is below the float64 floor) ...
        let j = with_singular_values(&mut rng, 20, &[1.0, 1e-5])
            .transpose()
            .to_owned();
        let (_, info, r) = run_route::<f64, f64>(&j, &g, Some(1e-6), JacobianRoute::Auto);
        assert_eq!((info.rank, info.route), (2, JacobianRoute::Svd));
        assert!(r < 1e-12, "{r:e}");
        // ... and drops the second with rcond 1e-4, on the Gram route
        let (_, info, _) = run_route::<f64, f64>(&j, &g, Some(1e-4), JacobianRoute::Auto);
        assert_eq!((info.rank, info.route), (1, JacobianRoute::Gram));
        // J ~ 1e-100 and G ~ 1e110: W ~ 1e210, |W| ||J_i|| ~ 1e110 stays on the Gram route
        let j = gaussian(&mut rng, 5, 20) * faer::Scale(1e-100);
        let big = &g * faer::Scale(1e110);
        let (y, info, _) = run_route::<f64, f64>(&j, &big, None, JacobianRoute::Auto);
        let (reference, svd, _) = run_route::<f64, f64>(&j, &big, None, JacobianRoute::Svd);
        assert_eq!(
            (info.rank, info.route, svd.rank),
            (5, JacobianRoute::Gram, 5)
        );
        assert!(max_abs_diff(y.as_ref(), reference.as_ref()) < 1e-12 * big.norm_max());
    }

    #[test]
    fn tiny_float64_batches_keep_their_digits() {
        // found by the seeded fuzzer: J ~ 1e-84, G ~ 1e-275 made J G^T underflow in the Gram
        // route (the result was G itself); such batches now take the SVD route. Compared with
        // the same batch scaled up by 2^900 (exact).
        let mut rng = rng(32);
        let j = gaussian(&mut rng, 12, 39) * faer::Scale(1e-84);
        let g = gaussian(&mut rng, 7, 39) * faer::Scale(1e-275);
        let up = 2f64.powi(900);
        let g_up = &g * faer::Scale(up);
        let (y, info, _) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
        let (y_up, _, _) = run_route::<f64, f64>(&j, &g_up, None, JacobianRoute::Auto);
        let diff = max_abs_diff((&y * faer::Scale(up)).as_ref(), y_up.as_ref());
        assert!(diff < 1e-12 * g_up.norm_max(), "{diff:e}");
        assert_eq!((info.route, info.rank), (JacobianRoute::Svd, 12));
        // a zero row, or rows within 1e+-150, stay on the Gram route
        let mut g = gaussian(&mut rng, 3, 39) * faer::Scale(1e-140);
        g.row_mut(1).fill(0.0);
        let (_, info, r) = run_route::<f64, f64>(&j, &g, None, JacobianRoute::Auto);
        assert_eq!(info.route, JacobianRoute::Gram);
        assert!(r < 1e-12, "{r:e}");
    }

    fn overflow_case<T: Real>() {
        use crate::encoder_null::tests::{huge_rows, row_relative_error};
        let j = Mat::<f64>::ones(1, 3);
        let (g, exact) = huge_rows::<T>();
        let b = T::from_f64(0.9 * T::MAX.to_f64());
        let mut bad = g.clone();
        bad.row_mut(2)
            .copy_from(Mat::from_fn(1, 3, |_, k| if k == 0 { b } else { -b }).row(0));
        let bar = if T::NAME == "float32" { 1e-5 } else { 1e-12 };
        for route in [JacobianRoute::Auto, JacobianRoute::Gram, JacobianRoute::Svd] {
            let mut y = Mat::<T>::zeros(4, 3);
            let info = jacobian_null_project_with(
                y.as_mut(),
                j.as_ref(),
                g.as_ref(),
                None,
                route,
                Par::Seq,
            )
            .unwrap();
            assert_eq!(info.rank, 1);
            let err = row_relative_error(&g, y.as_ref(), &exact);
            assert!(err < 10.0 * bar, "{route:?} {}: {err:e}", T::NAME);
            let result = jacobian_null_project_with(
                y.as_mut(),
                j.as_ref(),
                bad.as_ref(),
                None,
                route,
                Par::Seq,
            );
            assert_eq!(
                result,
                Err(ProjectionError::Overflow {
                    arg: "G",
                    shape: (4, 3),
                    at: (2, 0),
                    dtype: T::NAME
                }),
                "{route:?} {}",
                T::NAME
            );
        }
    }

    #[test]
    fn huge_rows_are_projected_and_a_result_out_of_range_is_an_error() {
        overflow_case::<f32>();
        overflow_case::<f64>();
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

#[cfg(test)]
mod measure {
    //! `cargo test --release -- --ignored --nocapture jacobian_null::measure`: the worst ratios
    //! per route on adversarial inputs, and the round-off level of the Gram eigenvalues, as
    //! quoted in docs/linalg.md.
    use super::*;
    use crate::testing::*;

    fn ratio<TJ: Real, T: Real>(
        j: &Mat<f64>,
        g: &Mat<f64>,
        route: JacobianRoute,
    ) -> (f64, JacobianRoute) {
        let (jt, gt) = (cast::<TJ>(j.as_ref()), cast::<T>(g.as_ref()));
        let mut y = Mat::<T>::zeros(g.nrows(), g.ncols());
        let info =
            jacobian_null_project_with(y.as_mut(), jt.as_ref(), gt.as_ref(), None, route, Par::Seq)
                .unwrap();
        let r = orthogonality_ratio(widen(jt.as_ref()).transpose(), gt.as_ref(), y.as_ref());
        (r, info.route)
    }

    /// `b` rows: Gaussian, inside the row space, along the weakest right singular directions.
    fn adversarial_batch(rng: &mut rand::rngs::StdRng, j: &Mat<f64>, b: usize) -> Mat<f64> {
        let (m, n) = j.shape();
        let mut g = gaussian(rng, b, n);
        let inside = gaussian(rng, b / 4, m) * j;
        let svd = j.thin_svd().unwrap();
        let v = svd.V();
        let r = (0..m.min(n))
            .filter(|&i| svd.S()[i] > 1e-14 * svd.S()[0])
            .count();
        for i in 0..b / 4 {
            g.row_mut(i).copy_from(inside.row(i));
        }
        for i in b / 4..b / 2 {
            // the weakest kept directions, plus a little noise
            let k = r - 1 - ((i - b / 4) % r.min(4));
            for col in 0..n {
                g[(i, col)] = v[(col, k)] + 1e-6 * g[(i, col)];
            }
        }
        g
    }

    #[test]
    #[ignore]
    fn measure_routes() {
        let mut rng = rng(98);
        for &(m, n) in &[(64usize, 2304usize), (256, 4096)] {
            let mut cases: Vec<(String, Mat<f64>)> =
                vec![("gaussian".into(), gaussian(&mut rng, m, n))];
            for cond in [1e2f64, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e10] {
                let s: Vec<f64> = (0..m)
                    .map(|i| cond.powf(-(i as f64) / (m - 1) as f64))
                    .collect();
                let j = with_singular_values(&mut rng, n, &s).transpose().to_owned();
                cases.push((format!("cond {cond:.0e}"), j));
            }
            let mut dup = gaussian(&mut rng, m, n);
            for i in (1..m).step_by(2) {
                for k in 0..n {
                    dup[(i, k)] = 3.0 * dup[(i - 1, k)];
                }
            }
            cases.push(("duplicates".into(), dup));
            let mut zero = gaussian(&mut rng, m, n);
            for i in (0..m).step_by(3) {
                zero.row_mut(i).fill(0.0);
            }
            cases.push(("zero rows".into(), zero));
            let base = gaussian(&mut rng, m, n);
            for scale in [1e-30, 1e30] {
                cases.push((
                    format!("scale {scale:.0e}"),
                    Mat::from_fn(m, n, |i, k| base[(i, k)] * scale),
                ));
            }
            for (name, j) in &cases {
                let g = adversarial_batch(&mut rng, j, 32);
                let mut line = format!("m={m:4} n={n:5} {name:11}");
                for (label, route) in [
                    ("auto", JacobianRoute::Auto),
                    ("gram", JacobianRoute::Gram),
                    ("svd", JacobianRoute::Svd),
                ] {
                    let (r64, used64) = ratio::<f64, f64>(j, &g, route);
                    let (r32, used32) = ratio::<f32, f32>(j, &g, route);
                    let tag = |u: JacobianRoute| if u == JacobianRoute::Gram { "G" } else { "S" };
                    line += &format!(
                        "  {label}: f64 {r64:8.1e}{} f32 {r32:8.1e}{}",
                        tag(used64),
                        tag(used32)
                    );
                }
                println!("{line}");
            }
        }
    }

    #[test]
    #[ignore]
    fn measure_gram_noise() {
        // eigenvalues of J J^T that are exactly zero in exact arithmetic, relative to lambda_max
        let mut rng = rng(97);
        for &(m, n) in &[
            (64usize, 2304usize),
            (256, 65536),
            (1024, 2304),
            (1536, 4096),
            (2048, 4096),
            (2048, 2304),
        ] {
            let r = m / 2;
            let j = gaussian(&mut rng, m, r) * gaussian(&mut rng, r, n);
            for name in ["float64", "float32"] {
                let j32;
                let (gram, _) = if name == "float64" {
                    gram_pass(j.as_ref(), Mat::<f64>::zeros(0, n).as_ref(), &[(0, n)]).unwrap()
                } else {
                    j32 = cast::<f32>(j.as_ref());
                    gram_pass(j32.as_ref(), Mat::<f32>::zeros(0, n).as_ref(), &[(0, n)]).unwrap()
                };
                let top = (0..m).map(|i| gram[(i, i)]).fold(0.0, f64::max);
                let full = Mat::from_fn(m, m, |a, b| gram[(a.max(b), a.min(b))] / top);
                let (values, _) = self_adjoint_eigen(full.as_ref(), Par::Seq)
                    .unwrap()
                    .unwrap();
                let lmax = values[m - 1];
                let noise = values[..m - r]
                    .iter()
                    .fold(0.0f64, |acc, v| acc.max(v.abs()))
                    / lmax;
                let smallest_real = values[m - r] / lmax;
                println!(
                    "m={m:5} n={n:6} rank {r:5} J {name}: null eigenvalues up to {noise:8.1e} lambda_max, smallest real {smallest_real:8.1e}"
                );
            }
        }
    }
}
