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
    /// The largest finite value.
    const MAX: Self;
    /// Neither NaN nor infinite.
    fn is_finite_value(self) -> bool;
    /// `|self|`.
    fn abs_value(self) -> Self;
    /// The largest `|x|` of `xs` (0 when empty), or `None` when one of them is NaN or
    /// infinite; one branch-free pass in eight lanes, so that it vectorizes.
    #[inline]
    fn max_abs_finite(xs: &[Self]) -> Option<Self> {
        let zero = Self::from_f64(0.0);
        let (mut top, mut bad) = ([zero; 8], [false; 8]);
        let mut chunks = xs.chunks_exact(8);
        for chunk in &mut chunks {
            for ((t, b), &x) in top.iter_mut().zip(bad.iter_mut()).zip(chunk) {
                let a = x.abs_value();
                // true for NaN and for +-inf
                *b |= !(a <= Self::MAX);
                *t = if a > *t { a } else { *t };
            }
        }
        for &x in chunks.remainder() {
            let a = x.abs_value();
            bad[0] |= !(a <= Self::MAX);
            top[0] = if a > top[0] { a } else { top[0] };
        }
        let largest = top.iter().fold(zero, |m, &t| if t > m { t } else { m });
        (!bad.iter().any(|&b| b)).then_some(largest)
    }
    /// Whether every element of `xs` is finite.
    #[inline]
    fn all_finite(xs: &[Self]) -> bool {
        Self::max_abs_finite(xs).is_some()
    }
    /// Picks, of a value stored once per element type, the copy in this type (the f32 copy is
    /// made on demand, so that f64 callers never pay for it).
    fn pick<'a, E>(
        as_f32: impl FnOnce() -> Result<&'a Mat<f32>, E>,
        as_f64: &'a Mat<f64>,
    ) -> Result<&'a Mat<Self>, E>;
    /// `m` itself when this type is `f64`, so that f64 data is used without a copy.
    fn as_f64(m: MatRef<'_, Self>) -> Option<MatRef<'_, f64>>;
    /// [`Self::as_f64`] for a mutable view; gives the view back when this type is not `f64`.
    fn as_f64_mut(m: MatMut<'_, Self>) -> Result<MatMut<'_, f64>, MatMut<'_, Self>>;
}

impl Real for f32 {
    const NAME: &'static str = "float32";
    const MAX: Self = f32::MAX;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn pick<'a, E>(
        as_f32: impl FnOnce() -> Result<&'a Mat<f32>, E>,
        _: &'a Mat<f64>,
    ) -> Result<&'a Mat<Self>, E> {
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
    #[inline(always)]
    fn abs_value(self) -> Self {
        self.abs()
    }
}

impl Real for f64 {
    const NAME: &'static str = "float64";
    const MAX: Self = f64::MAX;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn pick<'a, E>(
        _: impl FnOnce() -> Result<&'a Mat<f32>, E>,
        as_f64: &'a Mat<f64>,
    ) -> Result<&'a Mat<Self>, E> {
        Ok(as_f64)
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
    #[inline(always)]
    fn abs_value(self) -> Self {
        self.abs()
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}
