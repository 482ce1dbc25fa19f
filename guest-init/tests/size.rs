//! The static hearth-init stays small: stripped, under 3 MiB (it is in every initramfs and on
//! every sandbox start).

use std::process::Command;

const LIMIT: u64 = 3 * 1024 * 1024;

#[test]
fn stripped_static_binary_is_under_3_mib() {
    hearth_testkit::require!(hearth_testkit::skip::program("strip"));
    let init = hearth_testkit::artifacts::hearth_init();
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("hearth-init");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&init)
        .status()
        .unwrap();
    assert!(status.success());
    let size = std::fs::metadata(&stripped).unwrap().len();
    eprintln!(
        "hearth-init: {} bytes unstripped, {size} bytes stripped (limit {LIMIT})",
        std::fs::metadata(&init).unwrap().len()
    );
    assert!(size < LIMIT, "stripped hearth-init is {size} bytes");
}
