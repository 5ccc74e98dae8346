//! Test helpers: random and adversarial matrices, and straightforward references
//! (Gram-Schmidt run twice, explicit ratios) that share no code with the projections.

use crate::scalar::Real;
use crate::span_basis::SpanBasis;
use faer::{Mat, MatRef, Par};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard normal entries (Box-Muller).
pub fn gaussian(rng: &mut StdRng, nrows: usize, ncols: usize) -> Mat<f64> {
    Mat::from_fn(nrows, ncols, |_, _| {
        let (u1, u2): (f64, f64) = (rng.random(), rng.random());
        (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    })
}

pub fn cast<T: Real>(m: MatRef<'_, f64>) -> Mat<T> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| T::from_f64(m[(i, j)]))
}

pub fn widen<T: Real>(m: MatRef<'_, T>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)].to_f64())
}

/// An orthonormal basis of the span of `m`'s columns by modified Gram-Schmidt run twice,
/// dropping columns whose remainder is below `drop * (largest column norm)`.
pub fn gram_schmidt(m: MatRef<'_, f64>, drop: f64) -> Mat<f64> {
    let d = m.nrows();
    let largest = (0..m.ncols())
        .map(|j| m.col(j).norm_l2())
        .fold(0.0, f64::max);
    let mut kept: Vec<Vec<f64>> = Vec::new();
    for j in 0..m.ncols() {
        let mut v: Vec<f64> = (0..d).map(|i| m[(i, j)]).collect();
        for _ in 0..2 {
            for q in &kept {
                let c: f64 = q.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(q).for_each(|(x, q)| *x -= c * q);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > drop * largest {
            kept.push(v.iter().map(|x| x / norm).collect());
        }
    }
    Mat::from_fn(d, kept.len(), |i, j| kept[j][i])
}

/// `d x s.len()` matrix with singular values `s` and random singular vectors.
pub fn with_singular_values(rng: &mut StdRng, d: usize, s: &[f64]) -> Mat<f64> {
    let k = s.len();
    let q1 = gram_schmidt(gaussian(rng, d, k).as_ref(), 1e-8);
    let q2 = gram_schmidt(gaussian(rng, k, k).as_ref(), 1e-8);
    Mat::from_fn(d, k, |i, j| {
        (0..k).map(|l| q1[(i, l)] * s[l] * q2[(j, l)]).sum()
    })
}

/// `max |U^T U - I|`.
pub fn orthonormality_error(u: MatRef<'_, f64>) -> f64 {
    let gram = u.transpose() * u;
    let mut worst: f64 = 0.0;
    for i in 0..gram.nrows() {
        for j in 0..gram.ncols() {
            let target = if i == j { 1.0 } else { 0.0 };
            worst = worst.max((gram[(i, j)] - target).abs());
        }
    }
    worst
}

/// `x - x Q Q^T` in f64 for an orthonormal reference `Q`.
pub fn reference_project(q: MatRef<'_, f64>, x: MatRef<'_, f64>) -> Mat<f64> {
    let coeff = x * q;
    x - coeff * q.transpose()
}

/// Applies `b` to a copy of `x`.
pub fn project<T: Real>(b: &SpanBasis, x: MatRef<'_, T>) -> Mat<T> {
    let mut y = Mat::<T>::zeros(x.nrows(), x.ncols());
    b.project_out("X", y.as_mut(), x, Par::Seq).unwrap();
    y
}

pub fn max_abs_diff<T: Real>(a: MatRef<'_, T>, b: MatRef<'_, T>) -> f64 {
    let mut worst: f64 = 0.0;
    for i in 0..a.nrows() {
        for j in 0..a.ncols() {
            worst = worst.max((a[(i, j)].to_f64() - b[(i, j)].to_f64()).abs());
        }
    }
    worst
}

/// The largest singular value, computed on a copy scaled by a power of two to a largest entry
/// near 1 (faer's SVD does not converge for entries near 1e300).
pub fn reference_sigma_max(a: MatRef<'_, f64>) -> f64 {
    let top = a.norm_max();
    if top == 0.0 || a.nrows() * a.ncols() == 0 {
        return 0.0;
    }
    let scale = 2f64.powi(top.log2().floor() as i32);
    let scaled = Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] / scale);
    scaled.singular_values().unwrap()[0] * scale
}

/// The acceptance measure: `max_i ||M^T y_i|| / (||M||_2 ||x_i||)` over the rows, computed in
/// f64 (rows with `x_i = 0` are skipped). `M` is `d x k` (`A`, or `J^T`).
pub fn orthogonality_ratio<T: Real>(m: MatRef<'_, f64>, x: MatRef<'_, T>, y: MatRef<'_, T>) -> f64 {
    let top = if m.nrows() * m.ncols() == 0 {
        0.0
    } else {
        m.norm_max()
    };
    if top == 0.0 {
        return 0.0;
    }
    // the ratio does not depend on the scale of M; a power of two keeps M^T y in range
    let scale = 2f64.powi(top.log2().floor() as i32);
    let m = Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] / scale);
    let sigma = reference_sigma_max(m.as_ref());
    let (x, y) = (widen(x), widen(y));
    let mty = y.as_ref() * &m;
    let mut worst: f64 = 0.0;
    for i in 0..x.nrows() {
        let xn = x.row(i).norm_l2();
        if xn > 0.0 {
            worst = worst.max(mty.row(i).norm_l2() / (sigma * xn));
        }
    }
    worst
}
