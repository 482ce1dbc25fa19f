//! `cargo xtask setup`: installs everything the build and the tests need, idempotently.
//!
//! The plan is worked out first (what is missing); if anything needs root and we are not root,
//! nothing is installed and the error says so. Each step prints one line: `done` or `already
//! present` (on stderr, so `--json` output of tasks that call setup stays clean). A failed step names what failed and the command that fixes it.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{self, have, output, show};

/// Options of `cargo xtask setup`.
#[derive(clap::Args)]
pub struct Args {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
}

/// Debian packages the build, the tests, the benchmarks and the demo use.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    // bpf-linker is built against Debian's LLVM 22.
    ("llvm-22-dev", "bpf-linker"),
    ("libpolly-22-dev", "bpf-linker"),
    ("libzstd-dev", "bpf-linker"),
    ("zlib1g-dev", "bpf-linker"),
    ("protobuf-compiler", "prost-build (protoc)"),
    ("libfontconfig1-dev", "benchmark charts (plotters)"),
    ("fonts-dejavu-core", "benchmark charts (plotters)"),
    ("pkg-config", "native build scripts"),
    (
        "musl-tools",
        "static hearth-init (musl-gcc for C dependencies)",
    ),
    ("e2fsprogs", "ext4 rootfs images"),
    ("erofs-utils", "erofs rootfs images"),
    ("busybox-static", "test workloads"),
    (
        "docker-registry",
        "a real OCI registry for tests and the demo",
    ),
    ("skopeo", "pushing test images, the images baseline"),
    ("umoci", "building test images, the images baseline"),
    ("runc", "the container baseline in benchmarks"),
    (
        "qemu-system-x86",
        "TCG boots of the guest kernel, the VMM baseline",
    ),
    ("iproute2", "network namespaces, veth, TAP"),
    ("nftables", "NAT for instance egress"),
    ("curl", "demo and tests"),
    ("iperf3", "eBPF throughput benchmark"),
    ("sockperf", "eBPF latency benchmark"),
    ("bpftool", "inspecting attached programs in tests"),
    ("openssl", "test certificate authorities"),
    ("cpio", "guest initramfs"),
    ("linux-source-6.12", "the guest kernel's source"),
    ("bc", "kernel build"),
    ("flex", "kernel build"),
    ("bison", "kernel build"),
    ("libelf-dev", "kernel build"),
    ("libssl-dev", "kernel build"),
    ("make", "kernel build"),
    ("gcc", "kernel build, C dependencies"),
    ("systemd", "systemd-analyze verify of the installed unit"),
];

/// Rust targets the host toolchain needs.
pub const RUST_TARGETS: &[(&str, &str)] = &[
    ("x86_64-unknown-linux-musl", "static hearth-init"),
    ("x86_64-unknown-none", "no_std test guests"),
];

/// The toolchain that builds the eBPF programs (and runs cargo-fuzz): nightly when the machine
/// has one, else stable with `RUSTC_BOOTSTRAP=1`. Mirrors the choice in `agent/build.rs`.
pub fn unstable_toolchain() -> String {
    if let Ok(t) = std::env::var("HEARTH_EBPF_TOOLCHAIN")
        && !t.is_empty()
    {
        return t;
    }
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if nightly {
        "nightly".into()
    } else {
        "stable".into()
    }
}

/// Sets `RUSTC_BOOTSTRAP=1` on `cmd` unless the toolchain is a nightly.
pub fn unstable_env(cmd: &mut Command, toolchain: &str) {
    if !toolchain.starts_with("nightly") {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
}

fn missing_apt_packages() -> anyhow::Result<Vec<&'static str>> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"]);
    cmd.args(APT_PACKAGES.iter().map(|(p, _)| *p));
    // dpkg-query exits 1 when some package is unknown; its stdout is still complete.
    let out = cmd
        .output()
        .context("Cannot run dpkg-query: setup supports Debian 12 and its derivatives")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(p, _)| p)
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed.contains(p))
        .collect())
}

fn rustup_active_toolchain() -> anyhow::Result<String> {
    let out = output(Command::new("rustup").args(["show", "active-toolchain"]))?;
    Ok(out.split_whitespace().next().unwrap_or("stable").to_owned())
}

fn missing_targets(toolchain: &str) -> anyhow::Result<Vec<&'static str>> {
    let out = output(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    Ok(RUST_TARGETS
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| !out.lines().any(|l| l.trim() == *t))
        .collect())
}

fn has_component(toolchain: &str, component: &str) -> anyhow::Result<bool> {
    let out = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    Ok(out.lines().any(|l| l.trim().starts_with(component)))
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin").join(name)
}

/// True when bpf-linker is installed and built against LLVM 22 (the LLVM of our rustc).
fn bpf_linker_ok() -> bool {
    let Some(path) = util::which("bpf-linker").or_else(|| {
        let p = cargo_bin("bpf-linker");
        p.exists().then_some(p)
    }) else {
        return false;
    };
    // Dynamically linked builds name their libLLVM; that is the most direct evidence.
    if let Ok(ldd) = output(Command::new("ldd").arg(&path))
        && ldd.contains("libLLVM")
    {
        return ldd.contains("libLLVM.so.22") || ldd.contains("libLLVM-22");
    }
    // Otherwise trust cargo's record of the features it was installed with.
    let crates2 = cargo_bin("").parent().map(|h| h.join(".crates2.json"));
    crates2
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v["installs"].as_object().map(|m| {
                m.iter().any(|(k, v)| {
                    k.starts_with("bpf-linker ")
                        && v["features"]
                            .as_array()
                            .is_some_and(|f| f.iter().any(|f| f == "llvm-22"))
                })
            })
        })
        .unwrap_or(false)
}

fn cargo_subcommand_present(sub: &str) -> bool {
    util::cargo()
        .args([sub, "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One thing setup makes sure of.
struct Step {
    name: String,
    /// None when already present; otherwise the commands that install it.
    fix: Option<Vec<Command>>,
    needs_root: bool,
}

fn plan() -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();

    let missing = missing_apt_packages()?;
    steps.push(Step {
        name: format!("apt packages ({} needed)", APT_PACKAGES.len()),
        needs_root: !missing.is_empty(),
        fix: (!missing.is_empty()).then(|| {
            let mut update = Command::new("apt-get");
            update.args(["update", "-q"]);
            let mut install = Command::new("apt-get");
            install
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive");
            vec![update, install]
        }),
    });

    let host = rustup_active_toolchain()?;
    let targets = missing_targets(&host)?;
    steps.push(Step {
        name: format!(
            "rust targets {} ({host})",
            RUST_TARGETS
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        needs_root: false,
        fix: (!targets.is_empty()).then(|| {
            let mut cmd = Command::new("rustup");
            cmd.args(["target", "add", "--toolchain", &host])
                .args(&targets);
            vec![cmd]
        }),
    });

    let unstable = unstable_toolchain();
    let rust_src = has_component(&unstable, "rust-src")?;
    steps.push(Step {
        name: format!("rust-src for the eBPF toolchain ({unstable})"),
        needs_root: false,
        fix: (!rust_src).then(|| {
            let mut cmd = Command::new("rustup");
            cmd.args(["component", "add", "rust-src", "--toolchain", &unstable]);
            vec![cmd]
        }),
    });

    let linker = bpf_linker_ok();
    steps.push(Step {
        name: "bpf-linker (LLVM 22)".into(),
        needs_root: false,
        fix: (!linker).then(|| {
            let mut cmd = util::cargo();
            cmd.args([
                "install",
                "--locked",
                "--force",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22");
            vec![cmd]
        }),
    });

    for (sub, krate) in [("fuzz", "cargo-fuzz"), ("nextest", "cargo-nextest")] {
        let present = cargo_subcommand_present(sub);
        steps.push(Step {
            name: krate.into(),
            needs_root: false,
            fix: (!present).then(|| {
                let mut cmd = util::cargo();
                cmd.args(["install", "--locked", krate]);
                vec![cmd]
            }),
        });
    }
    Ok(steps)
}

/// Runs setup; prints one line per step.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let steps = plan()?;
    let blocked: Vec<&str> = steps
        .iter()
        .filter(|s| s.fix.is_some() && s.needs_root)
        .map(|s| s.name.as_str())
        .collect();
    if !args.check && !blocked.is_empty() && !util::is_root() {
        bail!(
            "Setup needs root to install {} with apt-get; run it again as root (e.g. `sudo -E cargo xtask setup`). Nothing was installed.",
            blocked.join(", ")
        );
    }
    let mut missing = 0;
    for step in steps {
        match step.fix {
            None => eprintln!("setup: {:<55} already present", step.name),
            Some(_) if args.check => {
                missing += 1;
                eprintln!("setup: {:<55} MISSING", step.name);
            }
            Some(cmds) => {
                for mut cmd in cmds {
                    let shown = show(&cmd);
                    let status = cmd.status().with_context(|| {
                        format!("Setup step `{}` could not start `{shown}`", step.name)
                    })?;
                    if !status.success() {
                        bail!(
                            "Setup step `{}` failed ({status}); fix it by running: {shown}",
                            step.name
                        );
                    }
                }
                eprintln!("setup: {:<55} done", step.name);
            }
        }
    }
    if missing > 0 {
        bail!("{missing} setup step(s) missing; run `cargo xtask setup`");
    }
    if !have("bpf-linker") && cargo_bin("bpf-linker").exists() {
        eprintln!(
            "setup: note: {} is not on PATH; add it so cargo finds bpf-linker",
            cargo_bin("").display()
        );
    }
    Ok(())
}
