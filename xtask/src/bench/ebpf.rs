//! `cargo xtask bench ebpf` (issue 6): iperf3 throughput (both directions) and sockperf UDP
//! ping-pong latency between two network namespaces over a veth pair, without and with
//! Hearth's eBPF filter on the host-side end, in the same run.
//!
//! The namespace `inst` plays the instance, `host` the node; the filter is attached to the host
//! end exactly as the agent attaches it to an instance's interface, with a policy that allows
//! the benchmark's TCP and UDP ports (so every packet takes the full path: parsing,
//! anti-spoofing, flow table, policy on the first packet of each flow, counters). Every
//! measurement runs without and with the filter back to back, the order flipping each round;
//! the losses and the added latency are medians over rounds of these pairs (a shared, busy
//! machine drifts a lot between rounds), the absolute figures medians per side. The filter is
//! attached by `agent/examples/ebpf_tool.rs`, which also measures the programs' own cost per
//! packet with `BPF_PROG_TEST_RUN`. sockperf reports half the round trip, i.e. one packet
//! through one program: the difference of its medians is the latency added per packet.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hearth_testkit::netns::{ChildGuard, NetNs, unique_ifname};

use super::stats::summarize;
use crate::util::{self, output};

/// Options of `cargo xtask bench ebpf`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Rounds; each measures both configurations.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per iperf3 and sockperf measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// sockperf message size in bytes.
    #[arg(long, default_value_t = 64)]
    pub msg_size: u32,
}

const HOST_IP: &str = "10.99.0.1";
const INST_IP: &str = "10.99.0.2";
const INST_MAC: &str = "02:48:54:99:00:02";
const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const INSTANCE: &str = "bench";
/// Targets from issue 6.
const MAX_LOSS_PCT: f64 = 5.0;
const MAX_ADDED_US: f64 = 2.0;

fn build_tool() -> anyhow::Result<PathBuf> {
    let target_dir = hearth_testkit::artifacts::artifacts_dir().join("host");
    let mut cmd = hearth_testkit::artifacts::nested_cargo();
    cmd.current_dir(util::root())
        .args(["build", "--quiet", "--package", "hearth-agent"])
        .args(["--example", "ebpf_tool", "--target-dir"])
        .arg(&target_dir);
    util::run(&mut cmd)?;
    Ok(target_dir.join("debug/examples/ebpf_tool"))
}

/// A bpffs mount of the benchmark's own, unmounted on drop.
struct Bpffs(PathBuf);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

struct Lab {
    // Servers first: they must stop before their namespace goes.
    _servers: Vec<ChildGuard>,
    host: NetNs,
    inst: NetNs,
    host_if: String,
    bpffs: Bpffs,
    tool: PathBuf,
}

impl Lab {
    fn new(tool: PathBuf) -> anyhow::Result<Lab> {
        let host = NetNs::new("bh")?;
        let inst = NetNs::new("bi")?;
        let (host_if, inst_if) = (unique_ifname("bh"), unique_ifname("bi"));
        host.add_veth(&host_if, &inst, &inst_if)?;
        inst.ip(&["link", "set", &inst_if, "address", INST_MAC])?;
        host.add_addr(&host_if, &format!("{HOST_IP}/24"))?;
        inst.add_addr(&inst_if, &format!("{INST_IP}/24"))?;
        host.up(&host_if)?;
        inst.up(&inst_if)?;
        let dir = std::env::temp_dir().join(format!("hearth-bench-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let bpffs = Bpffs(dir);
        let iperf = host.spawn(
            host.command("iperf3")
                .args(["-s", "-B", HOST_IP, "-p", &IPERF_PORT.to_string()])
                .stdout(std::process::Stdio::null()),
        )?;
        let sockperf = host.spawn(
            host.command("sockperf")
                .args(["server", "-i", HOST_IP, "-p", &SOCKPERF_PORT.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )?;
        let servers = vec![iperf, sockperf];
        Ok(Lab {
            _servers: servers,
            host,
            inst,
            host_if,
            bpffs,
            tool,
        })
    }

    fn tool(&self, sub: &str) -> Command {
        let mut cmd = Command::new(&self.tool);
        cmd.arg(sub)
            .arg("--bpffs")
            .arg(&self.bpffs.0)
            .args(["--instance", INSTANCE]);
        cmd
    }

    fn attach(&self) -> anyhow::Result<()> {
        let mut cmd = self.tool("attach");
        cmd.args(["--netns", self.host.name(), "--ifname", &self.host_if])
            .args(["--mac", INST_MAC, "--ipv4", INST_IP, "--gateway", HOST_IP])
            .args(["--allow", &format!("{HOST_IP} tcp {IPERF_PORT}")])
            .args(["--allow", &format!("{HOST_IP} udp {SOCKPERF_PORT}")]);
        output(&mut cmd)?;
        Ok(())
    }

    fn remove(&self) -> anyhow::Result<()> {
        output(&mut self.tool("remove"))?;
        Ok(())
    }

    fn counters(&self) -> anyhow::Result<String> {
        output(&mut self.tool("counters"))
    }

    /// iperf3 from the instance to the host (`reverse`: host to instance): Gbit/s, and the
    /// CPU time both iperf3 processes used per Gbit (core-seconds; the veth transfer and the
    /// programs run in their contexts). Retries while the server is starting or busy.
    fn iperf(&self, seconds: u32, reverse: bool) -> anyhow::Result<(f64, f64)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = self.inst.command("iperf3");
            cmd.args(["-c", HOST_IP, "-p", &IPERF_PORT.to_string(), "-J"])
                .args(["-t", &seconds.to_string()]);
            if reverse {
                cmd.arg("-R");
            }
            // iperf3 -J reports some failures (server not up yet) in the JSON.
            let result = output(&mut cmd).and_then(|out| {
                let v: serde_json::Value = serde_json::from_str(&out)
                    .with_context(|| format!("Unexpected iperf3 output: {out}"))?;
                if let Some(e) = v["error"].as_str() {
                    bail!("iperf3: {e}");
                }
                let bps = v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .with_context(|| format!("No throughput in iperf3 output: {out}"))?;
                let cpu = &v["end"]["cpu_utilization_percent"];
                let cores = (cpu["host_total"].as_f64().unwrap_or(f64::NAN)
                    + cpu["remote_total"].as_f64().unwrap_or(f64::NAN))
                    / 100.0;
                Ok((bps / 1e9, cores / (bps / 1e9)))
            });
            match result {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() < deadline => {
                    note(&format!("iperf3 not ready, retrying: {e:#}"));
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// sockperf ping-pong from the instance: (p50, p99) of half the round trip, in µs.
    fn sockperf(&self, seconds: u32, msg_size: u32) -> anyhow::Result<(f64, f64)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = self.inst.command("sockperf");
            cmd.args(["ping-pong", "-i", HOST_IP, "-p", &SOCKPERF_PORT.to_string()])
                .args(["-t", &seconds.to_string(), "-m", &msg_size.to_string()]);
            let out = output(&mut cmd);
            let parsed = out
                .as_ref()
                .ok()
                .and_then(|o| Some((percentile(o, "50.000")?, percentile(o, "99.000")?)));
            match (parsed, out) {
                (Some(p), _) => return Ok(p),
                (None, _) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(300));
                }
                (None, Ok(o)) => bail!("Unexpected sockperf output: {o}"),
                (None, Err(e)) => return Err(e),
            }
        }
    }
}

fn note(msg: &str) {
    eprintln!("    {msg}");
}

/// `sockperf: ---> percentile 50.000 =    5.643` → 5.643.
fn percentile(out: &str, which: &str) -> Option<f64> {
    let needle = format!("percentile {which} =");
    out.lines()
        .find_map(|l| l.split_once(&needle).map(|(_, v)| v.trim().to_owned()))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[derive(Default)]
struct Side {
    forward: Vec<f64>,
    reverse: Vec<f64>,
    forward_cpu: Vec<f64>,
    reverse_cpu: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

fn median(xs: &[f64]) -> f64 {
    summarize(xs).p50
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask bench ebpf` needs root (network namespaces, eBPF)");
    }
    for p in ["iperf3", "sockperf", "ip"] {
        if !util::have(p) {
            bail!("`{p}` is missing (cargo xtask setup installs it)");
        }
    }
    if args.rounds == 0 || args.seconds == 0 {
        bail!("--rounds and --seconds must be at least 1");
    }
    let tool = util::step("build ebpf_tool", build_tool)?;
    // The programs' own cost per packet, measured in the kernel without the stack around it.
    let cost: serde_json::Value = {
        let out = output(Command::new(&tool).arg("cost"))?;
        serde_json::from_str(out.trim()).with_context(|| format!("Unexpected output: {out}"))?
    };
    let lab = Lab::new(tool)?;
    let mut without = Side::default();
    let mut with = Side::default();
    for round in 0..args.rounds {
        // Each measurement runs without and with the filter back to back (the order flips
        // every round), so the pairs see the same machine load.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut line = Vec::new();
        for metric in 0..3 {
            for filtered in order {
                if filtered {
                    lab.attach()?;
                }
                let side = if filtered { &mut with } else { &mut without };
                let tag = if filtered { "with" } else { "without" };
                match metric {
                    0 => {
                        let (v, cpu) = lab.iperf(args.seconds, false)?;
                        side.forward.push(v);
                        side.forward_cpu.push(cpu);
                        line.push(format!("out {tag} {v:.2}"));
                    }
                    1 => {
                        let (v, cpu) = lab.iperf(args.seconds, true)?;
                        side.reverse.push(v);
                        side.reverse_cpu.push(cpu);
                        line.push(format!("in {tag} {v:.2}"));
                    }
                    _ => {
                        let (p50, p99) = lab.sockperf(args.seconds, args.msg_size)?;
                        side.p50.push(p50);
                        side.p99.push(p99);
                        line.push(format!("p50 {tag} {p50:.2} µs"));
                    }
                }
                if filtered {
                    if round + 1 == args.rounds && metric == 2 && !args.json {
                        eprintln!(
                            "filter counters after the last measurement:\n{}",
                            lab.counters()?
                        );
                    }
                    lab.remove()?;
                }
            }
        }
        if !args.json {
            eprintln!("round {}: {} (Gbit/s)", round + 1, line.join(", "));
        }
    }
    report(args, &without, &with, &cost)
}

/// Median over rounds of a per-round comparison of the paired measurements.
fn paired(without: &[f64], with: &[f64], f: impl Fn(f64, f64) -> f64) -> f64 {
    let v: Vec<f64> = without.iter().zip(with).map(|(a, b)| f(*a, *b)).collect();
    median(&v)
}

fn report(
    args: &Args,
    without: &Side,
    with: &Side,
    cost: &serde_json::Value,
) -> anyhow::Result<()> {
    let ns = |k: &str| cost[k].as_f64().unwrap_or(f64::NAN);
    let (cost_out, cost_in, cost_policy) = (
        ns("egress_flow_ns"),
        ns("ingress_reply_ns"),
        ns("egress_policy_ns"),
    );
    let (tw, tf) = (median(&without.forward), median(&with.forward));
    let (rw, rf) = (median(&without.reverse), median(&with.reverse));
    let (lw, lf) = (median(&without.p50), median(&with.p50));
    let (qw, qf) = (median(&without.p99), median(&with.p99));
    // Losses and the added latency come from the pairs (same round, back to back), which
    // cancels the machine's drift far better than comparing the two medians.
    let loss = paired(&without.forward, &with.forward, |a, b| {
        (1.0 - b / a) * 100.0
    });
    let loss_rev = paired(&without.reverse, &with.reverse, |a, b| {
        (1.0 - b / a) * 100.0
    });
    let added = paired(&without.p50, &with.p50, |a, b| b - a);
    // CPU spent per Gbit: less sensitive to other load than throughput is.
    let cpu_out = paired(&without.forward_cpu, &with.forward_cpu, |a, b| {
        (b / a - 1.0) * 100.0
    });
    let cpu_in = paired(&without.reverse_cpu, &with.reverse_cpu, |a, b| {
        (b / a - 1.0) * 100.0
    });
    let met = loss < MAX_LOSS_PCT && loss_rev < MAX_LOSS_PCT && added < MAX_ADDED_US;
    if args.json {
        let v = serde_json::json!({
            "rounds": args.rounds,
            "seconds": args.seconds,
            "throughput_without_gbps": tw,
            "throughput_with_gbps": tf,
            "throughput_loss_pct": loss,
            "throughput_ratio": tf / tw,
            "reverse_throughput_without_gbps": rw,
            "reverse_throughput_with_gbps": rf,
            "reverse_throughput_loss_pct": loss_rev,
            "latency_p50_without_us": lw,
            "latency_p50_with_us": lf,
            "latency_p99_without_us": qw,
            "latency_p99_with_us": qf,
            "added_latency_us": added,
            "cpu_per_gbit_overhead_pct": cpu_out,
            "reverse_cpu_per_gbit_overhead_pct": cpu_in,
            "cpu_core_seconds_per_gbit_without": median(&without.forward_cpu),
            "cpu_core_seconds_per_gbit_with": median(&with.forward_cpu),
            "program_ns_per_packet": {
                "egress_known_flow": cost_out,
                "ingress_reply": cost_in,
                "egress_full_policy": cost_policy,
            },
            "targets": { "max_loss_pct": MAX_LOSS_PCT, "max_added_latency_us": MAX_ADDED_US },
            "targets_met": met,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "eBPF filter on a veth pair: medians of {} rounds ({} s per measurement)",
        args.rounds, args.seconds
    );
    println!(
        "{:<36} {:>10} {:>10} {:>14}",
        "", "without", "with", "with/without"
    );
    println!(
        "{:<36} {tw:>10.2} {tf:>10.2} {:>14.3}",
        "throughput instance → host (Gbit/s)",
        tf / tw
    );
    println!(
        "{:<36} {rw:>10.2} {rf:>10.2} {:>14.3}",
        "throughput host → instance (Gbit/s)",
        rf / rw
    );
    println!(
        "{:<36} {lw:>10.2} {lf:>10.2} {:>14.3}",
        "latency p50, one way (µs)",
        lf / lw
    );
    println!(
        "{:<36} {qw:>10.2} {qf:>10.2} {:>14.3}",
        "latency p99, one way (µs)",
        qf / qw
    );
    println!(
        "{:<36} {:>10.4} {:>10.4} {:>14.3}",
        "CPU per Gbit out (core-seconds)",
        median(&without.forward_cpu),
        median(&with.forward_cpu),
        median(&with.forward_cpu) / median(&without.forward_cpu)
    );
    println!(
        "{:<36} {:>10.4} {:>10.4} {:>14.3}",
        "CPU per Gbit in (core-seconds)",
        median(&without.reverse_cpu),
        median(&with.reverse_cpu),
        median(&with.reverse_cpu) / median(&without.reverse_cpu)
    );
    println!("paired medians: CPU per Gbit {cpu_out:+.1} % out, {cpu_in:+.1} % in with the filter");
    println!(
        "program cost per packet (BPF_PROG_TEST_RUN): {cost_out:.0} ns egress on a known flow, {cost_in:.0} ns ingress reply, {cost_policy:.0} ns egress through the whole policy"
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "paired medians: throughput loss {loss:.1} % out, {loss_rev:.1} % in (target < {MAX_LOSS_PCT} %: {}); added latency {added:.2} µs per packet (target < {MAX_ADDED_US} µs: {})",
        verdict(loss < MAX_LOSS_PCT && loss_rev < MAX_LOSS_PCT),
        verdict(added < MAX_ADDED_US)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_percentiles_parse() {
        let out = "sockperf: ---> percentile 99.000 =   16.239\n\
                   sockperf: ---> percentile 50.000 =    5.643\n";
        assert_eq!(percentile(out, "50.000"), Some(5.643));
        assert_eq!(percentile(out, "99.000"), Some(16.239));
        assert_eq!(percentile(out, "90.000"), None);
    }
}
