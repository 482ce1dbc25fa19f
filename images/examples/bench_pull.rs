//! The release-built half of `cargo xtask bench images` (xtask itself is a debug build, which
//! would measure the compiler's optimiser rather than the cache). Subcommands print one JSON
//! object on stdout:
//!
//! - `layout DIR MB`: writes two OCI layouts, `DIR/base` (tag `base`: 3 layers) and
//!   `DIR/full` (tag `full`: the same 3 layers plus 2 more), about `MB` megabytes in all.
//! - `pull ROOT REGISTRY REFERENCE [PRE_REFERENCE]`: opens a cache at ROOT (fresh or not),
//!   pulls PRE_REFERENCE untimed if given, then times the pull of REFERENCE.
//! - `lookup ROOT REGISTRY REFERENCE N`: opens the cache and times N lookups.

use std::{path::Path, time::Instant};

use anyhow::{Context as _, bail};
use hearth_images::{CacheConfig, ImageCache, Reference, RegistryConfig};
use hearth_testkit::oci::{self, Image, Layer};

fn open(root: &str, registry: &str) -> anyhow::Result<ImageCache> {
    let config = CacheConfig::new(root).registry(
        registry,
        RegistryConfig {
            insecure: true,
            ..Default::default()
        },
    );
    Ok(ImageCache::open(config)?)
}

/// Half random, half repetitive text: compresses roughly like real binaries and data.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(len + 64);
    let mut block = 0u64;
    while out.len() < len {
        if block.is_multiple_of(2) {
            for _ in 0..(16 << 10) / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.extend_from_slice(&x.to_le_bytes());
            }
        } else {
            let mut n = 0;
            while n < 16 << 10 {
                let line = format!("entry {block} {n} value={}\n", x % 1000);
                n += line.len();
                out.extend_from_slice(line.as_bytes());
            }
        }
        block += 1;
    }
    out.truncate(len);
    out
}

fn files_layer(prefix: &str, seed: u64, files: usize, size: usize) -> Layer {
    let mut l = Layer::new().dir(prefix, 0o755);
    for i in 0..files {
        let dir = format!("{prefix}/d{}", i / 100);
        if i % 100 == 0 {
            l = l.dir(&dir, 0o755);
        }
        l = l.file(
            &format!("{dir}/f{i}"),
            0o644,
            &content(seed + i as u64, size),
        );
    }
    l
}

fn layout(dir: &Path, mb: usize) -> anyhow::Result<serde_json::Value> {
    let unit = mb << 20;
    let base = || {
        vec![
            oci::busybox_layer(),
            files_layer("usr/lib", 1, 30, unit * 3 / 10 / 30),
            files_layer("usr/share", 2, 400, unit / 5 / 400),
        ]
    };
    let top = || {
        vec![
            files_layer("app/bin", 3, 20, unit * 3 / 10 / 20),
            files_layer("app/assets", 4, 4000, unit / 5 / 4000),
        ]
    };
    let config = serde_json::json!({"Cmd": ["/app/bin/d0/f0"], "Env": ["PATH=/bin"]});
    let mut base_img = Image::new().config(config.clone());
    for l in base() {
        base_img = base_img.layer(l);
    }
    let mut full_img = Image::new().config(config);
    for l in base().into_iter().chain(top()) {
        full_img = full_img.layer(l);
    }
    std::fs::create_dir_all(dir.join("base"))?;
    std::fs::create_dir_all(dir.join("full"))?;
    let b = base_img.write_layout(&dir.join("base"), "base");
    let f = full_img.write_layout(&dir.join("full"), "full");
    Ok(serde_json::json!({"base_digest": b, "full_digest": f}))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match args.first().map(String::as_str) {
        Some("layout") if args.len() == 3 => layout(Path::new(&args[1]), args[2].parse()?)?,
        Some("pull") if args.len() >= 4 => {
            let cache = open(&args[1], &args[2])?;
            let rt = tokio::runtime::Runtime::new()?;
            if let Some(pre) = args.get(4) {
                let pre: Reference = pre.parse()?;
                rt.block_on(cache.prefetch(&pre, &|_| {}))
                    .context("Pre-pull failed")?;
                // The pre-pull's build tree is deleted in the background; let that finish so
                // the timed pull measures a cache whose base layers are simply there.
                let tmp = Path::new(&args[1]).join("tmp");
                let deadline = Instant::now() + std::time::Duration::from_secs(120);
                // (`tmp/trees` holds the kept layer trees when they are not on a tmpfs.)
                let busy = || -> std::io::Result<bool> {
                    Ok(std::fs::read_dir(&tmp)?
                        .filter_map(Result::ok)
                        .any(|e| e.file_name() != "trees"))
                };
                while busy()? && Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                // And let its writes reach the disk, as they would have long before.
                std::process::Command::new("sync").status()?;
            }
            let reference: Reference = args[3].parse()?;
            let start = Instant::now();
            // BENCH_TRACE=1 prints each progress event with its time, to see where time goes.
            let trace = std::env::var_os("BENCH_TRACE").is_some();
            let report = move |e: hearth_images::PullEvent| {
                if trace && !matches!(e, hearth_images::PullEvent::Bytes { .. }) {
                    eprintln!("{:8.3} s  {e}", start.elapsed().as_secs_f64());
                }
            };
            let img = rt
                .block_on(cache.prefetch(&reference, &report))
                .context("Pull failed")?;
            let secs = start.elapsed().as_secs_f64();
            serde_json::json!({
                "seconds": secs,
                "compressed_bytes": img.compressed_size,
                "rootfs_bytes": img.rootfs_size,
                "bytes_downloaded": cache.stats().bytes_downloaded.load(std::sync::atomic::Ordering::Relaxed),
            })
        }
        Some("lookup") if args.len() == 5 => {
            let start = Instant::now();
            let cache = open(&args[1], &args[2])?;
            let open_ms = start.elapsed().as_secs_f64() * 1e3;
            let reference: Reference = args[3].parse()?;
            let n: usize = args[4].parse()?;
            let mut ms = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let img = cache.lookup(&reference);
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                if img.is_none() {
                    bail!("{reference} is not cached");
                }
            }
            serde_json::json!({"open_ms": open_ms, "lookup_ms": ms})
        }
        _ => bail!(
            "usage: bench_pull layout DIR MB | pull ROOT REGISTRY REF [PRE_REF] | lookup ROOT REGISTRY REF N"
        ),
    };
    println!("{out}");
    Ok(())
}
