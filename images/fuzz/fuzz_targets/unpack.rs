//! Applies arbitrary bytes as a layer tarball (plain, and as gzip/zstd blobs) to a fresh
//! root inside a temp directory. Errors are fine; panics are not, and nothing may appear
//! next to the root (no traversal, no symlink escape).

#![no_main]

use hearth_images::{
    manifest::Compression,
    unpack::{UnpackOptions, apply_layer, apply_layer_blob},
};
use libfuzzer_sys::fuzz_target;

fn check_contained(dir: &std::path::Path) {
    let names: Vec<_> = std::fs::read_dir(dir)
        .expect("list sandbox")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        names.iter().all(|n| n == "root" || n == "blob"),
        "something escaped the root: {names:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let options = UnpackOptions {
        preserve_ownership: false,
        xattrs: false,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let _ = apply_layer(&root, data, options);
    check_contained(dir.path());

    let blob = dir.path().join("blob");
    std::fs::write(&blob, data).expect("blob");
    for c in [Compression::Gzip, Compression::Zstd] {
        let _ = apply_layer_blob(&root, &blob, c, None, options);
        check_contained(dir.path());
    }
});
