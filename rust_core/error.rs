//! The one error type of the projection core. Every message names the argument and its shape,
//! so that a caller several layers up (Python) can show it unchanged.

use std::fmt;

/// Why a projection could not be built or applied.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectionError {
    /// `arg` has the wrong number of columns for the basis it is used with.
    ColumnMismatch {
        /// the argument's name as the caller sees it (`"X"`, `"G"`)
        arg: &'static str,
        /// its shape, `(rows, cols)`
        shape: (usize, usize),
        /// the number of columns it needed
        expected: usize,
        /// what fixed `expected`, e.g. "the projector was built for d=64"
        reason: String,
    },
    /// The output buffer does not have the shape of the input.
    OutputShape {
        /// the output argument's name (`"dst"`)
        arg: &'static str,
        /// the shape it has
        got: (usize, usize),
        /// the shape it needs
        expected: (usize, usize),
    },
    /// `arg` holds a NaN or an infinity.
    NonFinite {
        /// the argument's name (`"A"`, `"J"`, `"X"`, `"G"`)
        arg: &'static str,
        /// its shape
        shape: (usize, usize),
        /// the (row, column) of the first offending entry
        at: (usize, usize),
        /// the offending value, as f64
        value: f64,
    },
    /// The relative rank tolerance is negative or not a number.
    InvalidRcond {
        /// the value that was passed
        value: f64,
    },
    /// The singular value decomposition did not converge (not seen in practice for finite input).
    NoConvergence {
        /// the factored argument's name
        arg: &'static str,
        /// its shape
        shape: (usize, usize),
    },
    /// The projection of a finite `arg` has an entry beyond the largest finite value of the
    /// type it is computed in: the exact result cannot be represented.
    Overflow {
        /// the projected argument's name (`"X"`, `"G"`)
        arg: &'static str,
        /// its shape
        shape: (usize, usize),
        /// the (row, column) of the first entry that overflows
        at: (usize, usize),
        /// the type of the result, `"float32"` or `"float64"`
        dtype: &'static str,
    },
    /// An allocation failed (the call needs more memory than the allocator can give).
    OutOfMemory {
        /// what was being computed, with the shapes (filled in by the entry point)
        call: String,
        /// what the buffer was for
        buffer: &'static str,
        /// its size
        bytes: usize,
    },
}

impl ProjectionError {
    /// Names the call in an [`Self::OutOfMemory`] that does not say yet what it was part of.
    pub(crate) fn during(self, call: impl FnOnce() -> String) -> Self {
        match self {
            Self::OutOfMemory {
                call: ref c,
                buffer,
                bytes,
            } if c.is_empty() => Self::OutOfMemory {
                call: call(),
                buffer,
                bytes,
            },
            other => other,
        }
    }
}

impl fmt::Display for ProjectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ColumnMismatch { arg, shape, expected, reason } => write!(
                f,
                "{arg} has shape ({}, {}): {} columns, but {reason} ({arg} needs {expected} columns)",
                shape.0, shape.1, shape.1
            ),
            Self::OutputShape { arg, got, expected } => write!(
                f,
                "{arg} has shape ({}, {}) but the result has shape ({}, {})",
                got.0, got.1, expected.0, expected.1
            ),
            Self::NonFinite { arg, shape, at, value } => write!(
                f,
                "{arg} contains a non-finite value ({value}) at [{}, {}]; {arg} has shape ({}, {})",
                at.0, at.1, shape.0, shape.1
            ),
            Self::InvalidRcond { value } => write!(
                f,
                "rcond must be a finite number >= 0 (or None for the default), got {value}"
            ),
            Self::NoConvergence { arg, shape } => write!(
                f,
                "the singular value decomposition of {arg} (shape ({}, {})) did not converge",
                shape.0, shape.1
            ),
            Self::Overflow {
                arg,
                shape,
                at,
                dtype,
            } => {
                let max = if *dtype == "float32" {
                    format!("{:e}", f32::MAX)
                } else {
                    format!("{:e}", f64::MAX)
                };
                write!(
                    f,
                    "the projection of {arg} overflows {dtype} at [{}, {}]: the exact result \
                     exceeds the largest {dtype}, {max}; {arg} has shape ({}, {}) (scale {arg} down)",
                    at.0, at.1, shape.0, shape.1
                )
            }
            Self::OutOfMemory {
                call,
                buffer,
                bytes,
            } => {
                let call = if call.is_empty() { "a projection" } else { call };
                write!(
                    f,
                    "out of memory while {call}: allocating {bytes} bytes ({:.1} MiB) for {buffer} failed",
                    *bytes as f64 / (1u64 << 20) as f64
                )
            }
        }
    }
}

impl std::error::Error for ProjectionError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom(call: &str) -> ProjectionError {
        ProjectionError::OutOfMemory {
            call: call.to_string(),
            buffer: "the basis",
            bytes: 3 << 20,
        }
    }

    #[test]
    fn the_first_call_named_is_kept() {
        let named = oom("").during(|| "factoring A".to_string());
        assert_eq!(named, oom("factoring A"));
        assert_eq!(named.clone().during(|| "an outer call".to_string()), named);
        let other = ProjectionError::InvalidRcond { value: -1.0 };
        assert_eq!(other.clone().during(|| "x".to_string()), other);
        assert_eq!(
            named.to_string(),
            "out of memory while factoring A: allocating 3145728 bytes (3.0 MiB) for the basis failed"
        );
        assert!(oom("")
            .to_string()
            .starts_with("out of memory while a projection: "));
    }

    #[test]
    fn overflow_names_the_largest_value_of_its_type() {
        let overflow = |dtype| ProjectionError::Overflow {
            arg: "X",
            shape: (2, 3),
            at: (1, 2),
            dtype,
        };
        assert_eq!(
            overflow("float32").to_string(),
            "the projection of X overflows float32 at [1, 2]: the exact result exceeds the largest \
             float32, 3.4028235e38; X has shape (2, 3) (scale X down)"
        );
        assert!(overflow("float64")
            .to_string()
            .contains("the largest float64, 1.7976931348623157e308;"));
    }
}
