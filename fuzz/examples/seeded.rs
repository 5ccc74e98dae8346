//! The seeded fuzz driver, for machines without cargo-fuzz or a nightly toolchain:
//! `cargo run --release --example seeded -- [CASES] [SEED] [BYTES]` runs CASES random inputs
//! (default 100000) of up to BYTES bytes (default 4096) from a splitmix64 stream seeded with
//! SEED through the same checks as the libFuzzer target, and prints a tally. A failing case
//! prints its seed and index, and its bytes are written to seeded-failure.bin.

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cases: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    let max_len: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let t0 = Instant::now();
    let tally = saerecover_core_fuzz::seeded::run_many(cases, seed, max_len, |i, bytes| {
        eprintln!("case {i} of seed {seed} failed; bytes in seeded-failure.bin");
        let _ = std::fs::write("seeded-failure.bin", bytes);
    });
    println!(
        "{} cases in {:.1} s: {} rejected with the expected error ({} of them an overflow of the result), {} accepted ({} with the orthogonality ratio checked)",
        tally.cases,
        t0.elapsed().as_secs_f64(),
        tally.rejected,
        tally.overflowed,
        tally.cases - tally.rejected,
        tally.ratio_checked
    );
}
