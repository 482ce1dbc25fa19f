//! `cargo xtask kernel`: builds the guest kernel from Debian's `linux-source-6.12` and
//! `images/kernel/hearth.config` (issue 3).
//!
//! Steps: `make tinyconfig`, the fragment merged on top, `make olddefconfig`, a check that every
//! line of the fragment survived (a symbol whose dependencies are missing is silently dropped by
//! Kconfig, so this names them), then `make vmlinux bzImage`.
//!
//! Results are cached under `~/.cache/hearth/kernel/` (or `$HEARTH_KERNEL_CACHE`), keyed by a
//! hash of the fragment, the source tarball and this recipe, so a second run only hashes and
//! returns. The extracted source and the build tree are kept per source tarball, so a changed
//! fragment rebuilds incrementally. A lock file serialises concurrent builds.

mod kconfig;

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use crate::util;

/// The config fragment, relative to the workspace root.
pub const FRAGMENT: &str = "images/kernel/hearth.config";
/// Debian's kernel source package ships this tarball.
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// The directory the tarball unpacks to.
const SOURCE_DIR_NAME: &str = "linux-source-6.12";
/// Bump when the build steps below change in a way that changes the result.
const RECIPE: &str = "tinyconfig+fragment+olddefconfig/v1";
/// Overrides the cache directory.
const CACHE_ENV: &str = "HEARTH_KERNEL_CACHE";

/// Options of `cargo xtask kernel`.
#[derive(clap::Args)]
pub struct Args {
    /// Rebuild even when a kernel for the current config fragment is cached.
    #[arg(long)]
    pub force: bool,
}

/// A built kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The uncompressed ELF (hearth-vmm loads it; qemu boots it through its PVH note).
    pub vmlinux: PathBuf,
    /// The compressed bzImage (the other loader path).
    pub bz_image: PathBuf,
    /// The final `.config`.
    pub config: PathBuf,
}

/// Builds (or finds cached) and returns the kernel image path (`vmlinux`).
pub fn run(args: &Args) -> anyhow::Result<PathBuf> {
    crate::setup::run(&crate::setup::Args { check: false })?;
    let kernel = build(args.force)?;
    println!("vmlinux: {}", kernel.vmlinux.display());
    println!("bzImage: {}", kernel.bz_image.display());
    println!("config:  {}", kernel.config.display());
    Ok(kernel.vmlinux)
}

/// Where kernels are cached: `$HEARTH_KERNEL_CACHE`, else `~/.cache/hearth/kernel` (XDG), else
/// the target directory.
fn cache_root() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let base = match (
        std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()),
        std::env::var_os("HOME").filter(|d| !d.is_empty()),
    ) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(home)) => PathBuf::from(home).join(".cache"),
        // No home (a bare service environment): keep it beside the build instead.
        (None, None) => hearth_testkit::artifacts::target_dir(),
    };
    Ok(base.join("hearth/kernel"))
}

/// Identifies the source tarball cheaply (path, size, mtime): a new package version changes it.
fn source_id(tarball: &Path) -> anyhow::Result<String> {
    let meta = fs::metadata(tarball).with_context(|| {
        format!(
            "Cannot read {}: install Debian's linux-source-6.12 (`cargo xtask setup` does)",
            tarball.display()
        )
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let mut h = Sha256::new();
    h.update(tarball.as_os_str().as_encoded_bytes());
    h.update(meta.len().to_le_bytes());
    h.update(mtime.to_le_bytes());
    Ok(hex::encode(&h.finalize()[..6]))
}

/// The cache key of a kernel: recipe, source and fragment.
fn cache_key(source_id: &str, fragment: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(RECIPE.as_bytes());
    h.update([0]);
    h.update(source_id.as_bytes());
    h.update([0]);
    h.update(fragment);
    hex::encode(&h.finalize()[..8])
}

fn outputs(dir: &Path) -> Kernel {
    Kernel {
        vmlinux: dir.join("vmlinux"),
        bz_image: dir.join("bzImage"),
        config: dir.join("config"),
    }
}

fn is_complete(k: &Kernel) -> bool {
    k.vmlinux.is_file() && k.bz_image.is_file() && k.config.is_file()
}

/// Builds the kernel for the current fragment unless it is cached (or `force`).
pub fn build(force: bool) -> anyhow::Result<Kernel> {
    let fragment_path = util::root().join(FRAGMENT);
    let fragment_text = fs::read(&fragment_path)
        .with_context(|| format!("Cannot read {}", fragment_path.display()))?;
    let fragment = kconfig::parse_fragment(&String::from_utf8_lossy(&fragment_text))
        .with_context(|| format!("Bad config fragment {}", fragment_path.display()))?;

    let tarball = PathBuf::from(SOURCE_TARBALL);
    let src_id = source_id(&tarball)?;
    let key = cache_key(&src_id, &fragment_text);
    let root = cache_root()?;
    let out_dir = root.join("out").join(&key);
    let kernel = outputs(&out_dir);
    if !force && is_complete(&kernel) {
        eprintln!("kernel: cached ({key})");
        return Ok(kernel);
    }

    fs::create_dir_all(&root).with_context(|| format!("Cannot create {}", root.display()))?;
    let lock_path = root.join("lock");
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("Cannot open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        eprintln!(
            "kernel: waiting for another build ({})",
            lock_path.display()
        );
        lock.lock()
            .with_context(|| format!("Cannot lock {}", lock_path.display()))?;
    }
    // Another process may have built it while we waited.
    if !force && is_complete(&kernel) {
        eprintln!("kernel: cached ({key})");
        return Ok(kernel);
    }

    let started = Instant::now();
    let src = extract(&tarball, &root.join("src").join(&src_id))?;
    let build_dir = root.join("build").join(&src_id);
    if force && build_dir.exists() {
        fs::remove_dir_all(&build_dir)
            .with_context(|| format!("Cannot remove {}", build_dir.display()))?;
    }
    fs::create_dir_all(&build_dir)?;
    let log_path = build_dir.join("build.log");
    let mut log = fs::File::create(&log_path)
        .with_context(|| format!("Cannot create {}", log_path.display()))?;
    let make = |args: &[&str], log: &mut fs::File| -> anyhow::Result<()> {
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "10", "make", "-C"])
            .arg(&src)
            .arg(format!("O={}", build_dir.display()))
            .args(["ARCH=x86_64", &format!("-j{jobs}")])
            .args(args)
            // Reproducible version string: no user, host or date of this machine.
            .env("KBUILD_BUILD_USER", "hearth")
            .env("KBUILD_BUILD_HOST", "hearth")
            .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        writeln!(log, "$ {}", util::show(&cmd))?;
        let status = cmd
            .status()
            .with_context(|| format!("Cannot start `{}`", util::show(&cmd)))?;
        if !status.success() {
            bail!(
                "`{}` failed ({status}); the end of {}:\n{}",
                util::show(&cmd),
                log_path.display(),
                tail(&log_path, 40)
            );
        }
        Ok(())
    };

    eprintln!("kernel: configuring in {}", build_dir.display());
    make(&["tinyconfig"], &mut log)?;
    let dotconfig = build_dir.join(".config");
    let base = fs::read_to_string(&dotconfig)?;
    fs::write(&dotconfig, kconfig::merge(&base, &fragment))?;
    make(&["olddefconfig"], &mut log)?;
    let final_config = fs::read_to_string(&dotconfig)?;
    let missing = kconfig::missing(&fragment, &final_config);
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(sym, want, got)| format!("{sym} (wanted {want}, got {got})"))
            .collect();
        bail!(
            "{} symbol(s) of {FRAGMENT} are not in the final .config, usually because a \
             dependency is not enabled (see `make menuconfig` in {} for what each depends on): {}",
            missing.len(),
            build_dir.display(),
            list.join(", ")
        );
    }

    eprintln!(
        "kernel: building vmlinux and bzImage (about 5-8 minutes on 2 cores); log: {}",
        log_path.display()
    );
    make(&["vmlinux", "bzImage"], &mut log)?;

    // Publish atomically: a half-copied kernel is never taken for a cached one.
    let tmp = root.join("out").join(format!("{key}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    let staged = outputs(&tmp);
    fs::copy(build_dir.join("vmlinux"), &staged.vmlinux)?;
    fs::copy(build_dir.join("arch/x86/boot/bzImage"), &staged.bz_image)?;
    fs::write(&staged.config, &final_config)?;
    fs::write(tmp.join("hearth.config"), &fragment_text)?;
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir)?;
    }
    fs::rename(&tmp, &out_dir)?;
    eprintln!(
        "kernel: built in {:.0} s ({key})",
        started.elapsed().as_secs_f64()
    );
    Ok(kernel)
}

/// Unpacks the source tarball once into `dest` (atomically: into a temporary sibling first).
fn extract(tarball: &Path, dest: &Path) -> anyhow::Result<PathBuf> {
    let tree = dest.join(SOURCE_DIR_NAME);
    if tree.join("Makefile").is_file() {
        return Ok(tree);
    }
    let parent = dest.parent().context("Cache path has no parent")?;
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        "{}.tmp",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    eprintln!("kernel: unpacking {}", tarball.display());
    util::run(
        Command::new("nice")
            .args(["-n", "10", "tar", "-xf"])
            .arg(tarball)
            .arg("-C")
            .arg(&tmp),
    )?;
    if !tmp.join(SOURCE_DIR_NAME).join("Makefile").is_file() {
        bail!("{} did not unpack to {SOURCE_DIR_NAME}/", tarball.display());
    }
    if dest.exists() {
        fs::remove_dir_all(dest)?;
    }
    fs::rename(&tmp, dest)?;
    Ok(tree)
}

/// The last `n` lines of a file (for error messages).
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_fragment_and_source() {
        let a = cache_key("src1", b"CONFIG_A=y\n");
        assert_eq!(a, cache_key("src1", b"CONFIG_A=y\n"));
        assert_ne!(a, cache_key("src1", b"CONFIG_A=n\n"));
        assert_ne!(a, cache_key("src2", b"CONFIG_A=y\n"));
        assert_eq!(a.len(), 16);
    }
}
