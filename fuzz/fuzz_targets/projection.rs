//! libFuzzer target: `cargo +nightly fuzz run projection` (from the repository root or fuzz/).
//! Bytes decode into a projection problem; see `saerecover_core_fuzz::run` for the properties.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    saerecover_core_fuzz::run(data);
});
