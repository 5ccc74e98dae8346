//! saerecover-core: the projection math of saerecover (see docs/linalg.md).
//!
//! - [`EncoderNullProjector`]: factor the selected encoder columns `A_S` once, then remove
//!   their span from whole batches of rows (constraint C1 of PAPER_NOTES.md).
//! - [`jacobian_null_project`]: remove the row space of a Jacobian `J` from a batch, through
//!   the Gram matrix `J J^T` in f64 when that is accurate, else a thin SVD of `J^T`
//!   ([`JacobianRoute`]).
//! - [`SpanBasis`]: the orthonormal basis with a rank tolerance that both are built on.
//!
//! Pure Rust over faer views; parallelism is an explicit argument. The Python binding lives
//! in `python.rs`, behind the `python` feature.

mod checks;
mod encoder_null;
mod error;
mod jacobian_null;
mod memory;
mod scalar;
mod span_basis;

#[cfg(feature = "python")]
mod python;
#[cfg(test)]
mod testing;

pub use encoder_null::EncoderNullProjector;
pub use error::ProjectionError;
pub use jacobian_null::{
    gram_max_cond, jacobian_null_project, jacobian_null_project_in_place,
    jacobian_null_project_in_place_with, jacobian_null_project_with, JacobianInfo, JacobianRoute,
    GRAM_NOISE,
};
pub use scalar::Real;
pub use span_basis::{Factorization, SpanBasis};

/// `Par::Seq` on one rayon thread, else all threads of rayon's global pool (which honours
/// `RAYON_NUM_THREADS`). Also `Par::Seq` when the pool could not be started (threads refused
/// under a tight memory limit): rayon then panics on every use of its global pool, so the core
/// stays on the calling thread for the rest of the process instead.
pub fn default_par() -> faer::Par {
    if !global_pool_started() {
        return faer::Par::Seq;
    }
    match rayon::current_num_threads() {
        0 | 1 => faer::Par::Seq,
        n => faer::Par::rayon(n),
    }
}

/// Starts rayon's global pool if it is not running yet, fallibly (rayon's implicit start
/// panics when it cannot spawn the threads); whether it runs.
fn global_pool_started() -> bool {
    static STARTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| match rayon::ThreadPoolBuilder::new().build_global() {
        Ok(()) => true,
        // an I/O error is a failed start; the other errors mean that it runs already
        Err(e) => std::error::Error::source(&e).is_none(),
    })
}

/// Parallelism for factoring an `nrows x ncols` matrix: `Par::Seq` when the smaller side is at
/// most 256 (faer's SVD loses time to threads there: 768 x 64 took 4.8 ms on 4 threads and 7.0
/// ms on 16, see docs/linalg.md), else [`default_par`].
pub fn factor_par(nrows: usize, ncols: usize) -> faer::Par {
    if factor_on_one_thread(nrows, ncols) {
        faer::Par::Seq
    } else {
        default_par()
    }
}

/// Whether factoring an `nrows x ncols` matrix is faster on one thread (the smaller side at
/// most 256; see [`factor_par`]).
pub(crate) fn factor_on_one_thread(nrows: usize, ncols: usize) -> bool {
    nrows.min(ncols) <= 256
}

/// Parallelism for a call of about `flops` floating-point operations: `Par::Seq` below 1e7
/// (waking a second rayon thread costs more than it saves there: an encoder apply at d = 768,
/// k = 8, n = 64 took 123 us on two threads and 36 us on one, see docs/linalg.md), else
/// [`default_par`].
pub fn work_par(flops: f64) -> faer::Par {
    if flops < 1e7 {
        faer::Par::Seq
    } else {
        default_par()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Par;

    #[test]
    fn parallelism_follows_the_documented_thresholds() {
        // every thread of rayon's pool, or one when it has one
        let all = default_par();
        match rayon::current_num_threads() {
            1 => assert_eq!(all, Par::Seq),
            n => assert_eq!(all, Par::rayon(n)),
        }
        assert!(factor_on_one_thread(256, 100_000) && factor_on_one_thread(100_000, 256));
        assert!(!factor_on_one_thread(257, 257));
        assert_eq!(factor_par(256, 4096), Par::Seq);
        assert_eq!(factor_par(257, 4096), all);
        assert_eq!(work_par(9.99e6), Par::Seq);
        assert_eq!(work_par(1e7), all);
        assert_eq!(work_par(1e12), all);
    }
}
