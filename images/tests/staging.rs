//! Staging: unpacking on a tmpfs (and falling back to the disk when it is full), reusing the
//! kept tree of shared base layers (the result is the same, file by file, as a cold build, and
//! the kept tree is never changed by the images built on it), and the tmpfs area's cleanup.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
};

use common::{Events, Mounted, checks, config, r, runtime, wait_for};
use hearth_images::{CacheConfig, ImageCache, PullEvent};
use hearth_testkit::{
    oci::{Image, Layer},
    registry::Registry,
    require, skip,
};

/// A tmpfs of `size` mounted on a temp dir; unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs failed");
        Self(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn areas(&self) -> Vec<PathBuf> {
        fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Type, mode, owner, link count, content or link target, xattrs and (except for
/// directories, whose times depend on when later layers were applied) mtime of every entry.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                stack.push(p.clone());
                "dir".to_owned()
            } else if ft.is_symlink() {
                format!("symlink {:?}", fs::read_link(&p).unwrap())
            } else if ft.is_fifo() {
                "fifo".to_owned()
            } else {
                format!("file {:?} mtime {}", fs::read(&p).unwrap(), m.mtime())
            };
            let xattrs = xattr_names(&p);
            out.insert(
                p.strip_prefix(root).unwrap().display().to_string(),
                format!(
                    "{what} mode {:o} owner {}:{} nlink {} xattrs {xattrs:?}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.nlink(),
                ),
            );
        }
    }
    out
}

/// `name=value` of every extended attribute of `p` itself.
fn xattr_names(p: &Path) -> Vec<String> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: a NUL-terminated path and a buffer of the stated length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    names.truncate(n as usize);
    names
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|name| {
            let cn = CString::new(name).unwrap();
            let mut v = vec![0u8; 4096];
            // SAFETY: NUL-terminated strings and a buffer of the stated length.
            let len =
                unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
            v.truncate(len.max(0) as usize);
            format!("{}={:?}", String::from_utf8_lossy(name), v)
        })
        .collect()
}

fn base_layers() -> Vec<Layer> {
    vec![
        Layer::new()
            .dir("a", 0o755)
            .file("a/keep", 0o644, b"keep")
            .file("a/gone", 0o644, b"gone")
            .file("a/shared", 0o600, b"shared")
            .dir("b", 0o751)
            .file("b/x", 0o644, b"x")
            .file_owned("owned", 0o640, 1000, 2000, b"owned")
            .file_with_xattrs("attrs", 0o644, b"attrs", &[("user.hearth", b"base")])
            .symlink("link", "a/keep"),
        Layer::new()
            .file("a/more", 0o644, b"more")
            .hardlink("a/shared-too", "a/shared"),
    ]
}

/// Changes, replaces or removes everything the base layers put there.
fn app1_layer() -> Layer {
    Layer::new()
        .dir("a", 0o700)
        .file("a/keep", 0o755, b"changed")
        .whiteout("a/gone")
        .opaque("b")
        .file("b/new", 0o644, b"new")
        .file_owned("owned", 0o600, 3000, 4000, b"re-owned")
        .file_with_xattrs("attrs", 0o644, b"attrs2", &[("user.hearth", b"app1")])
        .hardlink("shared-link", "a/shared")
        .symlink("link", "b/new")
        .file("a/shared-too", 0o644, b"not linked any more")
}

fn app2_layer() -> Layer {
    Layer::new().file("app2", 0o644, b"app2")
}

fn image(top: Option<Layer>) -> Image {
    let mut img = Image::new();
    for l in base_layers().into_iter().chain(top) {
        img = img.layer(l);
    }
    img
}

fn unpacked_layers(events: &Events) -> Vec<usize> {
    events
        .take()
        .into_iter()
        .filter_map(|e| match e {
            PullEvent::Unpacking { layer, .. } => Some(layer),
            _ => None,
        })
        .collect()
}

#[test]
fn kept_base_trees_are_reused_and_match_cold_builds() {
    require!(checks());
    let registry = Registry::start();
    let base = image(None).push(&registry, "hearth/base", "v1");
    let app1 = image(Some(app1_layer())).push(&registry, "hearth/app1", "v1");
    let app2 = image(Some(app2_layer())).push(&registry, "hearth/app2", "v1");
    let rt = runtime();
    let tmpfs = Tmpfs::mount("64m");

    // Warm: staging on a tmpfs, trees kept.
    let warm_dir = tempfile::tempdir().unwrap();
    let mut c = config(warm_dir.path(), &registry);
    c.staging_tmpfs = Some(tmpfs.path().to_owned());
    let warm = ImageCache::open(c).unwrap();
    let events = Events::default();
    let sink = events.sink();
    rt.block_on(warm.prefetch(&r(&base), &sink)).unwrap();
    assert_eq!(unpacked_layers(&events), [0, 1]);
    let mut warm_images = Vec::new();
    for app in [&app1, &app2] {
        let img = rt.block_on(warm.prefetch(&r(app), &sink)).unwrap();
        assert_eq!(
            unpacked_layers(&events),
            [2],
            "{app}: only the top layer applied"
        );
        warm_images.push(img);
    }

    // Cold: on disk, nothing kept.
    let cold_dir = tempfile::tempdir().unwrap();
    let mut c = config(cold_dir.path(), &registry);
    c.staging_tmpfs = None;
    c.layer_tree_cache_bytes = 0;
    let cold = ImageCache::open(c).unwrap();
    for (app, warm_img) in [&app1, &app2].into_iter().zip(&warm_images) {
        let img = rt.block_on(cold.prefetch(&r(app), &sink)).unwrap();
        assert_eq!(unpacked_layers(&events), [0, 1, 2]);
        let (w, c) = (
            Mounted::new(&warm_img.rootfs_path, "erofs"),
            Mounted::new(&img.rootfs_path, "erofs"),
        );
        let (w, c) = (snapshot(&w.path("")), snapshot(&c.path("")));
        assert!(w.len() > 5, "{w:?}");
        assert_eq!(w, c, "{app}: built on the kept tree vs cold");
    }
    // app2 was built on the base tree after app1: app1 changed nothing in it (checked above),
    // and app1's changes show.
    let m = Mounted::new(&warm_images[0].rootfs_path, "erofs");
    assert_eq!(fs::read(m.path("a/keep")).unwrap(), b"changed");
    assert!(!m.path("b/x").exists() && !m.path("a/gone").exists());
    let m2 = Mounted::new(&warm_images[1].rootfs_path, "erofs");
    assert_eq!(fs::read(m2.path("a/keep")).unwrap(), b"keep");
    assert_eq!(fs::read(m2.path("a/shared-too")).unwrap(), b"shared");
    assert_eq!(fs::metadata(m2.path("a/shared")).unwrap().nlink(), 2);

    // Eviction under pressure drops the kept trees; closing the cache gives the tmpfs back.
    let trees = tmpfs.areas()[0].join("trees");
    let kept = || fs::read_dir(&trees).map_or(0, |d| d.count());
    assert!(kept() > 0);
    warm.evict_to(u64::MAX, None).unwrap();
    assert!(kept() > 0, "no pressure, nothing dropped");
    drop((m, m2));
    warm.evict_to(1, None).unwrap();
    wait_for("the kept trees to go", || kept() == 0);
    drop(warm);
    assert!(tmpfs.areas().is_empty(), "{:?}", tmpfs.areas());
}

#[test]
fn a_new_top_layer_on_the_same_layers_applies_only_that_layer() {
    require!(checks());
    let registry = Registry::start();
    let v1 = image(Some(app1_layer())).push(&registry, "hearth/app", "v1");
    let v2 = image(Some(app2_layer())).push(&registry, "hearth/app", "v2");
    let rt = runtime();
    // The default staging: /dev/shm.
    let dir = tempfile::tempdir().unwrap();
    let cache = common::open(dir.path(), &registry);
    let events = Events::default();
    let sink = events.sink();
    rt.block_on(cache.prefetch(&r(&v1), &sink)).unwrap();
    assert_eq!(unpacked_layers(&events), [0, 1, 2]);
    let img = rt.block_on(cache.prefetch(&r(&v2), &sink)).unwrap();
    assert_eq!(
        unpacked_layers(&events),
        [2],
        "only the new top layer applied"
    );
    let m = Mounted::new(&img.rootfs_path, "erofs");
    assert_eq!(
        fs::read(m.path("a/keep")).unwrap(),
        b"keep",
        "v1's top layer is not in v2"
    );
    assert_eq!(fs::read(m.path("app2")).unwrap(), b"app2");
    assert_eq!(fs::read(m.path("b/x")).unwrap(), b"x");
}

#[test]
fn a_full_tmpfs_falls_back_to_the_disk() {
    require!(checks());
    let registry = Registry::start();
    // 4 MiB of zeros: a few KiB compressed, so the size estimate says it fits 1 MiB.
    let zeros = vec![0u8; 4 << 20];
    let reference = Image::new()
        .layer(Layer::new().file("zeros", 0o644, &zeros))
        .push(&registry, "hearth/zeros", "v1");
    let tmpfs = Tmpfs::mount("1m");
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &registry);
    c.staging_tmpfs = Some(tmpfs.path().to_owned());
    let cache = ImageCache::open(c).unwrap();
    let img = runtime()
        .block_on(cache.prefetch(&r(&reference), &common::quiet))
        .expect("pull falls back to the disk");
    let m = Mounted::new(&img.rootfs_path, "erofs");
    assert_eq!(fs::read(m.path("zeros")).unwrap(), zeros);
}

#[test]
fn areas_of_gone_caches_are_removed() {
    require!(skip::root());
    static N: AtomicU64 = AtomicU64::new(0);
    let tmpfs = Tmpfs::mount("4m");
    // A process that was killed left its area behind; its root is gone since.
    let leftover = tmpfs.path().join(format!(
        "hearth-images-{:016x}",
        std::process::id() as u64 * 1000 + N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(leftover.join("trees/x")).unwrap();
    fs::write(
        leftover.join("root"),
        "/nonexistent/hearth-images-test-root",
    )
    .unwrap();
    // A live cache's area stays.
    let live_dir = tempfile::tempdir().unwrap();
    let mut c = CacheConfig::new(live_dir.path());
    c.staging_tmpfs = Some(tmpfs.path().to_owned());
    let live = ImageCache::open(c).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut c = CacheConfig::new(dir.path());
    c.staging_tmpfs = Some(tmpfs.path().to_owned());
    let cache = ImageCache::open(c).unwrap();
    wait_for("the leftover area to go", || !leftover.exists());
    assert_eq!(tmpfs.areas().len(), 2, "{:?}", tmpfs.areas());
    drop(cache);
    drop(live);
    assert!(tmpfs.areas().is_empty(), "{:?}", tmpfs.areas());
}
