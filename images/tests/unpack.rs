//! The layer unpacker against hostile and tricky tarballs: traversal, absolute names,
//! symlink escapes, device nodes, bad hard links; nothing may land outside the root.

use std::{fs, path::Path};

use hearth_images::unpack::{UnpackError, UnpackOptions, apply_layer};
use hearth_testkit::oci::Layer;
use proptest::prelude::*;
use tar::EntryType;

/// A temp dir holding `root/`; the test checks that nothing else appears next to it.
struct Sandbox(tempfile::TempDir);

impl Sandbox {
    fn new() -> Self {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("root")).unwrap();
        Self(d)
    }
    fn root(&self) -> std::path::PathBuf {
        self.0.path().join("root")
    }
    fn apply(&self, layer: Layer) -> Result<(), UnpackError> {
        apply_layer(
            &self.root(),
            layer.tar().as_slice(),
            UnpackOptions::default(),
        )
        .map(|_| ())
    }
    fn assert_contained(&self) {
        let names: Vec<_> = fs::read_dir(self.0.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["root"], "something was written outside the root");
    }
}

#[test]
fn rejects_dotdot_and_absolute_names() {
    for name in [&b"../evil"[..], b"a/../../evil", b"./../evil"] {
        let s = Sandbox::new();
        let err = s
            .apply(Layer::new().raw(name, EntryType::Regular, b"", b"x"))
            .unwrap_err();
        assert!(matches!(err, UnpackError::Traversal(_)), "{name:?}: {err}");
        s.assert_contained();
    }
    let s = Sandbox::new();
    let err = s
        .apply(Layer::new().raw(b"/etc/evil", EntryType::Regular, b"", b"x"))
        .unwrap_err();
    assert!(matches!(err, UnpackError::Absolute(_)), "{err}");
    assert!(err.to_string().contains("absolute"));
    s.assert_contained();
}

#[test]
fn rejects_writes_through_escaping_symlinks() {
    let s = Sandbox::new();
    let layer = Layer::new().dir("a", 0o755).symlink("a/up", "../..").raw(
        b"a/up/pwned",
        EntryType::Regular,
        b"",
        b"x",
    );
    let err = s.apply(layer).unwrap_err();
    assert!(matches!(err, UnpackError::SymlinkEscape(_)), "{err}");
    s.assert_contained();

    // An absolute symlink is resolved inside the root (as in a chroot), not on the host.
    let s = Sandbox::new();
    let marker = format!("hearth-unpack-{}", std::process::id());
    let layer = Layer::new()
        .dir("tmp", 0o755)
        .symlink("hosttmp", "/tmp")
        .file(&format!("hosttmp/{marker}"), 0o644, b"inside");
    s.apply(layer).unwrap();
    assert!(
        !Path::new("/tmp").join(&marker).exists(),
        "wrote to the host's /tmp"
    );
    assert_eq!(
        fs::read(s.root().join("tmp").join(&marker)).unwrap(),
        b"inside"
    );
    s.assert_contained();
}

#[test]
fn rejects_device_nodes() {
    for kind in [EntryType::Char, EntryType::Block] {
        let s = Sandbox::new();
        let err = s
            .apply(Layer::new().raw(b"dev/null", kind, b"", b""))
            .unwrap_err();
        assert!(matches!(err, UnpackError::DeviceNode(_)), "{err}");
        assert!(err.to_string().contains("device node"));
        assert!(!s.root().join("dev/null").exists());
    }
}

#[test]
fn rejects_bad_hard_links() {
    let s = Sandbox::new();
    let err = s
        .apply(Layer::new().raw(b"link", EntryType::Link, b"../../etc/passwd", b""))
        .unwrap_err();
    assert!(matches!(err, UnpackError::Traversal(_)), "{err}");
    let err = s
        .apply(Layer::new().raw(b"link", EntryType::Link, b"missing", b""))
        .unwrap_err();
    assert!(matches!(err, UnpackError::HardLink { .. }), "{err}");
    let err = s
        .apply(
            Layer::new()
                .dir("d", 0o755)
                .raw(b"link", EntryType::Link, b"d", b""),
        )
        .unwrap_err();
    assert!(matches!(err, UnpackError::HardLink { .. }), "{err}");
    s.assert_contained();
}

#[test]
fn rejects_garbage() {
    let s = Sandbox::new();
    let junk = vec![0x42u8; 1024];
    assert!(apply_layer(&s.root(), junk.as_slice(), UnpackOptions::default()).is_err());
    s.assert_contained();
}

fn component() -> impl Strategy<Value = &'static [u8]> {
    prop_oneof![
        Just(&b"a"[..]),
        Just(&b"b"[..]),
        Just(&b".."[..]),
        Just(&b"."[..]),
        Just(&b""[..]),
        Just(&b"/"[..]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever names, symlinks and link targets a layer has, nothing lands outside the root.
    #[test]
    fn nothing_escapes_the_root(
        entries in proptest::collection::vec(
            (proptest::collection::vec(component(), 1..5), 0u8..4, proptest::collection::vec(component(), 0..4)),
            1..8,
        )
    ) {
        let s = Sandbox::new();
        for (name, kind, target) in entries {
            let join = |parts: &[&[u8]]| parts.iter().map(|p| p.to_vec()).collect::<Vec<_>>().join(&b'/');
            let (name, target) = (join(&name), join(&target));
            if name.len() >= 100 || target.len() >= 100 {
                continue;
            }
            let kind = [EntryType::Regular, EntryType::Directory, EntryType::Symlink, EntryType::Link][kind as usize];
            // Each entry in its own layer, so one rejected entry does not hide the others.
            let _ = s.apply(Layer::new().raw(&name, kind, &target, if kind == EntryType::Regular { b"x" } else { b"" }));
        }
        s.assert_contained();
    }
}
