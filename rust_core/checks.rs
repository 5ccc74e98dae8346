//! Input checks shared by the projections. They return errors and never panic.

use crate::error::ProjectionError;
use crate::scalar::Real;
use faer::MatRef;

/// Validates a relative rank tolerance; `None` (the default) is always valid.
pub fn check_rcond(rcond: Option<f64>) -> Result<(), ProjectionError> {
    match rcond {
        Some(value) if !(value.is_finite() && value >= 0.0) => {
            Err(ProjectionError::InvalidRcond { value })
        }
        _ => Ok(()),
    }
}

/// Errors with the position of the first NaN or infinity in `m`, if any.
pub fn check_finite<T: Real>(arg: &'static str, m: MatRef<'_, T>) -> Result<(), ProjectionError> {
    match find_non_finite(m) {
        None => Ok(()),
        Some((i, j)) => Err(ProjectionError::NonFinite {
            arg,
            shape: m.shape(),
            at: (i, j),
            value: m[(i, j)].to_f64(),
        }),
    }
}

/// Whether every entry of `m` is finite (one vectorized pass along the smaller stride).
pub fn all_finite<T: Real>(m: MatRef<'_, T>) -> bool {
    max_abs_finite(m).is_some()
}

/// The largest `|entry|` of `m` (0 when it is empty), or `None` when it holds a NaN or an
/// infinity; one vectorized pass along the smaller stride.
pub fn max_abs_finite<T: Real>(m: MatRef<'_, T>) -> Option<T> {
    let larger = |a: T, b: T| if b > a { b } else { a };
    let mut largest = T::from_f64(0.0);
    let lines = along_smaller_stride(m);
    for j in 0..lines.ncols() {
        let line = lines.col(j);
        let top = match line.try_as_col_major() {
            Some(contiguous) => T::max_abs_finite(contiguous.as_slice())?,
            None => (0..line.nrows()).try_fold(T::from_f64(0.0), |top, i| {
                let x = line[i];
                x.is_finite_value().then(|| larger(top, x.abs_value()))
            })?,
        };
        largest = larger(largest, top);
    }
    Some(largest)
}

/// `m`, or its transpose, so that its columns run along the smaller stride.
fn along_smaller_stride<T>(m: MatRef<'_, T>) -> MatRef<'_, T> {
    if m.row_stride().unsigned_abs() > m.col_stride().unsigned_abs() {
        m.transpose()
    } else {
        m
    }
}

/// Errors unless `m` has `expected` columns; `reason` says where `expected` came from.
pub fn check_cols<T>(
    arg: &'static str,
    m: MatRef<'_, T>,
    expected: usize,
    reason: impl FnOnce() -> String,
) -> Result<(), ProjectionError> {
    if m.ncols() == expected {
        Ok(())
    } else {
        Err(ProjectionError::ColumnMismatch {
            arg,
            shape: m.shape(),
            expected,
            reason: reason(),
        })
    }
}

/// Errors unless the output buffer `dst` has the shape `expected`.
pub fn check_output_shape(
    dst: (usize, usize),
    expected: (usize, usize),
) -> Result<(), ProjectionError> {
    if dst == expected {
        Ok(())
    } else {
        Err(ProjectionError::OutputShape {
            arg: "dst",
            got: dst,
            expected,
        })
    }
}

/// The (row, column) of the first non-finite entry of `m`, scanning along the smaller stride.
fn find_non_finite<T: Real>(m: MatRef<'_, T>) -> Option<(usize, usize)> {
    let transposed = m.row_stride().unsigned_abs() > m.col_stride().unsigned_abs();
    let lines = if transposed { m.transpose() } else { m };
    for j in 0..lines.ncols() {
        let line = lines.col(j);
        let clean = match line.try_as_col_major() {
            Some(contiguous) => T::all_finite(contiguous.as_slice()),
            None => (0..line.nrows()).all(|i| line[i].is_finite_value()),
        };
        if !clean {
            let i = (0..line.nrows()).find(|&i| !line[i].is_finite_value())?;
            return Some(if transposed { (j, i) } else { (i, j) });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    #[test]
    fn rcond_validation() {
        assert!(check_rcond(None).is_ok());
        assert!(check_rcond(Some(0.0)).is_ok());
        assert!(check_rcond(Some(1e-6)).is_ok());
        for bad in [-1e-12, f64::NAN, f64::INFINITY] {
            let err = check_rcond(Some(bad)).unwrap_err();
            assert!(err.to_string().contains("rcond"), "{err}");
        }
    }

    #[test]
    fn finds_first_non_finite_in_any_layout() {
        let mut m = Mat::<f32>::zeros(7, 19);
        assert!(check_finite("X", m.as_ref()).is_ok());
        m[(5, 17)] = f32::INFINITY;
        m[(6, 2)] = f32::NAN;
        // the scan runs in memory order: it meets (6, 2) before (5, 17)
        match check_finite("X", m.as_ref()).unwrap_err() {
            ProjectionError::NonFinite {
                arg,
                shape,
                at,
                value,
            } => {
                assert_eq!((arg, shape, at), ("X", (7, 19), (6, 2)));
                assert!(value.is_nan());
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = check_finite("G", m.as_ref().transpose()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("G contains a non-finite value (NaN) at [2, 6]"),
            "{msg}"
        );
        assert!(msg.contains("shape (19, 7)"), "{msg}");
        // strided view with negative row stride
        let err = check_finite("A", m.as_ref().reverse_rows()).unwrap_err();
        assert!(err.to_string().contains("at [0, 2]"), "{err}");
    }

    #[test]
    fn column_and_output_checks() {
        let m = Mat::<f64>::zeros(3, 63);
        let err = check_cols("X", m.as_ref(), 64, || {
            "the projector was built for d=64".into()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "X has shape (3, 63): 63 columns, but the projector was built for d=64 (X needs 64 columns)"
        );
        assert!(check_output_shape((3, 4), (3, 4)).is_ok());
        assert!(check_output_shape((4, 3), (3, 4)).is_err());
    }
}
