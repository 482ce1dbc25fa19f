//! `cargo xtask test`: setup, then every check and test the project has. Exits non-zero on any
//! failure, after running all steps (so one report shows everything that is wrong).

use std::{path::Path, process::Command, time::Instant};

use anyhow::bail;

use crate::{setup, util};

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo xtask setup` (for quick local iterations; CI never passes it).
    #[arg(long)]
    pub no_setup: bool,
    /// Seconds each fuzz target runs in the smoke run (0 = build only).
    #[arg(long, default_value_t = 15)]
    pub fuzz_seconds: u64,
    /// Extra arguments for `cargo nextest run` (e.g. a test filter).
    #[arg(last = true)]
    pub nextest_args: Vec<String>,
}

/// The project's test guests workspace (built for x86_64-unknown-none).
const GUESTS: &str = "vmm/test-guests";

/// Directories holding a `cargo fuzz` project (a `fuzz/Cargo.toml`), found by walking the top
/// level folders, so adding a fuzz project needs no change here.
fn fuzz_projects(root: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return found;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir()
            || dir
                .file_name()
                .is_some_and(|n| n == "target" || n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        for candidate in [dir.join("fuzz"), dir.join("programs/fuzz")] {
            if candidate.join("Cargo.toml").is_file() {
                found.push(candidate);
            }
        }
    }
    found.sort();
    found
}

fn fuzz_smoke(root: &Path, seconds: u64) -> anyhow::Result<()> {
    let toolchain = setup::unstable_toolchain();
    let target_dir = hearth_testkit::artifacts::target_dir().join("fuzz");
    for project in fuzz_projects(root) {
        let mut list = util::cargo();
        list.current_dir(&project).args(["fuzz", "list"]);
        let targets = util::output(&mut list)?;
        for target in targets.lines().map(str::trim).filter(|t| !t.is_empty()) {
            let mut cmd = Command::new("rustup");
            // One target dir for every fuzz project: they share most dependencies, and each
            // built alone costs minutes of the CI budget.
            cmd.env("CARGO_TARGET_DIR", &target_dir);
            cmd.current_dir(&project)
                .args(["run", &toolchain, "cargo", "fuzz"])
                .arg(if seconds == 0 { "build" } else { "run" })
                .arg(target);
            if seconds > 0 {
                cmd.args(["--", &format!("-max_total_time={seconds}")]);
            }
            setup::unstable_env(&mut cmd, &toolchain);
            util::run(&mut cmd)?;
        }
    }
    Ok(())
}

/// Runs every check; returns an error naming the steps that failed.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    if !args.no_setup {
        util::step("setup", || setup::run(&setup::Args { check: false }))?;
    }
    let root = util::root();
    let mut failed = Vec::new();
    let mut check = |name: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| {
        if let Err(e) = util::step(name, f) {
            eprintln!("error: {e:#}");
            failed.push(name.to_owned());
        }
    };

    check("cargo fmt --check", &mut || {
        util::run(
            util::cargo()
                .current_dir(&root)
                .args(["fmt", "--all", "--check"]),
        )?;
        util::run(
            util::cargo()
                .current_dir(root.join(GUESTS))
                .args(["fmt", "--all", "--check"]),
        )
    });
    check("cargo clippy", &mut || {
        util::run(util::cargo().current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]))?;
        util::run(util::cargo().current_dir(root.join(GUESTS)).args([
            "clippy",
            "--release",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]))
    });
    check(
        "build test artefacts (static hearth-init, test guests)",
        &mut || {
            hearth_testkit::artifacts::hearth_init();
            hearth_testkit::artifacts::test_guest("boot_timer");
            Ok(())
        },
    );
    check("cargo nextest run", &mut || {
        let mut cmd = util::cargo();
        cmd.current_dir(&root).args([
            "nextest",
            "run",
            "--workspace",
            "--exclude",
            "hearth-ebpf",
            "--no-fail-fast",
        ]);
        cmd.args(&args.nextest_args);
        // On a machine with root and KVM nothing may skip: make skips fail.
        if util::is_root() && Path::new("/dev/kvm").exists() {
            cmd.env(hearth_testkit::skip::NO_SKIP_ENV, "1");
        }
        util::run(&mut cmd)
    });
    check("cargo test --doc", &mut || {
        util::run(util::cargo().current_dir(&root).args([
            "test",
            "--workspace",
            "--exclude",
            "hearth-ebpf",
            "--doc",
            "--quiet",
        ]))
    });
    check(
        "e2e --tcg (guest kernel + hearth-init under qemu)",
        &mut || crate::e2e::tcg(false),
    );
    check("fuzz smoke runs", &mut || {
        fuzz_smoke(&root, args.fuzz_seconds)
    });

    let mins = started.elapsed().as_secs_f64() / 60.0;
    if failed.is_empty() {
        eprintln!("cargo xtask test: all steps passed in {mins:.1} min");
        Ok(())
    } else {
        bail!(
            "{} step(s) failed in {mins:.1} min: {}",
            failed.len(),
            failed.join(", ")
        )
    }
}
