//! A quick seeded fuzz run as a plain test (`cargo test` in fuzz/): 3000 random inputs, or
//! SAERECOVER_FUZZ_CASES of them.

#[test]
fn seeded_cases_hold_every_property() {
    let cases = std::env::var("SAERECOVER_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let tally = saerecover_core_fuzz::seeded::run_many(cases, 7, 2048, |i, _| eprintln!("case {i} failed"));
    assert_eq!(tally.cases, cases);
    assert!(tally.rejected > 0 && tally.ratio_checked > 0, "{tally:?}");
}
