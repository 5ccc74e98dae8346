//! Replays every input in fuzz/regressions/ (crashes or property failures found earlier).

#[test]
fn regression_inputs_hold_every_property() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/regressions") {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| saerecover_core_fuzz::run(&bytes));
        assert!(result.is_ok(), "{} fails", path.display());
        n += 1;
    }
    assert!(n > 0);
}
