//! Shared helpers for the image cache's tests against a real registry.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use hearth_images::{CacheConfig, ImageCache, PullEvent, Reference, RegistryConfig};
use hearth_testkit::{registry::Registry, skip};

/// Why a test that pulls from a local registry and builds erofs images cannot run here.
pub fn checks() -> Option<String> {
    skip::root()
        .or_else(|| skip::program("docker-registry"))
        .or_else(|| skip::program("skopeo"))
        .or_else(|| skip::program("mkfs.erofs"))
}

/// A reference from a test literal.
pub fn r(s: &str) -> Reference {
    s.parse().expect("reference")
}

/// A multi-threaded runtime like the agent's.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A cache config for a plain-HTTP test registry, with quick retries.
pub fn config(root: &Path, registry: &Registry) -> CacheConfig {
    let mut c = CacheConfig::new(root).registry(
        registry.host(),
        RegistryConfig {
            insecure: !registry.is_tls(),
            ..RegistryConfig::default()
        },
    );
    c.backoff = Duration::from_millis(50);
    c
}

/// Opens a cache for `registry` in `root`.
pub fn open(root: &Path, registry: &Registry) -> ImageCache {
    ImageCache::open(config(root, registry)).expect("open cache")
}

/// Collects progress events.
#[derive(Clone, Default)]
pub struct Events(pub Arc<Mutex<Vec<PullEvent>>>);

impl Events {
    pub fn sink(&self) -> impl Fn(PullEvent) + Send + Sync + 'static {
        let v = self.0.clone();
        move |e| v.lock().unwrap().push(e)
    }

    pub fn take(&self) -> Vec<PullEvent> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// A no-op progress callback.
pub fn quiet(_: PullEvent) {}

/// A rootfs image mounted read-only (loop), unmounted on drop.
pub struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(image: &Path, fstype: &str) -> Self {
        let dir = tempfile::tempdir().expect("mount point");
        let st = Command::new("mount")
            .args(["-t", fstype, "-o", "loop,ro"])
            .arg(image)
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount {} failed", image.display());
        Self { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Every blob in the cache's store hashes to its name.
pub fn assert_blobs_verify(cache: &ImageCache) {
    for (d, _) in cache.blobs().list().unwrap() {
        assert!(
            cache.blobs().verify(&d).unwrap(),
            "blob {d} does not verify"
        );
    }
}

/// The whole error chain, as the agent prints it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

/// Polls `f` until it is true (generous timeout: tests run on 2 busy cores).
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Random-ish bytes (xorshift; incompressible enough for download tests).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
