//! Crash safety: a process pulling images is SIGKILLed at random points; every time the cache
//! reopens cleanly, every stored blob verifies and every recorded image is complete, and a
//! final pull succeeds.
//!
//! The pulling process is this test binary re-executed with [`CHILD_ENV`] set, running only
//! `crash_child`.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{assert_blobs_verify, quiet, runtime};
use hearth_images::Reference;
use hearth_testkit::{
    oci::{self, Image, Layer},
    registry::Registry,
    require, skip,
};

const CHILD_ENV: &str = "HEARTH_IMAGES_CRASH_CHILD";

/// The pulling process: pulls, removes, pulls again… until killed. A no-op in normal runs.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split('\n');
    let (dir, host, reference) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mut config = hearth_images::CacheConfig::new(dir).registry(
        host,
        hearth_images::RegistryConfig {
            insecure: true,
            ..Default::default()
        },
    );
    config.concurrent_layers = 2;
    let cache = hearth_images::ImageCache::open(config).expect("child opens the cache");
    let reference: Reference = reference.parse().unwrap();
    let rt = runtime();
    loop {
        rt.block_on(cache.prefetch(&reference, &quiet))
            .expect("child pull");
        eprintln!("child: pulled");
        cache.remove(&reference).expect("child remove");
    }
}

#[test]
fn sigkill_at_random_points_leaves_a_consistent_cache() {
    require!(
        skip::root(),
        skip::program("docker-registry"),
        skip::program("skopeo"),
        skip::program("mkfs.erofs")
    );
    let registry = Registry::start();
    let reference = Image::new()
        .layer(oci::busybox_layer())
        .layer(Layer::new().file("one", 0o644, &common::noise(11, 6 << 20)))
        .layer(Layer::new().file("two", 0o644, &common::noise(12, 6 << 20)))
        .layer(Layer::new().file("three", 0o644, &common::noise(13, 6 << 20)))
        .push(&registry, "hearth/crash", "v1");
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("{}\n{}\n{reference}", dir.path().display(), registry.host());
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    let exe = std::env::current_exe().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let child_log = logs.path().join("child.log");
    let mut mid_pull = 0;
    for round in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 6000);
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &spec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&child_log).unwrap())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let pulls = std::fs::read_to_string(&child_log)
            .unwrap_or_default()
            .matches("child: pulled")
            .count();
        mid_pull += usize::from(pulls == 0);
        eprintln!("round {round}: killed after {delay:?}, {pulls} pulls had finished");

        // Reopening works (the lock died with the child), clears temp files, and what the
        // index and the blob store hold is complete and verified.
        let cache = common::open(dir.path(), &registry);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_blobs_verify(&cache);
        for img in cache.list() {
            assert!(img.rootfs_path.is_file(), "recorded image without rootfs");
            assert!(cache.blobs().size(&img.config_digest).is_some());
        }
    }
    eprintln!("{mid_pull} of 8 kills landed during the first pull");
    let cache = common::open(dir.path(), &registry);
    let img = runtime()
        .block_on(cache.prefetch(&reference.parse().unwrap(), &quiet))
        .expect("pull after the crashes");
    assert_blobs_verify(&cache);
    let m = common::Mounted::new(&img.rootfs_path, "erofs");
    assert_eq!(
        std::fs::read(m.path("three")).unwrap(),
        common::noise(13, 6 << 20)
    );
}
