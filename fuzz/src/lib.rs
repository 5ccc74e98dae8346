//! Fuzzing the projection core: bytes are decoded into a projection problem (shapes, element
//! types, memory layouts, values, rank tolerance), the public checked API of `saerecover-core`
//! is called, and the answer is checked:
//!
//! - no panic, ever (libFuzzer reports one as a crash);
//! - an input with a NaN or infinity, a bad `rcond`, a column count that does not fit, or an
//!   output buffer of the wrong shape gives the matching [`ProjectionError`], and only then;
//! - an overflow error only where the exact result can be out of range (a row whose norm
//!   reaches the largest value of its type: `|y_ij| <= ||y_i|| <= ||x_i||`);
//! - otherwise the output has the input's shape, is finite (always: finite input never gives a
//!   non-finite result without an error), and every row meets the orthogonality bar of
//!   docs/linalg.md:
//!   `||M^T y_i|| / (||M||_2 ||x_i||) <= bar + rcond` with `bar` = 1e-5 (f32), 1e-12 (f64) and
//!   `M = A` (encoder) or `J^T` (Jacobian), for the SVD factorization.
//!
//! [`run`] is the whole check for one input; the libFuzzer target (`fuzz_targets/projection.rs`)
//! and the seeded driver (`examples/seeded.rs`, `tests/seeded.rs`) both call it.

use faer::{Mat, MatMut, MatRef, Par};
use saerecover_core::{
    jacobian_null_project, jacobian_null_project_in_place, EncoderNullProjector, Factorization,
    ProjectionError, Real,
};

/// Largest matrix side the decoder produces (keeps one case well under a millisecond).
pub const MAX_SIDE: usize = 40;

/// A cursor over the fuzz input; reads past the end give zeros, so every input decodes.
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let v = (self.u8() as usize) << 8 | self.u8() as usize;
        v % n
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
}

/// Element types the fuzzer draws, with what it needs beyond [`Real`].
pub trait Elem: Real {
    /// Orthogonality bar of docs/linalg.md for this type.
    const BAR: f64;
    /// Largest finite value, as f64.
    const LARGEST: f64;
    /// Smallest positive normal value, as f64.
    const MIN_NORMAL: f64;
    /// Any bit pattern: NaN, infinities and subnormals included.
    fn from_bits(b: &mut Bytes) -> Self;
    /// Range of binary exponents worth drawing for scaled values.
    const EXP: (i32, i32);
    /// Significand bits (rows smaller than `MIN_NORMAL * 2^MANT` are in the subnormal regime).
    const MANT: i32;
}

impl Elem for f32 {
    const BAR: f64 = 1e-5;
    const LARGEST: f64 = f32::MAX as f64;
    const MIN_NORMAL: f64 = f32::MIN_POSITIVE as f64;
    const EXP: (i32, i32) = (-149, 120);
    const MANT: i32 = 24;
    fn from_bits(b: &mut Bytes) -> Self {
        f32::from_bits(b.u32())
    }
}

impl Elem for f64 {
    const BAR: f64 = 1e-12;
    const LARGEST: f64 = f64::MAX;
    const MIN_NORMAL: f64 = f64::MIN_POSITIVE;
    const EXP: (i32, i32) = (-1074, 1000);
    const MANT: i32 = 53;
    fn from_bits(b: &mut Bytes) -> Self {
        f64::from_bits(b.u64())
    }
}

/// A matrix stored with chosen strides (negative and zero included) in its own buffer.
pub struct Strided<T> {
    buf: Vec<T>,
    offset: usize,
    rs: isize,
    cs: isize,
    nrows: usize,
    ncols: usize,
    /// Human-readable layout name, for failure messages.
    pub layout: &'static str,
}

impl<T: Real> Strided<T> {
    /// Lays `values` out in one of seven layouts (`which` modulo 7). The zero-row-stride layout
    /// (a broadcast row) copies row 0 over the other rows of `values` first, so that `values`
    /// stays what the view shows; without `allow_zero_stride` it falls back to column-major.
    pub fn new(values: &mut Mat<T>, which: u8, allow_zero_stride: bool) -> Self {
        let (m, n) = values.shape();
        let which = if m == 0 || n == 0 || (which % 7 == 6 && !allow_zero_stride) {
            0
        } else {
            which % 7
        };
        if which == 6 {
            for i in 1..m {
                for j in 0..n {
                    values[(i, j)] = values[(0, j)];
                }
            }
        }
        let (m_i, n_i) = (m as isize, n as isize);
        let (rs, cs, layout): (isize, isize, &'static str) = match which {
            0 => (1, m_i, "column-major"),
            1 => (n_i, 1, "row-major (transposed)"),
            2 => (-1, m_i, "rows reversed"),
            3 => (1, -m_i, "columns reversed"),
            4 => (3, 3 * m_i + 2, "stepped"),
            5 => (-2, -(2 * m_i + 1), "stepped, both negative"),
            _ => (0, 1, "zero row stride (broadcast row)"),
        };
        // offset so that every (i, j) lands in [0, len)
        let lo = |s: isize, len: usize| if s < 0 { s * (len as isize - 1) } else { 0 };
        let hi = |s: isize, len: usize| if s > 0 { s * (len as isize - 1) } else { 0 };
        let min = lo(rs, m) + lo(cs, n);
        let max = hi(rs, m) + hi(cs, n);
        let offset = (-min) as usize;
        let len = if m * n == 0 { 0 } else { (max - min + 1) as usize };
        let mut buf = vec![T::from_f64(-7.0); len];
        for i in 0..m {
            for j in 0..n {
                let at = offset as isize + i as isize * rs + j as isize * cs;
                buf[at as usize] = values[(i, j)];
            }
        }
        Self { buf, offset, rs, cs, nrows: m, ncols: n, layout }
    }

    pub fn view(&self) -> MatRef<'_, T> {
        if self.nrows * self.ncols == 0 {
            return MatRef::from_row_major_slice(&[], self.nrows, self.ncols);
        }
        // SAFETY: every (i, j) with i < nrows, j < ncols maps inside `buf` (see `new`), and
        // the view borrows `self`.
        unsafe {
            MatRef::from_raw_parts(
                self.buf.as_ptr().add(self.offset),
                self.nrows,
                self.ncols,
                self.rs,
                self.cs,
            )
        }
    }

    /// A mutable view; only for layouts without a zero stride (distinct elements).
    pub fn view_mut(&mut self) -> MatMut<'_, T> {
        assert!(self.rs != 0 || self.nrows <= 1, "no mutable view of a broadcast row");
        if self.nrows * self.ncols == 0 {
            return MatMut::from_row_major_slice_mut(&mut [], self.nrows, self.ncols);
        }
        // SAFETY: as in `view`, and the strides are nonzero so the elements are distinct.
        unsafe {
            MatMut::from_raw_parts_mut(
                self.buf.as_mut_ptr().add(self.offset),
                self.nrows,
                self.ncols,
                self.rs,
                self.cs,
            )
        }
    }
}

/// Draws the values of an `m x n` matrix: raw bit patterns, scaled small integers (subnormal to
/// near-overflow), Gaussian-like values at scales 1e-30 .. 1e30, low rank, duplicate and zero
/// columns, all-subnormal; then maybe one poisoned entry (NaN, +inf or -inf).
pub fn values<T: Elem>(b: &mut Bytes, m: usize, n: usize) -> (Mat<T>, &'static str) {
    let mode = b.u8() % 7;
    let (name, mut v): (&'static str, Mat<T>) = match mode {
        0 => ("raw bits", Mat::from_fn(m, n, |_, _| T::from_bits(b))),
        1 => {
            let (lo, hi) = T::EXP;
            let e = lo + b.below((hi - lo + 1) as usize) as i32;
            let scale = 2f64.powi(e / 2) * 2f64.powi(e - e / 2);
            (
                "scaled integers",
                Mat::from_fn(m, n, |_, _| T::from_f64((b.u8() as i8 as f64 / 16.0) * scale)),
            )
        }
        2 => {
            let scale = [1e-30, 1e-10, 1e-3, 1.0, 1e3, 1e10, 1e30][b.below(7)];
            (
                "gaussian-like, scale 1e-30..1e30",
                Mat::from_fn(m, n, |_, _| {
                    let s: f64 = (0..4).map(|_| b.u8() as f64 - 127.5).sum();
                    T::from_f64(s / 148.0 * scale)
                }),
            )
        }
        3 => {
            let r = 1 + b.below(m.min(n).max(1));
            let left = Mat::from_fn(m, r, |_, _| b.u8() as i8 as f64);
            let right = Mat::from_fn(r, n, |_, _| b.u8() as i8 as f64);
            let prod = &left * &right;
            ("low rank", Mat::from_fn(m, n, |i, j| T::from_f64(prod[(i, j)])))
        }
        4 => {
            let base: Mat<f64> = Mat::from_fn(m, n, |_, _| b.u8() as i8 as f64);
            let src: Vec<usize> = (0..n).map(|_| b.below(n.max(1))).collect();
            let zero: Vec<bool> = (0..n).map(|_| b.u8() % 4 == 0).collect();
            (
                "duplicate and zero columns",
                Mat::from_fn(m, n, |i, j| {
                    if zero[j] {
                        T::from_f64(0.0)
                    } else {
                        T::from_f64(base[(i, src[j])] * if j % 2 == 0 { 1.0 } else { -0.5 })
                    }
                }),
            )
        }
        5 => (
            "all subnormal",
            Mat::from_fn(m, n, |_, _| {
                T::from_f64(T::MIN_NORMAL * (b.u8() as i8 as f64) / 512.0)
            }),
        ),
        _ => ("zeros", Mat::zeros(m, n)),
    };
    if m * n > 0 && b.u8() % 12 == 0 {
        let (i, j) = (b.below(m), b.below(n));
        v[(i, j)] = T::from_f64([f64::NAN, f64::INFINITY, f64::NEG_INFINITY][b.below(3)]);
    }
    (v, name)
}

fn all_finite<T: Real>(m: MatRef<'_, T>) -> bool {
    (0..m.nrows()).all(|i| (0..m.ncols()).all(|j| m[(i, j)].is_finite_value()))
}

fn max_abs<T: Real>(m: MatRef<'_, T>) -> f64 {
    let mut worst: f64 = 0.0;
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            worst = worst.max(m[(i, j)].to_f64().abs());
        }
    }
    worst
}

/// With one more byte (one in six values of it; never for a zero byte, so that inputs that end
/// earlier decode as before), rescales the batch by a power of two so that its largest entry
/// lies within a factor 16 of the largest value of its type: rows whose products overflow
/// unless the core scales them, and whose results may be out of range. Returns a note for the
/// failure message.
fn near_overflow<T: Elem>(b: &mut Bytes, vals: &mut Mat<T>, x: &mut Strided<T>) -> &'static str {
    let choice = b.u8();
    let top = max_abs(vals.as_ref());
    if choice % 6 != 5 || !(top.is_finite() && top > 0.0) {
        return "";
    }
    let e = (T::LARGEST / top).log2().floor() as i32 - i32::from(choice / 6 % 4);
    let (f1, f2) = (T::from_f64(2f64.powi(e / 2)), T::from_f64(2f64.powi(e - e / 2)));
    let scale = |v: &mut T| *v = *v * f1 * f2;
    for j in 0..vals.ncols() {
        vals.col_mut(j).iter_mut().for_each(scale);
    }
    x.buf.iter_mut().for_each(scale);
    ", near the largest value"
}

/// `m / max|m|` in f64 (exactly representable scaling is not needed: the ratio is scale-free).
fn normalized<T: Real>(m: MatRef<'_, T>) -> Mat<f64> {
    let s = max_abs(m);
    let s = if s > 0.0 { s } else { 1.0 };
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)].to_f64() / s)
}

/// `max_i ||y_i M|| / (sigma_max(M) ||x_i||)` over rows whose largest entry is at least `lo`
/// (smaller ones are skipped: their round-off is governed by underflow, not by the projection;
/// rows up to the largest value count, since the core scales those that could overflow). `M`
/// is `d x k` with `y`, `x` `n x d`.
pub fn orthogonality_ratio<TM: Real, T: Elem>(m: MatRef<'_, TM>, x: MatRef<'_, T>, y: MatRef<'_, T>) -> f64 {
    if m.nrows() * m.ncols() == 0 || x.nrows() == 0 {
        return 0.0;
    }
    let mh = normalized(m);
    let sigma = mh
        .as_ref()
        .singular_values()
        .ok()
        .and_then(|s| s.first().copied())
        .unwrap_or(0.0);
    if sigma == 0.0 {
        return 0.0;
    }
    let xs = max_abs(x);
    let xs = if xs > 0.0 { xs } else { 1.0 };
    let lo = T::MIN_NORMAL * 2f64.powi(T::MANT);
    let mut worst: f64 = 0.0;
    for i in 0..x.nrows() {
        let row_max = (0..x.ncols()).fold(0.0f64, |a, j| a.max(x[(i, j)].to_f64().abs()));
        if !(row_max >= lo && row_max.is_finite()) {
            continue;
        }
        let xn = (0..x.ncols())
            .map(|j| (x[(i, j)].to_f64() / xs).powi(2))
            .sum::<f64>()
            .sqrt();
        let proj: f64 = (0..m.ncols())
            .map(|c| {
                (0..m.nrows())
                    .map(|r| y[(i, r)].to_f64() / xs * mh[(r, c)])
                    .sum::<f64>()
                    .powi(2)
            })
            .sum::<f64>()
            .sqrt();
        worst = worst.max(proj / (sigma * xn));
    }
    worst
}

/// Which errors the inputs call for (any of them is acceptable; none means success), and
/// whether an overflow error is possible (allowed, not required).
#[derive(Default, Debug)]
struct Expected {
    rcond: bool,
    non_finite: Vec<&'static str>,
    columns: bool,
    output: bool,
    overflow: bool,
}

impl Expected {
    fn none(&self) -> bool {
        !self.rcond && self.non_finite.is_empty() && !self.columns && !self.output
    }

    fn allows(&self, e: &ProjectionError) -> bool {
        match e {
            ProjectionError::InvalidRcond { .. } => self.rcond,
            ProjectionError::NonFinite { arg, .. } => self.non_finite.contains(arg),
            ProjectionError::ColumnMismatch { .. } => self.columns,
            ProjectionError::OutputShape { .. } => self.output,
            ProjectionError::Overflow { .. } => self.overflow,
            ProjectionError::NoConvergence { .. } | ProjectionError::OutOfMemory { .. } => false,
        }
    }
}

fn rcond(b: &mut Bytes) -> (Option<f64>, bool) {
    match b.u8() % 16 {
        0 => (Some(0.0), false),
        1 => (Some(1e-10), false),
        2 => (Some(0.25), false),
        3 => (Some(2.0), false),
        4 => (Some(-1e-6), true),
        5 => (Some(f64::NAN), true),
        6 => (Some(f64::INFINITY), true),
        _ => (None, false),
    }
}

fn par(b: &mut Bytes) -> Par {
    if b.u8() % 4 == 0 {
        Par::rayon(2)
    } else {
        Par::Seq
    }
}

/// What one case exercised, for the seeded driver's tally.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// The call returned an error, as expected.
    pub rejected: bool,
    /// The orthogonality ratio was checked (SVD, finite, in-range rows).
    pub ratio_checked: bool,
    /// The error was an overflow of the result (input near the largest value of its type).
    pub overflowed: bool,
}

impl Outcome {
    fn rejected(e: &ProjectionError) -> Self {
        Self {
            rejected: true,
            ratio_checked: false,
            overflowed: matches!(e, ProjectionError::Overflow { .. }),
        }
    }

    fn accepted(ratio_checked: bool) -> Self {
        Self { rejected: false, ratio_checked, overflowed: false }
    }
}

/// Decodes one case from `data`, runs it, and panics if a property fails.
pub fn run(data: &[u8]) -> Outcome {
    let mut b = Bytes::new(data);
    match b.u8() % 6 {
        0 => encoder::<f32, f32>(&mut b),
        1 => encoder::<f64, f64>(&mut b),
        2 => encoder::<f64, f32>(&mut b),
        3 => jacobian::<f32, f32>(&mut b),
        4 => jacobian::<f64, f64>(&mut b),
        _ => {
            if b.u8() % 2 == 0 {
                jacobian::<f32, f64>(&mut b)
            } else {
                jacobian::<f64, f32>(&mut b)
            }
        }
    }
}

/// Whether a row of `x` has a norm of at least 0.99 times the largest value of `T`: the only
/// rows whose projection can be out of range.
fn may_overflow<T: Elem>(x: MatRef<'_, T>) -> bool {
    (0..x.nrows()).any(|i| {
        let top = (0..x.ncols()).fold(0.0f64, |a, j| a.max(x[(i, j)].to_f64().abs()));
        if !top.is_finite() || top == 0.0 {
            return false;
        }
        let norm = (0..x.ncols())
            .map(|j| (x[(i, j)].to_f64() / top).powi(2))
            .sum::<f64>()
            .sqrt();
        norm >= 0.99 * (T::LARGEST / top)
    })
}

fn check_output<TM: Real, T: Elem>(
    what: &str,
    m: MatRef<'_, TM>,
    x: MatRef<'_, T>,
    y: MatRef<'_, T>,
    rcond: f64,
    svd: bool,
) -> bool {
    assert_eq!(y.shape(), x.shape(), "{what}: output shape");
    assert!(
        all_finite(y),
        "{what}: non-finite output for finite input (max |M| {:e}, max |input| {:e})",
        max_abs(m),
        max_abs(x)
    );
    if !svd {
        return false;
    }
    let ratio = orthogonality_ratio(m, x, y);
    assert!(
        ratio <= T::BAR + rcond,
        "{what}: orthogonality ratio {ratio:e} above the bar {:e} (+ rcond {rcond:e})",
        T::BAR
    );
    true
}

/// A (d x k) in `TA`, X (n x d) in `T`.
fn encoder<TA: Elem, T: Elem>(b: &mut Bytes) -> Outcome {
    let (d, k, n) = (b.below(MAX_SIDE + 1), b.below(MAX_SIDE + 1), b.below(MAX_SIDE + 1));
    let (rc, rc_bad) = rcond(b);
    let method = if b.u8() % 5 == 0 { Factorization::ColPivQr } else { Factorization::Svd };
    let (mut a_vals, a_kind) = values::<TA>(b, d, k);
    let a = Strided::new(&mut a_vals, b.u8(), true);
    let p = par(b);
    let what = format!(
        "encoder A {d}x{k} {} ({a_kind}, {}), rcond {rc:?}, {method:?}",
        TA::NAME,
        a.layout
    );
    let mut expected = Expected { rcond: rc_bad, ..Default::default() };
    if !all_finite(a.view()) {
        expected.non_finite.push("A");
    }
    let proj = match EncoderNullProjector::from_matrix_with(a.view(), rc, method, p) {
        Err(e) => {
            assert!(expected.allows(&e), "{what}: unexpected error {e}");
            return Outcome::rejected(&e);
        }
        Ok(proj) => {
            assert!(expected.none(), "{what}: accepted input that needs an error: {expected:?}");
            proj
        }
    };
    assert!(proj.rank() <= d.min(k), "{what}: rank {} > min(d, k)", proj.rank());
    assert_eq!((proj.d(), proj.k()), (d, k), "{what}: dimensions");
    let used_rcond = proj.span_basis().rcond();

    // X: usually d columns, sometimes not
    let cols = if b.u8() % 16 == 0 { d + 1 + b.below(3) } else { d };
    let (mut x_vals, x_kind) = values::<T>(b, n, cols);
    let in_place = b.u8() % 3 == 0;
    let mut x = Strided::new(&mut x_vals, b.u8(), !in_place);
    let wrong_dst = !in_place && b.u8() % 12 == 0;
    let near = near_overflow(b, &mut x_vals, &mut x);
    let what = format!("{what}; X {n}x{cols} {} ({x_kind}{near}, {})", T::NAME, x.layout);
    let mut expected = Expected { columns: cols != d, overflow: may_overflow(x.view()), ..Default::default() };
    if !all_finite(x.view()) {
        expected.non_finite.push("X");
    }
    expected.output = wrong_dst;
    let result = if in_place {
        proj.apply_in_place(x.view_mut(), p).map(|()| None)
    } else {
        let mut y = Mat::<T>::zeros(n + usize::from(wrong_dst), cols);
        proj.apply(y.as_mut(), x.view(), p).map(|()| Some(y))
    };
    let y = match result {
        Err(e) => {
            assert!(expected.allows(&e), "{what}: unexpected error {e}");
            return Outcome::rejected(&e);
        }
        Ok(y) => {
            assert!(expected.none(), "{what}: accepted input that needs an error: {expected:?}");
            y
        }
    };
    let y = y.unwrap_or_else(|| x.view().to_owned());
    let svd = method == Factorization::Svd;
    let checked = check_output(&what, a_vals.as_ref(), x_vals.as_ref(), y.as_ref(), used_rcond, svd);
    Outcome::accepted(checked)
}

/// J (m x n) in `TJ`, G (b x n) in `T`.
fn jacobian<TJ: Elem, T: Elem>(b: &mut Bytes) -> Outcome {
    let (m, n, rows) = (b.below(MAX_SIDE + 1), b.below(MAX_SIDE + 1), b.below(MAX_SIDE + 1));
    let (rc, rc_bad) = rcond(b);
    let (mut j_vals, j_kind) = values::<TJ>(b, m, n);
    let j = Strided::new(&mut j_vals, b.u8(), true);
    let cols = if b.u8() % 16 == 0 { n + 1 + b.below(3) } else { n };
    let (mut g_vals, g_kind) = values::<T>(b, rows, cols);
    let in_place = b.u8() % 3 == 0;
    let mut g = Strided::new(&mut g_vals, b.u8(), !in_place);
    let p = par(b);
    let wrong_dst = !in_place && b.u8() % 12 == 0;
    let near = near_overflow(b, &mut g_vals, &mut g);
    let what = format!(
        "jacobian J {m}x{n} {} ({j_kind}, {}), G {rows}x{cols} {} ({g_kind}{near}, {}), rcond {rc:?}",
        TJ::NAME,
        j.layout,
        T::NAME,
        g.layout
    );
    let mut expected = Expected {
        rcond: rc_bad,
        columns: cols != n,
        output: wrong_dst,
        overflow: may_overflow(g.view()),
        ..Default::default()
    };
    if !all_finite(j.view()) {
        expected.non_finite.push("J");
    }
    if !all_finite(g.view()) {
        expected.non_finite.push("G");
    }
    let result = if in_place {
        jacobian_null_project_in_place(g.view_mut(), j.view(), rc, p).map(|r| (r, None))
    } else {
        let mut y = Mat::<T>::zeros(rows + usize::from(wrong_dst), cols);
        jacobian_null_project(y.as_mut(), j.view(), g.view(), rc, p).map(|r| (r, Some(y)))
    };
    let (rank, y) = match result {
        Err(e) => {
            assert!(expected.allows(&e), "{what}: unexpected error {e}");
            return Outcome::rejected(&e);
        }
        Ok(ok) => {
            assert!(expected.none(), "{what}: accepted input that needs an error: {expected:?}");
            ok
        }
    };
    assert!(rank <= m.min(n), "{what}: rank {rank} > min(m, n)");
    let y = y.unwrap_or_else(|| g.view().to_owned());
    let used_rcond = rc.unwrap_or_else(|| saerecover_core::SpanBasis::default_rcond(n, m));
    let checked = check_output(&what, j_vals.transpose(), g_vals.as_ref(), y.as_ref(), used_rcond, true);
    Outcome::accepted(checked)
}

/// Seeded random inputs for machines without libFuzzer.
pub mod seeded {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// splitmix64: a small, well-mixed, reproducible stream.
    pub struct SplitMix64(pub u64);

    impl SplitMix64 {
        pub fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// What a batch of cases exercised.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct Tally {
        pub cases: u64,
        pub rejected: u64,
        pub ratio_checked: u64,
        pub overflowed: u64,
    }

    /// Runs `cases` inputs of random length (up to `max_len` bytes); on a failure calls
    /// `on_failure(index, bytes)` and re-raises the panic.
    pub fn run_many(cases: u64, seed: u64, max_len: usize, on_failure: impl Fn(u64, &[u8])) -> Tally {
        let mut rng = SplitMix64(seed);
        let mut tally = Tally::default();
        let mut bytes = Vec::with_capacity(max_len);
        for i in 0..cases {
            let len = (rng.next() as usize) % (max_len + 1);
            bytes.clear();
            while bytes.len() < len {
                bytes.extend_from_slice(&rng.next().to_le_bytes());
            }
            bytes.truncate(len);
            match catch_unwind(AssertUnwindSafe(|| super::run(&bytes))) {
                Ok(outcome) => {
                    tally.cases += 1;
                    tally.rejected += u64::from(outcome.rejected);
                    tally.ratio_checked += u64::from(outcome.ratio_checked);
                    tally.overflowed += u64::from(outcome.overflowed);
                }
                Err(panic) => {
                    on_failure(i, &bytes);
                    std::panic::resume_unwind(panic);
                }
            }
        }
        tally
    }
}
