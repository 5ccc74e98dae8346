//! Allocation that fails with an error instead of aborting the process. Every buffer of the
//! core whose size depends on the input comes from here, so that running out of memory (a
//! `ulimit -v`, a container limit) is a [`ProjectionError::OutOfMemory`] naming the buffer and
//! its size; the entry points add the shapes ([`ProjectionError::during`]).
//!
//! Two kinds of allocation stay outside the core's control (docs/linalg.md, "Memory"): faer's
//! own small temporaries (`O(m)` vectors inside its factorizations) and the packing buffer that
//! faer's x86 matrix product (private-gemm) keeps per thread, about twice the L3 cache, which it
//! allocates infallibly on a thread's first product. [`prepare_threads`] makes that first
//! product happen early, after a fallible probe of the same size.

use crate::error::ProjectionError;
use faer::dyn_stack::{MemBuffer, StackReq};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The error for a failed allocation of `bytes` for `buffer`; the call is named later.
pub(crate) fn out_of_memory(buffer: &'static str, bytes: usize) -> ProjectionError {
    ProjectionError::OutOfMemory {
        call: String::new(),
        buffer,
        bytes,
    }
}

/// An `nrows x ncols` matrix with entries `f(i, j)`, or an error if it cannot be allocated.
pub(crate) fn try_mat<T>(
    buffer: &'static str,
    nrows: usize,
    ncols: usize,
    f: impl FnMut(usize, usize) -> T,
) -> Result<Mat<T>, ProjectionError> {
    let mut m = Mat::new();
    try_resize(buffer, &mut m, nrows, ncols, f)?;
    Ok(m)
}

/// [`try_mat`] filled with zeros.
pub(crate) fn try_zeros<T: crate::Real>(
    buffer: &'static str,
    nrows: usize,
    ncols: usize,
) -> Result<Mat<T>, ProjectionError> {
    try_mat(buffer, nrows, ncols, |_, _| T::from_f64(0.0))
}

/// `m` resized to `nrows x ncols` (new entries `f(i, j)`), reserving the memory fallibly first.
pub(crate) fn try_resize<T>(
    buffer: &'static str,
    m: &mut Mat<T>,
    nrows: usize,
    ncols: usize,
    f: impl FnMut(usize, usize) -> T,
) -> Result<(), ProjectionError> {
    let bytes = nrows
        .saturating_mul(ncols)
        .saturating_mul(std::mem::size_of::<T>());
    m.try_reserve(nrows, ncols)
        .map_err(|_| out_of_memory(buffer, bytes))?;
    m.resize_with(nrows, ncols, f);
    Ok(())
}

/// Scratch memory for a faer factorization.
pub(crate) fn try_scratch(
    buffer: &'static str,
    req: StackReq,
) -> Result<MemBuffer, ProjectionError> {
    MemBuffer::try_new(req).map_err(|_| out_of_memory(buffer, req.size_bytes()))
}

/// A vector of `len` copies of `value`.
pub(crate) fn try_vec<T: Clone>(
    buffer: &'static str,
    len: usize,
    value: T,
) -> Result<Vec<T>, ProjectionError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| out_of_memory(buffer, len.saturating_mul(std::mem::size_of::<T>())))?;
    v.resize(len, value);
    Ok(v)
}

const GEMM_BUFFER: &str =
    "the matrix-product packing buffer of a thread (about twice the L3 cache)";

/// Gives every thread that a call with `par` may run matrix products on (the calling thread,
/// and with several threads every thread of the current rayon pool) its GEMM packing buffer
/// now, after a fallible probe of its size: a thread's first product would otherwise allocate it
/// infallibly, and a failure there aborts the process. A thread is prepared once; later calls
/// cost a thread-local read (the global pool is prepared once; a pool the caller runs inside
/// of gets one rayon broadcast per call).
pub(crate) fn prepare_threads(par: Par) -> Result<(), ProjectionError> {
    static GLOBAL_POOL_READY: AtomicBool = AtomicBool::new(false);
    prepare_this_thread()?;
    // outside any pool, the work goes to the global one
    let global = rayon::current_thread_index().is_none();
    if par.degree() > 1 && !(global && GLOBAL_POOL_READY.load(Ordering::Acquire)) {
        rayon::broadcast(|_| prepare_this_thread())
            .into_iter()
            .collect::<Result<(), _>>()?;
        if global {
            GLOBAL_POOL_READY.store(true, Ordering::Release);
        }
    }
    Ok(())
}

thread_local! {
    static GEMM_READY: Cell<bool> = const { Cell::new(false) };
}

fn prepare_this_thread() -> Result<(), ProjectionError> {
    if GEMM_READY.with(Cell::get) {
        return Ok(());
    }
    let bytes = gemm_buffer_bytes();
    let mut probe = Vec::<u8>::new();
    probe
        .try_reserve_exact(bytes)
        .map_err(|_| out_of_memory(GEMM_BUFFER, bytes))?;
    drop(probe);
    // 32^3 flops is above faer's threshold for its small-matrix kernels: this reaches
    // private-gemm, which allocates the thread's buffer
    let a = try_zeros::<f64>(GEMM_BUFFER, 32, 32)?;
    let mut c = try_zeros::<f64>(GEMM_BUFFER, 32, 32)?;
    matmul(
        c.as_mut(),
        Accum::Replace,
        a.as_ref(),
        a.as_ref(),
        1.0,
        Par::Seq,
    );
    GEMM_READY.with(|ready| ready.set(true));
    Ok(())
}

/// What private-gemm allocates per thread: two buffers the size of its idea of the L3 cache,
/// which on Linux is the total of the distinct level-3 caches (size per sharing CPU, times the
/// CPUs); at least 4 MiB each (its default).
fn gemm_buffer_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| 2 * total_l3_bytes().unwrap_or(0).max(4 << 20))
}

/// The sum of the sizes of the distinct level-3 caches listed under /sys/devices/system/cpu.
fn total_l3_bytes() -> Option<usize> {
    total_l3_bytes_in(std::path::Path::new("/sys/devices/system/cpu"))
}

/// [`total_l3_bytes`] of the `cpuN/cache/indexM/` entries under `root`.
fn total_l3_bytes_in(root: &std::path::Path) -> Option<usize> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    for cpu in std::fs::read_dir(root).ok()?.flatten() {
        let name = cpu.file_name();
        let name = name.to_str().unwrap_or("");
        if !(name.starts_with("cpu") && name[3..].bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let Ok(indices) = std::fs::read_dir(cpu.path().join("cache")) else {
            continue;
        };
        for index in indices.flatten() {
            let read = |file: &str| std::fs::read_to_string(index.path().join(file)).ok();
            if read("level").as_deref().map(str::trim) != Some("3") {
                continue;
            }
            if let (Some(size), Some(shared)) = (read("size"), read("shared_cpu_list")) {
                if seen.insert(shared.trim().to_string()) {
                    total += parse_size(size.trim()).unwrap_or(0);
                }
            }
        }
    }
    (total > 0).then_some(total)
}

/// `"32768K"`, `"32M"`, `"1G"` or a plain byte count.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_failures() {
        assert_eq!(parse_size("32768K"), Some(32 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert!(gemm_buffer_bytes() >= 8 << 20);
        // an impossible size is an error, not an abort
        let err = try_zeros::<f64>("a test buffer", usize::MAX / 16, 4).unwrap_err();
        assert!(matches!(err, ProjectionError::OutOfMemory { .. }), "{err}");
        let msg = err.during(|| "testing".into()).to_string();
        assert!(
            msg.starts_with("out of memory while testing: allocating")
                && msg.contains("for a test buffer failed"),
            "{msg}"
        );
        assert!(try_vec("a vector", usize::MAX / 2, 0u8).is_err());
        assert!(try_scratch("scratch", StackReq::new::<f64>(usize::MAX / 16)).is_err());
        prepare_threads(Par::rayon(2)).unwrap();
        assert!(GEMM_READY.with(Cell::get));
    }

    #[test]
    fn level_3_caches_are_summed_once_per_sharing_set() {
        let root = std::env::temp_dir().join(format!("saerecover-sysfs-{}", std::process::id()));
        let cache = |cpu: &str, index: &str, level: &str, size: &str, shared: &str| {
            let dir = root.join(cpu).join("cache").join(index);
            std::fs::create_dir_all(&dir).unwrap();
            for (file, text) in [
                ("level", level),
                ("size", size),
                ("shared_cpu_list", shared),
            ] {
                std::fs::write(dir.join(file), format!("{text}\n")).unwrap();
            }
        };
        assert_eq!(total_l3_bytes_in(&root), None); // no such directory
        std::fs::create_dir_all(root.join("cpu3")).unwrap(); // no cache directory
        assert_eq!(total_l3_bytes_in(&root), None); // nothing found: None, not Some(0)
        cache("cpu0", "index3", "3", "32768K", "0-1");
        cache("cpu0", "index2", "2", "1M", "0"); // level 2: not counted
        cache("cpu1", "index3", "3", "32768K", "0-1"); // the same cache as cpu0's
        cache("cpu2", "index3", "3", "16M", "2");
        cache("cpufreq", "index3", "3", "1G", "9"); // not a cpuN directory
        assert_eq!(total_l3_bytes_in(&root), Some(48 << 20));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
