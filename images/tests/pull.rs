//! Pulls from a real `docker-registry`: rootfs contents file by file, image config, layer
//! formats, whiteouts, indexes, corrupt blobs, a registry that is down, shared downloads,
//! eviction.

mod common;

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    time::{Duration, Instant},
};

use common::{Events, Mounted, assert_blobs_verify, chain, checks, open, quiet, r, runtime};
use hearth_images::{ExposedPort, ImageCache, Protocol, PullEvent, RootfsFormat, cache::PullError};
use hearth_testkit::{
    oci::{self, Compression, Image, Layer},
    registry::Registry,
    require, skip,
};

#[test]
fn pulls_httpd_image_into_a_bootable_rootfs() {
    require!(checks());
    let registry = Registry::start();
    let reference = oci::httpd_image().push(&registry, "hearth/httpd", "v1");
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let events = Events::default();
    let cache = open(dir.path(), &registry);
    let sink = events.sink();
    let img = rt
        .block_on(cache.prefetch(&r(&reference), &sink))
        .expect("pull");

    // The config hearth-init needs.
    assert_eq!(img.config.entrypoint, ["/bin/httpd"]);
    assert_eq!(img.config.cmd, ["-f", "-v", "-p", "8080", "-h", "/www"]);
    assert_eq!(img.config.env, ["PATH=/bin"]);
    assert_eq!(img.config.working_dir, "/www");
    assert_eq!(img.config.stop_signal.as_deref(), Some("SIGTERM"));
    assert_eq!(
        img.config.exposed_ports,
        [ExposedPort {
            port: 8080,
            protocol: Protocol::Tcp
        }]
    );
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.rootfs_format, RootfsFormat::Erofs);
    assert_eq!(img.references, std::slice::from_ref(&reference));
    let config_json = img.rootfs_path.with_file_name("config.json");
    assert!(
        config_json.is_file(),
        "config.json next to the rootfs image"
    );

    // Progress: resolved first, bytes for each layer, ready last.
    let ev = events.take();
    assert!(matches!(ev.first(), Some(PullEvent::Resolved { layers, .. }) if layers.len() == 2));
    for layer in 0..2 {
        assert!(
            ev.iter().any(|e| matches!(e, PullEvent::Bytes { layer: l, progress, .. } if *l == layer && progress.done == progress.total)),
            "no final byte count for layer {layer}: {ev:?}"
        );
    }
    assert!(ev.iter().any(|e| matches!(e, PullEvent::BuildingRootfs)));
    assert!(matches!(
        ev.last(),
        Some(PullEvent::Ready {
            already_cached: false,
            ..
        })
    ));

    // The rootfs, file by file.
    let m = Mounted::new(&img.rootfs_path, "erofs");
    let busybox = fs::read(oci::BUSYBOX).unwrap();
    assert_eq!(fs::read(m.path("bin/busybox")).unwrap(), busybox);
    let meta = fs::metadata(m.path("bin/busybox")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    for applet in oci::APPLETS {
        assert_eq!(
            fs::read_link(m.path(&format!("bin/{applet}")))
                .unwrap()
                .to_str(),
            Some("busybox")
        );
    }
    assert_eq!(
        fs::read(m.path("www/index.html")).unwrap(),
        oci::HTTPD_INDEX
    );
    assert_eq!(
        fs::metadata(m.path("tmp")).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        fs::metadata(m.path("root")).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    assert!(
        fs::read_to_string(m.path("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0:")
    );
    let mut names: Vec<String> = fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bin", "etc", "root", "tmp", "www"]);
    // Boot-ready: the static busybox in it runs.
    let out = std::process::Command::new(m.path("bin/busybox"))
        .args(["echo", "alive"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"alive\n");
    drop(m);

    // Cached: lookup without network, prefetch answers from the cache, survives a reopen.
    assert_eq!(
        cache.lookup(&r(&reference)).unwrap().manifest_digest,
        img.manifest_digest
    );
    let again = rt.block_on(cache.prefetch(&r(&reference), &quiet)).unwrap();
    assert_eq!(again.manifest_digest, img.manifest_digest);
    assert_eq!(
        cache
            .stats()
            .cache_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(cache);
    let cache = open(dir.path(), &registry);
    let found = cache
        .lookup(&r(&reference))
        .expect("in the index after reopening");
    assert_eq!(found.rootfs_path, img.rootfs_path);
    let by_digest = r(&format!(
        "{}/hearth/httpd@{}",
        registry.host(),
        img.manifest_digest
    ));
    assert!(cache.lookup(&by_digest).is_some());
    assert_eq!(cache.list().len(), 1);
    assert_blobs_verify(&cache);
}

#[test]
fn builds_ext4_when_configured() {
    require!(checks(), skip::program("mkfs.ext4"));
    let registry = Registry::start();
    let reference = oci::httpd_image().push(&registry, "hearth/httpd", "v1");
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), &registry);
    config.rootfs_format = RootfsFormat::Ext4;
    let cache = ImageCache::open(config).unwrap();
    let img = runtime()
        .block_on(cache.prefetch(&r(&reference), &quiet))
        .unwrap();
    assert_eq!(img.rootfs_format, RootfsFormat::Ext4);
    assert!(img.rootfs_path.ends_with("rootfs.ext4"));
    let m = Mounted::new(&img.rootfs_path, "ext4");
    assert_eq!(
        fs::read(m.path("www/index.html")).unwrap(),
        oci::HTTPD_INDEX
    );
    assert_eq!(
        fs::read(m.path("bin/busybox")).unwrap(),
        fs::read(oci::BUSYBOX).unwrap()
    );
}

fn lgetxattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the stated length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

#[test]
fn applies_whiteouts_links_ownership_and_xattrs_across_gzip_zstd_and_plain_layers() {
    require!(checks());
    let registry = Registry::start();
    let base = Layer::new()
        .compression(Compression::Gzip)
        .dir("a", 0o755)
        .file("a/keep", 0o644, b"keep")
        .file("a/gone", 0o644, b"gone")
        .dir("b", 0o755)
        .file("b/x", 0o644, b"x")
        .dir("b/sub", 0o755)
        .file("b/sub/y", 0o644, b"y")
        .file_owned("owned", 0o640, 1000, 2000, b"owned")
        .file("suid", 0o4755, b"#!")
        .file_with_xattrs("attrs", 0o644, b"attrs", &[("user.hearth", b"yes")])
        .file("replaced", 0o644, b"old");
    let middle = Layer::new()
        .compression(Compression::Zstd)
        .whiteout("a/gone")
        .opaque("b")
        .file("b/z", 0o644, b"z")
        .file("data", 0o600, b"linked")
        .hardlink("data-link", "data")
        .symlink("abs-link", "/a/keep");
    let top = Layer::new()
        .compression(Compression::None)
        .whiteout("replaced")
        .dir("replaced", 0o750)
        .file("replaced/inner", 0o644, b"new");
    let reference =
        Image::new()
            .layer(base)
            .layer(middle)
            .layer(top)
            .push(&registry, "hearth/layers", "v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), &registry);
    let img = runtime()
        .block_on(cache.prefetch(&r(&reference), &quiet))
        .expect("pull");
    let m = Mounted::new(&img.rootfs_path, "erofs");

    assert_eq!(fs::read(m.path("a/keep")).unwrap(), b"keep");
    assert!(!m.path("a/gone").exists(), "whiteout");
    assert!(
        !m.path("b/x").exists() && !m.path("b/sub").exists(),
        "opaque dir"
    );
    assert_eq!(fs::read(m.path("b/z")).unwrap(), b"z");
    let (d, l) = (
        fs::metadata(m.path("data")).unwrap(),
        fs::metadata(m.path("data-link")).unwrap(),
    );
    assert_eq!(d.ino(), l.ino(), "hard link shares the inode");
    assert_eq!(d.nlink(), 2);
    assert_eq!(d.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        fs::read_link(m.path("abs-link")).unwrap().to_str(),
        Some("/a/keep")
    );
    let owned = fs::metadata(m.path("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 2000));
    assert_eq!(owned.permissions().mode() & 0o7777, 0o640);
    assert_eq!(
        fs::metadata(m.path("suid")).unwrap().permissions().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        lgetxattr(&m.path("attrs"), "user.hearth").as_deref(),
        Some(&b"yes"[..])
    );
    assert!(fs::metadata(m.path("replaced")).unwrap().is_dir());
    assert_eq!(fs::read(m.path("replaced/inner")).unwrap(), b"new");
    assert!(!m.path(".wh.replaced").exists() && !m.path("b/.wh..wh..opq").exists());
}

#[test]
fn resolves_an_index_to_linux_amd64() {
    require!(checks());
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let image = |arch: &str| {
        Image::new()
            .architecture(arch)
            .layer(Layer::new().file("arch", 0o644, arch.as_bytes()))
    };
    let (index_digest, digests) =
        oci::write_index_layout(layout.path(), "t", vec![image("arm64"), image("amd64")]);
    let reference = registry.push_layout(layout.path(), "t", "hearth/multi", "v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), &registry);
    let rt = runtime();
    let img = rt
        .block_on(cache.prefetch(&r(&reference), &quiet))
        .expect("pull");
    assert_eq!(
        img.manifest_digest.as_str(),
        digests[1],
        "the amd64 manifest"
    );
    let m = Mounted::new(&img.rootfs_path, "erofs");
    assert_eq!(fs::read(m.path("arch")).unwrap(), b"amd64");
    drop(m);
    // By index digest too: the same image, found in the cache.
    let by_digest = r(&format!("{}/hearth/multi@{index_digest}", registry.host()));
    let again = rt.block_on(cache.prefetch(&by_digest, &quiet)).unwrap();
    assert_eq!(again.manifest_digest, img.manifest_digest);
}

#[test]
fn pulls_docker_schema2_manifests() {
    require!(checks());
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    oci::busybox_image().write_layout(layout.path(), "t");
    let reference = format!("{}/hearth/docker:v1", registry.host());
    let st = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--format",
            "v2s2",
        ])
        .arg(format!("oci:{}:t", layout.path().display()))
        .arg(format!("docker://{reference}"))
        .status()
        .unwrap();
    assert!(st.success());
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), &registry);
    let img = runtime()
        .block_on(cache.prefetch(&r(&reference), &quiet))
        .expect("pull");
    assert_eq!(img.config.cmd, ["/bin/sh"]);
    assert!(
        registry
            .log()
            .contains("application/vnd.docker.distribution.manifest.v2+json")
    );
}

#[test]
fn corrupted_blob_is_rejected_and_nothing_is_stored() {
    require!(checks());
    let registry = Registry::start();
    let layer = Layer::new().file("data", 0o644, &common::noise(7, 300_000));
    let reference = Image::new()
        .layer(layer)
        .push(&registry, "hearth/corrupt", "v1");
    // Corrupt the layer inside the registry's storage: same size, different bytes.
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), &registry);
    let rt = runtime();
    let manifest: serde_json::Value = {
        let storage = registry.storage_dir();
        let link = storage
            .join("docker/registry/v2/repositories/hearth/corrupt/_manifests/tags/v1/current/link");
        let digest = fs::read_to_string(link).unwrap();
        serde_json::from_slice(&fs::read(registry.blob_data_path(digest.trim())).unwrap()).unwrap()
    };
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let data = registry.blob_data_path(&layer_digest);
    let mut bytes = fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&data, bytes).unwrap();

    let err = rt
        .block_on(cache.prefetch(&r(&reference), &quiet))
        .unwrap_err();
    let msg = chain(&err);
    assert!(
        msg.contains("expected") && msg.contains(&layer_digest),
        "{msg}"
    );
    assert!(cache.list().is_empty(), "no image recorded");
    let digest: hearth_images::Digest = layer_digest.parse().unwrap();
    assert_eq!(cache.blobs().size(&digest), None, "no corrupt blob stored");
    assert!(cache.lookup(&r(&reference)).is_none());
    common::wait_for("temp files to go", || {
        fs::read_dir(dir.path().join("tmp")).unwrap().count() == 0
    });
    assert_blobs_verify(&cache);
}

#[test]
fn registry_down_fails_after_bounded_retries_then_recovers() {
    require!(checks());
    let mut registry = Registry::start();
    let reference = oci::busybox_image().push(&registry, "hearth/busybox", "v1");
    registry.stop();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), &registry);
    config.attempts = 3;
    let cache = ImageCache::open(config).unwrap();
    let rt = runtime();
    let started = Instant::now();
    let err = rt
        .block_on(cache.prefetch(&r(&reference), &quiet))
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            &err,
            PullError::Registry(hearth_images::registry::RegistryError::Unreachable {
                attempts: 3,
                ..
            })
        ),
        "{}",
        chain(&err)
    );
    // 50 ms + 100 ms of backoff; bounded well below a minute even on a loaded machine.
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(60),
        "{took:?}"
    );
    assert!(cache.list().is_empty());

    registry.restart();
    let img = rt
        .block_on(cache.prefetch(&r(&reference), &quiet))
        .expect("pull after restart");
    assert_eq!(
        cache.lookup(&r(&reference)).unwrap().manifest_digest,
        img.manifest_digest
    );
}

#[test]
fn concurrent_pulls_download_each_blob_once() {
    require!(checks());
    let registry = Registry::start();
    let image = Image::new()
        .layer(oci::busybox_layer())
        .layer(Layer::new().file("big1", 0o644, &common::noise(1, 4 << 20)))
        .layer(Layer::new().file("big2", 0o644, &common::noise(2, 4 << 20)));
    let reference = image.push(&registry, "hearth/shared", "v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), &registry);
    let rt = runtime();
    let (a, b, c) = rt.block_on(async {
        let rf = r(&reference);
        tokio::join!(
            cache.prefetch(&rf, &quiet),
            cache.prefetch(&rf, &quiet),
            cache.prefetch(&rf, &quiet)
        )
    });
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(a.manifest_digest, b.manifest_digest);
    assert_eq!(a.manifest_digest, c.manifest_digest);
    for d in a.layers.iter().map(|l| &l.digest).chain([&a.config_digest]) {
        assert_eq!(
            registry.blob_downloads("hearth/shared", d.as_str()),
            1,
            "blob {d} downloaded more than once"
        );
    }
    let stats = cache.stats();
    assert_eq!(
        stats
            .blob_downloads
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    assert_eq!(
        stats
            .images_built
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn pull_rejects_device_nodes_and_stores_no_image() {
    require!(checks());
    let registry = Registry::start();
    let evil = Layer::new().raw(b"dev/sda", tar::EntryType::Block, b"", b"");
    let reference =
        Image::new()
            .layer(oci::busybox_layer())
            .layer(evil)
            .push(&registry, "hearth/evil", "v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), &registry);
    let err = runtime()
        .block_on(cache.prefetch(&r(&reference), &quiet))
        .unwrap_err();
    let msg = chain(&err);
    assert!(
        msg.contains("device node") && msg.contains("dev/sda"),
        "{msg}"
    );
    assert!(cache.list().is_empty());
    assert_eq!(fs::read_dir(dir.path().join("images")).unwrap().count(), 0);
}

#[test]
fn eviction_under_a_small_budget_keeps_pinned_and_shared() {
    require!(checks());
    let registry = Registry::start();
    let base = || Layer::new().file("base", 0o644, &common::noise(9, 1 << 20));
    let img = |n: u64| {
        Image::new().layer(base()).layer(Layer::new().file(
            "own",
            0o644,
            &common::noise(100 + n, 1 << 20),
        ))
    };
    let refs: Vec<String> = (0..4)
        .map(|n| img(n).push(&registry, &format!("hearth/evict{n}"), "v1"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), &registry);
    let rt = runtime();
    let pulled: Vec<_> = refs
        .iter()
        .map(|rf| rt.block_on(cache.prefetch(&r(rf), &quiet)).unwrap())
        .collect();
    // Image 0 is pinned (warm pool), image 1 is in use, image 2 and 3 are not; 3 is newest.
    cache.pin(&pulled[0].manifest_digest).unwrap();
    let lease = cache.acquire(&pulled[1].manifest_digest).unwrap();
    let _ = cache.lookup(&r(&refs[3]));
    let usage = cache.disk_usage().unwrap();
    let report = cache.evict_to(usage / 2, None).unwrap();
    assert_eq!(
        report.images,
        [
            pulled[2].manifest_digest.clone(),
            pulled[3].manifest_digest.clone()
        ]
    );
    assert!(
        cache.get(&pulled[0].manifest_digest).is_some(),
        "pinned image kept"
    );
    assert!(
        cache.get(&pulled[1].manifest_digest).is_some(),
        "in-use image kept"
    );
    let shared = &pulled[0].layers[0].digest;
    assert!(
        cache.blobs().size(shared).is_some(),
        "shared base layer kept"
    );
    assert!(!report.blobs.contains(shared));
    assert!(
        cache.blobs().size(&pulled[2].layers[1].digest).is_none(),
        "own layer of an evicted image deleted"
    );
    for kept in &pulled[..2] {
        assert!(kept.rootfs_path.is_file());
        for l in &kept.layers {
            assert!(cache.blobs().size(&l.digest).is_some());
        }
    }
    assert!(cache.lookup(&r(&refs[2])).is_none());
    // Pinned and in-use images cannot be removed either; unpinned and released they can.
    assert!(cache.remove(&r(&refs[0])).is_err());
    assert!(cache.remove(&r(&refs[1])).is_err());
    cache.unpin(&pulled[0].manifest_digest).unwrap();
    drop(lease);
    cache.remove(&r(&refs[0])).unwrap();
    cache.remove(&r(&refs[1])).unwrap();
    assert!(cache.list().is_empty());
    assert!(
        cache.blobs().list().unwrap().is_empty(),
        "no blob is left without an image"
    );

    // A configured budget evicts after each pull, never the image just pulled.
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), &registry);
    config.disk_budget_bytes = 1;
    let cache = ImageCache::open(config).unwrap();
    for rf in &refs[..2] {
        rt.block_on(cache.prefetch(&r(rf), &quiet)).unwrap();
    }
    let left = cache.list();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].references, [refs[1].clone()]);
    assert_blobs_verify(&cache);
}

#[test]
fn pulls_by_digest_and_refuses_other_platforms() {
    require!(checks());
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let digest = oci::busybox_image().write_layout(layout.path(), "t");
    registry.push_layout(layout.path(), "t", "hearth/bydigest", "v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), &registry);
    let rt = runtime();
    let by_digest = format!("{}/hearth/bydigest@{digest}", registry.host());
    let img = rt
        .block_on(cache.prefetch(&r(&by_digest), &quiet))
        .expect("pull by digest");
    assert_eq!(img.manifest_digest.as_str(), digest);
    assert_eq!(img.references, [by_digest]);

    let arm = Image::new()
        .architecture("arm64")
        .layer(Layer::new().file("x", 0o644, b"x"))
        .push(&registry, "hearth/arm", "v1");
    let err = rt.block_on(cache.prefetch(&r(&arm), &quiet)).unwrap_err();
    assert!(matches!(err, PullError::Platform { .. }), "{}", chain(&err));
    assert!(chain(&err).contains("linux/arm64"));
    assert_eq!(cache.list().len(), 1);

    let missing = format!("{}/hearth/nope:v1", registry.host());
    let err = rt
        .block_on(cache.prefetch(&r(&missing), &quiet))
        .unwrap_err();
    assert!(chain(&err).contains("not found"), "{}", chain(&err));
}

/// A TCP proxy in front of the registry that cuts its first `cut` connections after `after`
/// bytes from the registry: downloads break mid-blob and must be retried.
async fn flaky_proxy(
    upstream: std::net::SocketAddr,
    cut: usize,
    after: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cuts = Arc::new(AtomicUsize::new(0));
    let c2 = cuts.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            n += 1;
            let limit = (n <= cut).then_some(after);
            let cuts = c2.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut buf = vec![0u8; 16 << 10];
                let mut sent = 0;
                while let Ok(k) = sr.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    if let Some(limit) = limit
                        && sent + k > limit
                    {
                        cuts.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    if cw.write_all(&buf[..k]).await.is_err() {
                        break;
                    }
                    sent += k;
                }
                up.abort();
            });
        }
    });
    (addr, cuts)
}

#[test]
fn downloads_cut_mid_blob_are_retried() {
    require!(checks());
    let registry = Registry::start();
    let reference = Image::new()
        .layer(Layer::new().file("big", 0o644, &common::noise(21, 3 << 20)))
        .push(&registry, "hearth/flaky", "v1");
    let rt = runtime();
    let (proxy, cuts) = rt.block_on(flaky_proxy(
        ([127, 0, 0, 1], registry.port()).into(),
        2,
        256 << 10,
    ));
    let host = proxy.to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut config = hearth_images::CacheConfig::new(dir.path()).registry(
        host.clone(),
        hearth_images::RegistryConfig {
            insecure: true,
            ..Default::default()
        },
    );
    config.backoff = Duration::from_millis(20);
    let cache = ImageCache::open(config).unwrap();
    let via_proxy = reference.replacen(&registry.host(), &host, 1);
    let img = rt
        .block_on(cache.prefetch(&r(&via_proxy), &quiet))
        .expect("pull through a flaky connection");
    assert!(
        cuts.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the proxy never cut a download"
    );
    assert!(
        cache
            .stats()
            .blob_downloads
            .load(std::sync::atomic::Ordering::Relaxed)
            > 2,
        "a blob was retried"
    );
    assert_blobs_verify(&cache);
    let m = Mounted::new(&img.rootfs_path, "erofs");
    assert_eq!(fs::read(m.path("big")).unwrap(), common::noise(21, 3 << 20));
}
