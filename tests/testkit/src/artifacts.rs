//! Builds and locates artefacts that tests run but cargo does not build for them.
//!
//! Each is built at most once per test process, with a nested `cargo build` into its own
//! target directory (so it never waits on the build lock of the cargo that runs the tests). When
//! it is up to date that costs well under a second. `cargo xtask test` builds them up front.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
};

/// The target the static hearth-init is built for.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The target of the `no_std` test guests.
pub const GUEST_TARGET: &str = "x86_64-unknown-none";

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("testkit lives two levels below the workspace root")
        .to_path_buf()
}

/// The target directory of the cargo invocation that built the tests.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Where nested builds put their output.
pub fn artifacts_dir() -> PathBuf {
    target_dir().join("hearth-artifacts")
}

/// A `cargo` command for a nested build: the outer cargo's target dir, flags and target are
/// removed so the nested build uses its own (see [`artifacts_dir`]).
pub fn nested_cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // The outer cargo's settings must not leak into the nested build.
    for var in [
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(mut cmd: Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn once(key: &str, build: impl FnOnce() -> PathBuf) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(key) {
        return path.clone();
    }
    let path = build();
    assert!(
        path.is_file(),
        "build of {key} did not produce {}",
        path.display()
    );
    built.insert(key.to_owned(), path.clone());
    path
}

/// The static, release-built `hearth-init` for x86_64 musl.
pub fn hearth_init() -> PathBuf {
    once("hearth-init", || {
        let target_dir = artifacts_dir().join("musl");
        let mut cmd = nested_cargo();
        cmd.current_dir(workspace_root())
            .args([
                "build",
                "--quiet",
                "--release",
                "--package",
                "hearth-init",
                "--bin",
                "hearth-init",
            ])
            .args(["--target", MUSL_TARGET, "--target-dir"])
            .arg(&target_dir);
        run(cmd);
        target_dir.join(MUSL_TARGET).join("release/hearth-init")
    })
}

/// A `no_std` test guest from `vmm/test-guests` by binary name (e.g. `boot_timer`).
pub fn test_guest(name: &str) -> PathBuf {
    once(&format!("guest:{name}"), || {
        let dir = workspace_root().join("vmm/test-guests");
        let target_dir = artifacts_dir().join("guests");
        let mut cmd = nested_cargo();
        cmd.current_dir(&dir)
            .args(["build", "--quiet", "--release", "--target-dir"])
            .arg(&target_dir);
        run(cmd);
        target_dir.join(GUEST_TARGET).join("release").join(name)
    })
}

/// A host binary of a workspace package, built in the debug profile into the artefacts
/// directory (for tests of one package that run another package's binary).
pub fn host_bin(package: &str, bin: &str) -> PathBuf {
    once(&format!("bin:{package}:{bin}"), || {
        let target_dir = artifacts_dir().join("host");
        let mut cmd = nested_cargo();
        cmd.current_dir(workspace_root())
            .args([
                "build",
                "--quiet",
                "--package",
                package,
                "--bin",
                bin,
                "--target-dir",
            ])
            .arg(&target_dir);
        run(cmd);
        target_dir.join("debug").join(bin)
    })
}
