//! `cargo xtask bench vmm` (issue 3): hearth-vmm against `qemu-system-x86_64 -M microvm
//! -enable-kvm`, booting the same `boot_timer` test guest.
//!
//! - start → guest: from just before `spawn` to the moment the harness reads the guest's first
//!   sign of life: hearth-vmm's boot-timer line (the guest's first instruction writes the boot
//!   timer), qemu's first serial byte (the guest's PVH entry writes it first).
//! - start → exit: from `spawn` to `wait4` returning (hearth-vmm: i8042 reset; qemu:
//!   isa-debug-exit).
//! - peak RSS: `ru_maxrss` from `wait4` (the kernel's VmHWM at exit) for both.
//! - VMM overhead: hearth-vmm's VmHWM minus the resident size of its guest-memory mapping,
//!   sampled while a guest that waits (`ctrl_alt_del`) runs.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use super::stats::{Summary, summarize};
use crate::util;

/// Options of `cargo xtask bench vmm`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measured runs per VMM.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
}

const WARMUP: usize = 3;
const OVERHEAD_RUNS: usize = 5;
const MEMORY_MIB: u64 = 128;
const BOOT_TIMER_PREFIX: &str = "hearth-vmm boot-timer: guest_boot_us=";

/// One run's measurements.
struct Sample {
    to_guest_ms: f64,
    to_exit_ms: f64,
    max_rss_kib: u64,
    /// What the VMM itself reported (hearth-vmm only): µs from its main() to the write.
    reported_us: Option<u64>,
}

/// Where the first sign of life appears.
#[derive(Clone, Copy)]
enum Marker {
    /// A line on stderr starting with this.
    StderrLine(&'static str),
    /// This byte on stdout.
    StdoutByte(u8),
}

fn wait4(pid: u32) -> anyhow::Result<(i32, u64)> {
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child and fills our out-parameters.
        let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
        if r == pid as i32 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    Ok((code, usage.ru_maxrss as u64))
}

fn run_once(mut cmd: Command, marker: Marker, ok_codes: &[i32]) -> anyhow::Result<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("Cannot start `{}`", util::show(&cmd)))?;
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    // Both pipes are drained on threads so neither can fill up and block the child.
    let seen = std::thread::spawn(move || -> (Option<Instant>, Option<u64>, String) {
        match marker {
            Marker::StderrLine(prefix) => {
                let other = std::thread::spawn(move || {
                    let mut s = String::new();
                    let _ = BufReader::new(stdout).read_to_string(&mut s);
                    s
                });
                let mut at = None;
                let mut reported = None;
                let mut text = String::new();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if at.is_none()
                        && let Some(v) = line.strip_prefix(prefix)
                    {
                        at = Some(Instant::now());
                        reported = v.trim().parse().ok();
                    }
                    text.push_str(&line);
                    text.push('\n');
                }
                text.push_str(&other.join().unwrap_or_default());
                (at, reported, text)
            }
            Marker::StdoutByte(b) => {
                let err = std::thread::spawn(move || {
                    let mut s = String::new();
                    let _ = BufReader::new(stderr).read_to_string(&mut s);
                    s
                });
                let mut at = None;
                let mut out = Vec::new();
                let mut r = BufReader::new(stdout);
                let mut byte = [0u8; 1];
                while let Ok(1) = r.read(&mut byte) {
                    if at.is_none() && byte[0] == b {
                        at = Some(Instant::now());
                    }
                    out.push(byte[0]);
                }
                let mut text = String::from_utf8_lossy(&out).into_owned();
                text.push_str(&err.join().unwrap_or_default());
                (at, None, text)
            }
        }
    });
    let (code, max_rss_kib) = wait4(child.id())?;
    let exited = Instant::now();
    let (at, reported_us, text) = seen
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    if !ok_codes.contains(&code) {
        bail!("`{}` exited with {code}: {}", util::show(&cmd), text.trim());
    }
    let Some(at) = at else {
        bail!(
            "`{}` showed no sign of the guest: {}",
            util::show(&cmd),
            text.trim()
        );
    };
    Ok(Sample {
        to_guest_ms: (at - start).as_secs_f64() * 1e3,
        to_exit_ms: (exited - start).as_secs_f64() * 1e3,
        max_rss_kib,
        reported_us,
    })
}

fn series(
    what: &str,
    runs: usize,
    json: bool,
    mut make: impl FnMut() -> Command,
    marker: Marker,
    ok: &[i32],
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + WARMUP {
        let s = run_once(make(), marker, ok).with_context(|| format!("{what} run {i}"))?;
        if i >= WARMUP {
            samples.push(s);
        }
    }
    if !json {
        eprintln!("{what}: {runs} runs done");
    }
    Ok(samples)
}

/// hearth-vmm's VmHWM minus its guest memory's resident size, in KiB, with a waiting guest.
fn overhead_kib(vmm: &Path, waiter: &Path, dir: &Path, i: usize) -> anyhow::Result<u64> {
    let ctl = dir.join(format!("ctl{i}.sock"));
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(waiter)
        .args(["--memory-mib", &MEMORY_MIB.to_string(), "--control-socket"])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("Cannot start hearth-vmm")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    while !line.contains("cad: waiting") {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("the waiting guest did not start");
        }
    }
    let pid = child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    // The guest-memory mapping is the anonymous mapping of exactly the guest's size.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut guest_rss = None;
    let mut size_matches = false;
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Size:") {
            size_matches = v.trim() == format!("{} kB", MEMORY_MIB * 1024);
        } else if let Some(v) = l.strip_prefix("Rss:")
            && size_matches
        {
            guest_rss = v.trim().trim_end_matches("kB").trim().parse::<u64>().ok();
            size_matches = false;
        }
    }
    let guest_rss = guest_rss.context("guest memory mapping not found in smaps")?;
    let mut s = UnixStream::connect(&ctl)?;
    s.write_all(b"shutdown\n")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    let (code, _) = wait4(pid)?;
    if code != 0 {
        bail!("hearth-vmm with the waiting guest exited with {code}");
    }
    Ok(hwm.saturating_sub(guest_rss))
}

fn build_vmm() -> anyhow::Result<PathBuf> {
    let target = hearth_testkit::artifacts::artifacts_dir().join("bench-vmm");
    util::run(
        util::cargo()
            .current_dir(util::root())
            .args([
                "build",
                "--quiet",
                "--release",
                "--package",
                "hearth-vmm",
                "--bin",
                "hearth-vmm",
                "--target-dir",
            ])
            .arg(&target),
    )?;
    Ok(target.join("release/hearth-vmm"))
}

fn ms(s: &Summary) -> String {
    format!("{:>8.1} {:>8.1} {:>8.1}", s.p50, s.p99, s.max)
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("`cargo xtask bench vmm` needs /dev/kvm");
    }
    let vmm = build_vmm()?;
    let guest = hearth_testkit::artifacts::test_guest("boot_timer");
    let waiter = hearth_testkit::artifacts::test_guest("ctrl_alt_del");
    let runs = args.runs.max(1);

    let ours = series(
        "hearth-vmm",
        runs,
        args.json,
        || {
            let mut c = Command::new(&vmm);
            c.arg("--kernel").arg(&guest).args([
                "--memory-mib",
                &MEMORY_MIB.to_string(),
                "--serial",
                "none",
            ]);
            c
        },
        Marker::StderrLine(BOOT_TIMER_PREFIX),
        &[0],
    )?;

    let qemu = if util::have("qemu-system-x86_64") {
        Some(series(
            "qemu microvm",
            runs,
            args.json,
            || {
                let mut c = Command::new("qemu-system-x86_64");
                c.args([
                    "-M",
                    "microvm,x-option-roms=off,rtc=off",
                    "-enable-kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                    "-m",
                    &MEMORY_MIB.to_string(),
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04",
                    "-kernel",
                ])
                .arg(&guest);
                c
            },
            Marker::StdoutByte(b'T'),
            // isa-debug-exit: (value << 1) | 1.
            &[1],
        )?)
    } else {
        None
    };

    let dir = tempfile_dir()?;
    let mut overheads = Vec::new();
    for i in 0..OVERHEAD_RUNS {
        overheads.push(overhead_kib(&vmm, &waiter, &dir, i)? as f64 / 1024.0);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let g = summarize(&ours.iter().map(|s| s.to_guest_ms).collect::<Vec<_>>());
    let e = summarize(&ours.iter().map(|s| s.to_exit_ms).collect::<Vec<_>>());
    let rss = summarize(
        &ours
            .iter()
            .map(|s| s.max_rss_kib as f64 / 1024.0)
            .collect::<Vec<_>>(),
    );
    let reported = summarize(
        &ours
            .iter()
            .map(|s| s.reported_us.unwrap_or(0) as f64 / 1e3)
            .collect::<Vec<_>>(),
    );
    let ov = summarize(&overheads);
    let q = qemu.as_ref().map(|q| {
        (
            summarize(&q.iter().map(|s| s.to_guest_ms).collect::<Vec<_>>()),
            summarize(&q.iter().map(|s| s.to_exit_ms).collect::<Vec<_>>()),
            summarize(
                &q.iter()
                    .map(|s| s.max_rss_kib as f64 / 1024.0)
                    .collect::<Vec<_>>(),
            ),
        )
    });

    if args.json {
        let mut j = serde_json::json!({
            "runs": runs,
            "start_to_guest_p50_ms": g.p50,
            "start_to_guest_p99_ms": g.p99,
            "start_to_exit_p50_ms": e.p50,
            "start_to_exit_p99_ms": e.p99,
            "vmm_reported_boot_p50_ms": reported.p50,
            "peak_rss_p50_mib": rss.p50,
            "vmm_overhead_mib": ov.p50,
            "targets": {"start_to_guest_p50_ms": 10.0, "vmm_overhead_mib": 5.0},
        });
        if let Some((qg, qe, qr)) = &q {
            j["baseline"] = serde_json::json!({
                "name": "qemu-system-x86_64 -M microvm -enable-kvm (PVH)",
                "start_to_guest_p50_ms": qg.p50,
                "start_to_guest_p99_ms": qg.p99,
                "start_to_exit_p50_ms": qe.p50,
                "peak_rss_p50_mib": qr.p50,
            });
            j["ratio_start_to_guest_p50"] = serde_json::json!(g.p50 / qg.p50);
            j["ratio_start_to_exit_p50"] = serde_json::json!(e.p50 / qe.p50);
            j["ratio_peak_rss_p50"] = serde_json::json!(rss.p50 / qr.p50);
        }
        println!("{j}");
        return Ok(());
    }

    println!("hearth-vmm vs qemu -M microvm -enable-kvm, boot_timer guest, {runs} runs each");
    println!("{:<34} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
    println!("{:<34} {}", "hearth-vmm start → guest (ms)", ms(&g));
    println!("{:<34} {}", "hearth-vmm start → exit (ms)", ms(&e));
    println!("{:<34} {}", "hearth-vmm main() → guest (ms)", ms(&reported));
    println!("{:<34} {}", "hearth-vmm peak RSS (MiB)", ms(&rss));
    println!("{:<34} {}", "hearth-vmm overhead (MiB)", ms(&ov));
    if let Some((qg, qe, qr)) = &q {
        println!("{:<34} {}", "qemu start → guest (ms)", ms(qg));
        println!("{:<34} {}", "qemu start → exit (ms)", ms(qe));
        println!("{:<34} {}", "qemu peak RSS (MiB)", ms(qr));
        println!(
            "ratio hearth-vmm / qemu (p50): start → guest {:.3}, start → exit {:.3}, peak RSS {:.3}",
            g.p50 / qg.p50,
            e.p50 / qe.p50,
            rss.p50 / qr.p50
        );
    } else {
        println!("qemu-system-x86_64 not found: no baseline");
    }
    println!(
        "targets: start → guest p50 < 10 ms: {}; overhead < 5 MiB: {}",
        if g.p50 < 10.0 { "met" } else { "MISSED" },
        if ov.p50 < 5.0 { "met" } else { "MISSED" }
    );
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("hearth-bench-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
