//! `cargo xtask bench images` (issue 5): pull + unpack + rootfs image of a ~200 MB multi-layer
//! image from a local `docker-registry`, cold and with the base layers already cached, side by
//! side with `skopeo copy` + `umoci unpack` + the same `mkfs.erofs` on the same image; and the
//! latency of a cached lookup.
//!
//! Hearth's side runs in `images/examples/bench_pull.rs`, built in release mode (xtask is a
//! debug build). Each configuration runs `--runs` times, interleaved; medians are reported.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use hearth_testkit::registry::Registry;

use super::stats::summarize;
use crate::util::{self, output};

/// Options of `cargo xtask bench images`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Approximate uncompressed size of the image in MB.
    #[arg(long, default_value_t = 200)]
    pub mb: usize,
    /// Runs of each configuration (the median is reported; the build machines are shared).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Cached lookups timed.
    #[arg(long, default_value_t = 10_000)]
    pub lookups: usize,
}

/// Removes the work directory at the end, also on errors.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn build_bench_binary() -> anyhow::Result<PathBuf> {
    let target_dir = hearth_testkit::artifacts::artifacts_dir().join("release");
    let mut cmd = hearth_testkit::artifacts::nested_cargo();
    cmd.current_dir(util::root())
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "hearth-images",
        ])
        .args(["--example", "bench_pull", "--target-dir"])
        .arg(&target_dir);
    util::run(&mut cmd)?;
    Ok(target_dir.join("release/examples/bench_pull"))
}

fn json_of(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = output(cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("Unexpected output: {out}"))
}

/// Flushes dirty pages, so one measurement does not pay for the previous one's writeback.
fn sync() -> anyhow::Result<()> {
    util::run(&mut Command::new("sync"))
}

fn baseline(reference: &str, dir: &Path) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    sync()?;
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let start = Instant::now();
    output(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:full", layout.display())),
    )?;
    output(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:full", layout.display()))
            .arg(&bundle),
    )?;
    output(
        Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(dir.join("rootfs.erofs"))
            .arg(bundle.join("rootfs")),
    )?;
    Ok(start.elapsed().as_secs_f64())
}

/// The 1-minute load average (the machines are shared: figures mean little without it).
fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!(
            "`cargo xtask bench images` needs root (ownership in unpacked layers, like the agent)"
        );
    }
    let bin = util::step("build bench_pull (release)", build_bench_binary)?;
    let work =
        WorkDir(std::env::temp_dir().join(format!("hearth-bench-images-{}", std::process::id())));
    std::fs::create_dir_all(&work.0)?;
    let layout_dir = work.0.join("layouts");
    let digests = util::step("generate the test image", || {
        json_of(
            Command::new(&bin)
                .arg("layout")
                .arg(&layout_dir)
                .arg(args.mb.to_string()),
        )
    })?;
    let registry = Registry::start();
    let (base_ref, full_ref) = util::step("push the image with skopeo", || {
        Ok((
            registry.push_layout(&layout_dir.join("base"), "base", "bench/base", "v1"),
            registry.push_layout(&layout_dir.join("full"), "full", "bench/app", "v1"),
        ))
    })?;
    let _ = std::fs::remove_dir_all(&layout_dir);
    let host = registry.host();

    let (mut cold, mut cached, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let load_before = load();
    let (mut compressed, mut rootfs_bytes, mut cached_downloaded) = (0u64, 0u64, 0u64);
    let mut lookup_root = None;
    for run in 0..args.runs.max(1) {
        let root = work.0.join(format!("cold-{run}"));
        sync()?;
        let r = json_of(
            Command::new(&bin)
                .arg("pull")
                .arg(&root)
                .arg(&host)
                .arg(&full_ref),
        )?;
        cold.push(r["seconds"].as_f64().context("seconds")?);
        compressed = r["compressed_bytes"].as_u64().unwrap_or(0);
        rootfs_bytes = r["rootfs_bytes"].as_u64().unwrap_or(0);
        let _ = std::fs::remove_dir_all(&root);

        let root = work.0.join(format!("cached-{run}"));
        sync()?;
        let r = json_of(
            Command::new(&bin)
                .arg("pull")
                .arg(&root)
                .arg(&host)
                .arg(&full_ref)
                .arg(&base_ref),
        )?;
        cached.push(r["seconds"].as_f64().context("seconds")?);
        // Includes the untimed base pull; the difference to the full size is what was skipped.
        cached_downloaded = r["bytes_downloaded"].as_u64().unwrap_or(0);
        if let Some(old) = lookup_root.replace(root) {
            let _ = std::fs::remove_dir_all(old);
        }

        let dir = work.0.join(format!("baseline-{run}"));
        base.push(baseline(&full_ref, &dir)?);
        let _ = std::fs::remove_dir_all(&dir);
        if !args.json {
            eprintln!(
                "run {}: cold {:.2} s, base cached {:.2} s, skopeo+umoci+mkfs {:.2} s (load {:.2})",
                run + 1,
                cold[run],
                cached[run],
                base[run],
                load()
            );
        }
    }
    let load_after = load();
    let lookup_root = lookup_root.expect("at least one run");
    let l = json_of(
        Command::new(&bin)
            .arg("lookup")
            .arg(&lookup_root)
            .arg(&host)
            .arg(&full_ref)
            .arg(args.lookups.to_string()),
    )?;
    let lookups: Vec<f64> = l["lookup_ms"]
        .as_array()
        .context("lookup_ms")?
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    let lookup = summarize(&lookups);
    let open_ms = l["open_ms"].as_f64().unwrap_or(0.0);

    let (cold_s, cached_s, base_s) = (
        summarize(&cold).p50,
        summarize(&cached).p50,
        summarize(&base).p50,
    );
    let mb = compressed as f64 / 1e6;
    let speedup = base_s / cold_s;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "image_compressed_bytes": compressed,
                "rootfs_bytes": rootfs_bytes,
                "layers": 5,
                "runs": args.runs,
                "cold_pull_s": cold_s,
                "cached_base_pull_s": cached_s,
                "baseline_s": base_s,
                "speedup_ratio": speedup,
                "cached_base_speedup_ratio": base_s / cached_s,
                "cached_base_over_cold": cached_s / cold_s,
                "load_before": load_before,
                "load_after": load_after,
                "cold_mb_per_s": mb / cold_s,
                "baseline_mb_per_s": mb / base_s,
                "cached_lookup_ms": lookup.p50,
                "cached_lookup_p99_ms": lookup.p99,
                "cache_open_ms": open_ms,
                "cold_pull_runs_s": cold,
                "cached_base_pull_runs_s": cached,
                "baseline_runs_s": base,
                "digests": digests,
            })
        );
    } else {
        println!(
            "image: 5 layers, {mb:.1} MB compressed, rootfs image {:.1} MB; medians of {} runs",
            rootfs_bytes as f64 / 1e6,
            args.runs
        );
        println!("{:<44} {:>8} {:>9} {:>7}", "", "seconds", "MB/s", "ratio");
        println!(
            "{:<44} {:>8.2} {:>9.1} {:>7.2}",
            "hearth cold pull+unpack+mkfs.erofs",
            cold_s,
            mb / cold_s,
            speedup
        );
        println!(
            "{:<44} {:>8.2} {:>9.1} {:>7.2}",
            "hearth, base layers cached",
            cached_s,
            mb / cached_s,
            base_s / cached_s
        );
        println!(
            "{:<44} {:>8.2} {:>9.1} {:>7.2}",
            "baseline skopeo copy+umoci unpack+mkfs.erofs",
            base_s,
            mb / base_s,
            1.0
        );
        println!("(ratio = baseline seconds / these seconds; > 1 means Hearth is faster)");
        println!(
            "base cached / cold: {:.2}; 1-minute load {load_before:.2} before, {load_after:.2} after",
            cached_s / cold_s
        );
        println!(
            "cached lookup: p50 {:.4} ms, p99 {:.4} ms, max {:.4} ms over {} lookups; cache open {open_ms:.2} ms",
            lookup.p50, lookup.p99, lookup.max, lookup.n
        );
        println!(
            "bytes downloaded in the cached-base run (base pull + top layers): {:.1} MB",
            cached_downloaded as f64 / 1e6
        );
    }
    Ok(())
}
