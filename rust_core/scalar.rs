//! The element types the projections run in: `f32` and `f64`.
//!
//! Factorizations always run in `f64` (the factored matrices are small); the batch a basis is
//! applied to keeps its own type, and the basis is stored once in each type.

use faer::traits::RealField;
use faer::{Mat, MatMut, MatRef};

/// A real floating-point element type supported by the projections (`f32` or `f64`).
pub trait Real: RealField + Copy + Send + Sync + 'static + private::Sealed {
    /// `"float32"` or `"float64"`, as NumPy spells it.
    const NAME: &'static str;
    /// Exact widening to `f64`.
    fn to_f64(self) -> f64;
    /// Rounding to this type.
    fn from_f64(x: f64) -> Self;
    /// Neither NaN nor infinite.
    fn is_finite_value(self) -> bool;
    /// Whether every element of `xs` is finite (branch-free, so that it vectorizes).
    fn all_finite(xs: &[Self]) -> bool;
    /// Picks, of a value stored once per element type, the copy in this type (the f32 copy is
    /// made on demand, so that f64 callers never pay for it).
    fn pick<'a>(as_f32: impl FnOnce() -> &'a Mat<f32>, as_f64: &'a Mat<f64>) -> &'a Mat<Self>;
    /// `m` itself when this type is `f64`, so that f64 data is used without a copy.
    fn as_f64(m: MatRef<'_, Self>) -> Option<MatRef<'_, f64>>;
    /// [`Self::as_f64`] for a mutable view; gives the view back when this type is not `f64`.
    fn as_f64_mut(m: MatMut<'_, Self>) -> Result<MatMut<'_, f64>, MatMut<'_, Self>>;
}

impl Real for f32 {
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn pick<'a>(as_f32: impl FnOnce() -> &'a Mat<f32>, _: &'a Mat<f64>) -> &'a Mat<Self> {
        as_f32()
    }
    #[inline(always)]
    fn as_f64(_: MatRef<'_, Self>) -> Option<MatRef<'_, f64>> {
        None
    }
    #[inline(always)]
    fn as_f64_mut(m: MatMut<'_, Self>) -> Result<MatMut<'_, f64>, MatMut<'_, Self>> {
        Err(m)
    }
    #[inline(always)]
    fn is_finite_value(self) -> bool {
        self.is_finite()
    }
    #[inline]
    fn all_finite(xs: &[Self]) -> bool {
        // x * 0 is 0 for finite x and NaN for NaN or +-inf; eight independent lanes vectorize.
        let mut lanes = [0.0; 8];
        let mut chunks = xs.chunks_exact(8);
        for chunk in &mut chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                *lane += x * 0.0;
            }
        }
        let tail = chunks.remainder().iter().fold(0.0, |acc, &x| acc + x * 0.0);
        lanes.iter().sum::<Self>() + tail == 0.0
    }
}

impl Real for f64 {
    const NAME: &'static str = "float64";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn pick<'a>(_: impl FnOnce() -> &'a Mat<f32>, as_f64: &'a Mat<f64>) -> &'a Mat<Self> {
        as_f64
    }
    #[inline(always)]
    fn as_f64(m: MatRef<'_, Self>) -> Option<MatRef<'_, f64>> {
        Some(m)
    }
    #[inline(always)]
    fn as_f64_mut(m: MatMut<'_, Self>) -> Result<MatMut<'_, f64>, MatMut<'_, Self>> {
        Ok(m)
    }
    #[inline(always)]
    fn is_finite_value(self) -> bool {
        self.is_finite()
    }
    #[inline]
    fn all_finite(xs: &[Self]) -> bool {
        // x * 0 is 0 for finite x and NaN for NaN or +-inf; eight independent lanes vectorize.
        let mut lanes = [0.0; 8];
        let mut chunks = xs.chunks_exact(8);
        for chunk in &mut chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                *lane += x * 0.0;
            }
        }
        let tail = chunks.remainder().iter().fold(0.0, |acc, &x| acc + x * 0.0);
        lanes.iter().sum::<Self>() + tail == 0.0
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}
