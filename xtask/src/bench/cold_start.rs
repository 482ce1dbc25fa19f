//! `cargo xtask bench cold-start`: how long an instance takes from the `StartInstance` call to
//! its first successful HTTP response through the node's ingress, booted cold (image cached,
//! no pool) and warm (a ready warm-pool member), beside `runc run` of the same root filesystem
//! as an OCI bundle to its first HTTP response, in the same run.
//!
//! - Hearth: the release `hearth-agent` with the runtime `--runtime` names (default sandbox)
//!   and its defaults (own directories, node network, cgroups and ports); with `microvm`, the
//!   release hearth-vmm booting the guest kernel (`cargo xtask kernel`) with an initramfs
//!   holding the static hearth-init, which needs hardware virtualization (on PVM or emulated
//!   KVM the command refuses and exits non-zero). The image `busybox httpd` from a local
//!   registry, pulled once before the runs. The client (`agent/examples/bench_start.rs`, release
//!   build) times each start and reads the agent's breakdown from the `started` and `ready`
//!   events: API call returned, runtime up (sandbox launched or member claimed, network
//!   attached), hearth-init holding the spec, workload spawned, port ready, first response.
//!   Warm starts wait until the pool is full and idle; cold instances use an instance type no
//!   pool has.
//! - runc (Debian's): `runc run` of a bundle whose rootfs holds the same files (busybox,
//!   `/www/index.html`) running the same command, in a prepared network namespace, to the first
//!   `200` from `GET /` on port 8080 inside it, polled every millisecond.
//!
//! Runs alternate (cold, warm, runc, cold, ...) so all see the same machine load; two warm-up
//! rounds are not counted. A PNG chart of the distributions goes under the target directory.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hearth_testkit::rootfs::Rootfs;

use super::stats::{Summary, summarize};
use crate::util::{self, have};

/// Options of `cargo xtask bench cold-start`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measured starts of each kind (after two warm-up rounds).
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    /// Members the warm pool keeps ready.
    #[arg(long, default_value_t = 1)]
    pub pool: u32,
    /// The agent's runtime: `sandbox` or `microvm` (hardware virtualization only).
    #[arg(long, value_enum, default_value_t = Runtime::Sandbox)]
    pub runtime: Runtime,
}

/// The runtime the benchmark's agent runs instances in.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Runtime {
    /// hearth-init as PID 1 in namespaces.
    Sandbox,
    /// A hearth-vmm microVM per instance.
    Microvm,
}

impl Runtime {
    fn as_str(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::Microvm => "microvm",
        }
    }

    /// The instances' memory: a microVM holds a kernel too.
    fn memory_mib(self) -> u64 {
        match self {
            Self::Sandbox => 64,
            Self::Microvm => 128,
        }
    }

    /// The targets of issue 8: (cold p50 target in ms, or None for "not slower than runc";
    /// warm p50 target in ms).
    fn targets(self) -> (Option<f64>, f64) {
        match self {
            Self::Sandbox => (None, 20.0),
            Self::Microvm => (Some(150.0), 20.0),
        }
    }
}

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(120);
const WARMUP: usize = 2;
/// The image's command (`hearth_testkit::oci::httpd_image`), also what runc runs.
const HTTPD: [&str; 7] = ["/bin/httpd", "-f", "-v", "-p", "8080", "-h", "/www"];

/// The phases of a Hearth start, as times since the `StartInstance` call.
const PHASES: [(&str, &str); 6] = [
    ("api_ms", "StartInstance returned"),
    ("runtime_ms", "runtime up"),
    ("init_ms", "init has the spec"),
    ("spawned_ms", "workload spawned"),
    ("ready_ms", "port ready"),
    ("response_ms", "first HTTP response"),
];

/// Everything the run started, removed on drop (also when a step fails).
struct Bench {
    dir: tempfile::TempDir,
    agent: Option<Child>,
    client: Option<Child>,
    bridge: String,
    nat_table: String,
    bpf_root: String,
    cgroup_parent: String,
    netns: Option<String>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(mut c) = self.client.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut agent) = self.agent.take() {
            // The agent destroys its pool members when it drains.
            util::stop_agent(&mut agent, Duration::from_secs(20));
        }
        if let Some(ns) = self.netns.take() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        util::remove_node_leftovers(
            &self.bridge,
            &self.nat_table,
            &self.bpf_root,
            &self.cgroup_parent,
        );
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Builds the release agent and the benchmark client.
fn build() -> anyhow::Result<PathBuf> {
    let target_dir = hearth_testkit::artifacts::artifacts_dir().join("release");
    let mut cmd = hearth_testkit::artifacts::nested_cargo();
    cmd.current_dir(util::root())
        .args(["build", "--quiet", "--release", "--package", "hearth-agent"])
        .args(["--bin", "hearth-agent", "--example", "bench_start"])
        .arg("--target-dir")
        .arg(&target_dir);
    util::run(&mut cmd)?;
    Ok(target_dir.join("release"))
}

/// The benchmark client: one command per line in, one JSON object per line out.
struct Client {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn call(&mut self, cmd: &str) -> anyhow::Result<serde_json::Value> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the benchmark client ended during {cmd:?} (its error is above)");
        }
        serde_json::from_str(line.trim()).with_context(|| format!("Client said {line:?}"))
    }
}

/// One Hearth start: the phase marks, in PHASES order (ms since the StartInstance call).
#[derive(Debug, Clone)]
struct Start {
    marks: Vec<f64>,
    warm: bool,
}

impl Start {
    fn of(v: &serde_json::Value) -> anyhow::Result<Self> {
        let marks = PHASES
            .iter()
            .map(|(k, _)| {
                v[*k]
                    .as_f64()
                    .with_context(|| format!("{k} missing in {v}"))
            })
            .collect::<anyhow::Result<Vec<f64>>>()?;
        Ok(Self {
            marks,
            warm: v["warm"].as_bool().unwrap_or(false),
        })
    }

    fn total(&self) -> f64 {
        self.marks[PHASES.len() - 1]
    }
}

/// GET / on 127.0.0.1:PORT inside `netns`, every millisecond, until a 200 comes back.
fn first_response_in(
    netns: &Path,
    deadline: Instant,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let ns = fs::File::open(netns);
    std::thread::spawn(move || {
        let ns = ns?;
        // SAFETY: setns on this thread only, with an open namespace file.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], PORT));
        loop {
            let ok = (|| -> std::io::Result<bool> {
                let mut s =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut out = Vec::new();
                s.read_to_end(&mut out)?;
                Ok(out.starts_with(b"HTTP/1.0 200") || out.starts_with(b"HTTP/1.1 200"))
            })()
            .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("runc's httpd never answered 200");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

fn runc_once(bundle: &Path, netns: &Path, dir: &Path, i: usize) -> anyhow::Result<f64> {
    let id = format!("hearth-cs-{}-{i}", std::process::id());
    let log = dir.join(format!("runc-{i}.log"));
    let t0 = Instant::now();
    let mut child = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("Cannot start runc")?;
    let result = first_response_in(netns, t0 + TIMEOUT)
        .join()
        .map_err(|_| anyhow::anyhow!("the polling thread panicked"));
    let took = t0.elapsed();
    let quiet = |args: &[&str]| {
        let _ = Command::new("runc")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    quiet(&["kill", &id, "KILL"]);
    let _ = child.kill();
    let _ = child.wait();
    quiet(&["delete", "--force", &id]);
    result?.with_context(|| fs::read_to_string(&log).unwrap_or_default())?;
    Ok(took.as_secs_f64() * 1000.0)
}

/// An OCI bundle (`runc spec`, adjusted) running the image's command in `netns`.
fn make_bundle(bundle: &Path, netns: &Path) -> anyhow::Result<()> {
    Rootfs::busybox()
        .file(
            "/www/index.html",
            hearth_testkit::oci::HTTPD_INDEX.to_vec(),
            0o644,
        )
        .write_dir(&bundle.join("rootfs"))
        .context("Cannot write the bundle's rootfs")?;
    util::output(Command::new("runc").arg("spec").current_dir(bundle))?;
    let path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(HTTPD);
    config["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    config["process"]["cwd"] = "/www".into();
    config["root"]["path"] = "rootfs".into();
    let namespaces = config["linux"]["namespaces"]
        .as_array_mut()
        .context("runc spec has no linux.namespaces")?;
    for ns in namespaces.iter_mut() {
        if ns["type"] == "network" {
            ns["path"] = netns.display().to_string().into();
        }
    }
    fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

fn wait_for_socket(agent: &mut Child, socket: &Path, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if let Some(status) = agent.try_wait()? {
            bail!(
                "hearth-agent exited ({status}):\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("hearth-agent did not open its socket within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Percentiles of each phase mark over `starts`.
fn phase_summaries(starts: &[Start]) -> Vec<Summary> {
    (0..PHASES.len())
        .map(|p| summarize(&starts.iter().map(|s| s.marks[p]).collect::<Vec<_>>()))
        .collect()
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.runtime == Runtime::Microvm
        && let Some(why) = crate::e2e::hardware_unusable_reason()
    {
        bail!(
            "`cargo xtask bench cold-start --runtime microvm` needs hardware virtualization to \
             boot microVMs, and this host has none: {why}. Measure the sandbox runtime here \
             (`--runtime sandbox`)"
        );
    }
    if !util::is_root() {
        bail!("`cargo xtask bench cold-start` needs root (namespaces, cgroups, veths, eBPF, runc)");
    }
    for p in ["runc", "ip", "nft", "busybox", "docker-registry"] {
        if !have(p) {
            bail!("`{p}` is missing (cargo xtask setup installs it)");
        }
    }
    if args.runs == 0 || args.pool == 0 {
        bail!("--runs and --pool must be at least 1");
    }
    let say = |s: &str| {
        if !args.json {
            eprintln!("cold-start: {s}");
        }
    };
    say("building the release hearth-agent, the client and the static hearth-init");
    let bin = build()?;
    let init = hearth_testkit::artifacts::hearth_init();
    // microvm: the kernel, hearth-vmm and the initramfs the agent's VMs boot.
    let microvm = if args.runtime == Runtime::Microvm {
        say("building the guest kernel and the release hearth-vmm");
        let kernel = crate::kernel::build(false)?;
        let vmm = crate::e2e::build_vmm()?;
        Some((kernel.vmlinux, vmm))
    } else {
        None
    };
    let registry = hearth_testkit::registry::Registry::start();
    let image = hearth_testkit::oci::httpd_image().push(&registry, "hearth/bench-httpd", "v1");

    let pid = std::process::id();
    let dir = tempfile::Builder::new().prefix("hcs").tempdir_in("/tmp")?;
    let mut bench = Bench {
        bridge: format!("hcs{pid}"),
        nat_table: format!("hearth_cs{pid}"),
        bpf_root: format!("/sys/fs/bpf/hearth-cs-{pid}"),
        cgroup_parent: format!("hearth-bench-cs-{pid}"),
        netns: None,
        agent: None,
        client: None,
        dir,
    };
    let d = bench.dir.path().to_owned();
    let socket = d.join("r/agent.sock");
    let ingress_port = free_port()?;
    let microvm_section = match &microvm {
        Some((vmlinux, vmm)) => {
            let initrd = d.join("initramfs.cpio");
            crate::e2e::write_agent_initramfs(&init, &initrd)?;
            format!(
                "\n[microvm]\nvmm_path = \"{}\"\nkernel = \"{}\"\ninitrd = \"{}\"\n",
                vmm.display(),
                vmlinux.display(),
                initrd.display()
            )
        }
        None => String::new(),
    };
    let config = format!(
        r#"runtime = "{runtime}"
state_dir = "{state}"
run_dir = "{run}"
ingress_listen = "127.0.0.1:{ingress_port}"
bpf_root = "{bpf}"

[api]
socket = "{socket}"

[metrics]
listen = ""

[sandbox]
init_path = "{init}"

[cgroup]
parent = "{cgroup}"

[images]
insecure_registries = ["{registry}"]

[pool]
# No recycling while the benchmark runs.
idle_ttl = "0s"

[network]
subnet = "10.90.{net}.0/24"
bridge = "{bridge}"
interface_prefix = "hc{short}v"
nat_table = "{nat}"
{microvm_section}"#,
        runtime = args.runtime.as_str(),
        state = d.join("s").display(),
        run = d.join("r").display(),
        bpf = bench.bpf_root,
        socket = socket.display(),
        init = init.display(),
        cgroup = bench.cgroup_parent,
        registry = registry.host(),
        net = pid % 250,
        bridge = bench.bridge,
        short = pid % 10_000,
        nat = bench.nat_table,
    );
    let config_path = d.join("agent.toml");
    fs::write(&config_path, &config)?;
    let log = d.join("agent.log");
    say(&format!(
        "starting hearth-agent ({} runtime)",
        args.runtime.as_str()
    ));
    bench.agent = Some(
        Command::new(bin.join("hearth-agent"))
            .arg("--config")
            .arg(&config_path)
            // HEARTH_BENCH_AGENT_LOG=hearth_agent=debug profiles a run (the log is kept).
            .env(
                "RUST_LOG",
                std::env::var("HEARTH_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("Cannot start hearth-agent")?,
    );
    wait_for_socket(bench.agent.as_mut().expect("agent"), &socket, &log)?;
    let mut child = Command::new(bin.join("examples/bench_start"))
        .arg("--socket")
        .arg(&socket)
        .args(["--ingress", &format!("127.0.0.1:{ingress_port}")])
        .args(["--image", &image])
        .args(["--memory-mib", &args.runtime.memory_mib().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("Cannot start the benchmark client")?;
    let mut client = Client {
        stdin: child.stdin.take().context("client stdin")?,
        stdout: BufReader::new(child.stdout.take().context("client stdout")?),
    };
    bench.client = Some(child);

    // The image is pulled (and cached) by the pool: cold starts find it in the cache.
    say(&format!(
        "pulling the image and filling a pool of {}",
        args.pool
    ));
    client.call(&format!("pool {}", args.pool))?;

    let netns = format!("hcs{pid}");
    util::output(Command::new("ip").args(["netns", "add", &netns]))?;
    bench.netns = Some(netns.clone());
    util::output(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]))?;
    let netns_path = Path::new("/run/netns").join(&netns);
    let bundle = d.join("bundle");
    fs::create_dir(&bundle)?;
    make_bundle(&bundle, &netns_path)?;

    say(&format!(
        "{} rounds of cold, warm and runc starts (2 warm-up rounds)",
        args.runs
    ));
    let (mut cold, mut warm, mut runc) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARMUP + args.runs {
        let c = Start::of(&client.call(&format!("cold c{i}"))?)?;
        let w = Start::of(&client.call(&format!("warm w{i}"))?)?;
        let r = runc_once(&bundle, &netns_path, &d, i).context("runc run failed")?;
        if c.warm || !w.warm {
            bail!("round {i}: the cold start was warm or the warm start cold");
        }
        if i >= WARMUP {
            cold.push(c);
            warm.push(w);
            runc.push(r);
        }
        if !args.json {
            eprint!(".");
        }
    }
    if !args.json {
        eprintln!();
    }
    let cold_s = phase_summaries(&cold);
    let warm_s = phase_summaries(&warm);
    let runc_s = summarize(&runc);
    let cold_t = cold_s[PHASES.len() - 1];
    let warm_t = warm_s[PHASES.len() - 1];

    let chart = hearth_testkit::artifacts::target_dir()
        .join("hearth-bench")
        .join("cold-start.png");
    fs::create_dir_all(chart.parent().expect("has a parent"))?;
    chart::draw(&chart, &cold, &warm, &runc, &cold_s, &warm_s).context("Cannot draw the chart")?;

    let (cold_target, warm_target) = args.runtime.targets();
    let warm_ok = warm_t.p50 < warm_target;
    let cold_ok = cold_target.map_or(cold_t.p50 <= runc_s.p50, |t| cold_t.p50 < t);
    if args.json {
        let phases = |s: &[Summary]| {
            PHASES
                .iter()
                .zip(s)
                .map(|((k, _), s)| {
                    (
                        k.trim_end_matches("_ms").to_owned(),
                        serde_json::json!({"p50_ms": s.p50, "p95_ms": s.p95, "p99_ms": s.p99}),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
        };
        let out = serde_json::json!({
            "runtime": args.runtime.as_str(),
            "runs": args.runs,
            "cold_p50_ms": cold_t.p50,
            "cold_p95_ms": cold_t.p95,
            "cold_p99_ms": cold_t.p99,
            "warm_p50_ms": warm_t.p50,
            "warm_p95_ms": warm_t.p95,
            "warm_p99_ms": warm_t.p99,
            "runc_p50_ms": runc_s.p50,
            "runc_p95_ms": runc_s.p95,
            "runc_p99_ms": runc_s.p99,
            "cold_over_runc_p50": cold_t.p50 / runc_s.p50,
            "warm_over_runc_p50": warm_t.p50 / runc_s.p50,
            "warm_p50_under_20ms": warm_t.p50 < 20.0,
            "cold_p50_not_slower_than_runc": cold_t.p50 <= runc_s.p50,
            "warm_p50_target_ms": warm_target,
            "warm_p50_met": warm_ok,
            "cold_p50_target_ms": cold_target,
            "cold_p50_target": cold_target.map_or("not slower than runc".into(), |t| format!("under {t} ms")),
            "cold_p50_met": cold_ok,
            "cold_phases": phases(&cold_s),
            "warm_phases": phases(&warm_s),
            "chart": chart.display().to_string(),
        });
        println!("{out}");
    } else {
        println!(
            "StartInstance -> first HTTP response through the ingress, busybox httpd, {} runtime ({} runs each)",
            args.runtime.as_str(),
            args.runs
        );
        println!(
            "{:<36} {:>8} {:>8} {:>8}   {:>8} {:>8} {:>8}",
            "ms since the StartInstance call", "cold p50", "p95", "p99", "warm p50", "p95", "p99"
        );
        for (p, (_, name)) in PHASES.iter().enumerate() {
            let (c, w) = (cold_s[p], warm_s[p]);
            println!(
                "{:<36} {:>8.1} {:>8.1} {:>8.1}   {:>8.1} {:>8.1} {:>8.1}",
                name, c.p50, c.p95, c.p99, w.p50, w.p95, w.p99
            );
        }
        println!(
            "{:<36} {:>8.1} {:>8.1} {:>8.1}",
            "runc run -> first HTTP response", runc_s.p50, runc_s.p95, runc_s.p99
        );
        println!(
            "cold / runc (p50): {:.2}   warm / runc (p50): {:.2}",
            cold_t.p50 / runc_s.p50,
            warm_t.p50 / runc_s.p50
        );
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        let cold_line = match cold_target {
            None => format!(
                "cold p50 <= runc p50: {} ({:.1} vs {:.1} ms)",
                met(cold_ok),
                cold_t.p50,
                runc_s.p50
            ),
            Some(t) => format!(
                "cold p50 < {t:.0} ms: {} ({:.1} ms)",
                met(cold_ok),
                cold_t.p50
            ),
        };
        println!(
            "targets ({}): warm p50 < {warm_target:.0} ms: {} ({:.1} ms); {cold_line}",
            args.runtime.as_str(),
            met(warm_ok),
            warm_t.p50,
        );
        println!("chart: {}", chart.display());
    }
    if std::env::var_os("HEARTH_BENCH_AGENT_LOG").is_some() {
        let kept = chart.with_file_name("cold-start-agent.log");
        fs::copy(&log, &kept)?;
        eprintln!("cold-start: agent log kept in {}", kept.display());
    }
    drop(bench);
    drop(registry);
    Ok(())
}

/// The PNG: the distributions (empirical CDFs) and the median phase marks.
mod chart {
    use std::path::Path;

    use plotters::prelude::*;

    use super::{PHASES, Start, Summary};

    fn ecdf(xs: &[f64]) -> Vec<(f64, f64)> {
        let mut s = xs.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len() as f64;
        s.iter()
            .enumerate()
            .flat_map(|(i, &x)| [(x, i as f64 / n), (x, (i + 1) as f64 / n)])
            .collect()
    }

    pub fn draw(
        path: &Path,
        cold: &[Start],
        warm: &[Start],
        runc: &[f64],
        cold_s: &[Summary],
        warm_s: &[Summary],
    ) -> anyhow::Result<()> {
        let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(760);
        let cold_t: Vec<f64> = cold.iter().map(Start::total).collect();
        let warm_t: Vec<f64> = warm.iter().map(Start::total).collect();
        let max = cold_t
            .iter()
            .chain(&warm_t)
            .chain(runc)
            .fold(1.0f64, |m, &x| m.max(x))
            * 1.05;
        let mut c = ChartBuilder::on(&left)
            .caption(
                "StartInstance -> first HTTP response (CDF)",
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max, 0.0..1.0)?;
        c.configure_mesh()
            .x_desc("milliseconds")
            .y_desc("fraction of starts")
            .draw()?;
        let series: [(&str, &[f64], RGBColor); 3] = [
            ("cold (no pool)", &cold_t, RED),
            ("warm (pool member)", &warm_t, BLUE),
            ("runc run", runc, BLACK),
        ];
        for (name, xs, color) in series {
            c.draw_series(LineSeries::new(ecdf(xs), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;

        // Median phase marks: one bar per kind, a segment per phase.
        let max_p = cold_s
            .iter()
            .chain(warm_s)
            .fold(1.0f64, |m, s| m.max(s.p50))
            * 1.1;
        let mut p = ChartBuilder::on(&right)
            .caption("p50 phase marks (ms since the call)", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_p, 0.0..2.0)?;
        p.configure_mesh()
            .disable_y_mesh()
            .y_labels(5)
            .y_label_formatter(&|y| match *y {
                y if (0.4..0.6).contains(&y) => "warm".into(),
                y if (1.4..1.6).contains(&y) => "cold".into(),
                _ => String::new(),
            })
            .x_desc("milliseconds")
            .draw()?;
        let colors = [
            RGBColor(200, 200, 200),
            RGBColor(120, 170, 220),
            RGBColor(250, 190, 90),
            RGBColor(150, 210, 120),
            RGBColor(220, 120, 120),
            RGBColor(150, 110, 200),
        ];
        // The boot's phases follow each other; the API's answer (first mark) is drawn as a
        // tick, as it overlaps them.
        for (row, s) in [(1.0, cold_s), (0.0, warm_s)] {
            let mut from = 0.0f64;
            for (i, m) in s.iter().enumerate().skip(1) {
                let to = m.p50.max(from);
                p.draw_series(std::iter::once(Rectangle::new(
                    [(from, row + 0.25), (to, row + 0.75)],
                    colors[i].filled(),
                )))?;
                from = to;
            }
            let api = s[0].p50;
            p.draw_series(std::iter::once(PathElement::new(
                vec![(api, row + 0.1), (api, row + 0.9)],
                BLACK.stroke_width(3),
            )))?;
        }
        for (i, (_, name)) in PHASES.iter().enumerate() {
            let color = if i == 0 { BLACK } else { colors[i] };
            p.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
        }
        p.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
