//! `cargo xtask bench init`: how fast hearth-init brings a workload to `Ready` in the sandbox,
//! beside `runc run` of the same root filesystem as an OCI bundle, in the same run.
//!
//! - hearth-init: from spawning `unshare --pid --fork --mount --uts --ipc --net -- hearth-init`
//!   (the sandbox launch) to the `Ready` frame for `busybox httpd` with readiness port 8080;
//!   the test agent's side is a plain blocking socket. init also reports its own breakdown
//!   (its start to the workload's spawn, spawn to ready).
//! - runc (Debian's): from spawning `runc run` of a bundle whose rootfs is the tree the erofs
//!   image was built from, in a prepared network namespace with loopback up, to the first
//!   accepted TCP connection to port 8080 inside that namespace, polled on the same schedule
//!   as init's readiness (at once, then 1 ms doubling to 100 ms).
//!
//! The runs alternate (init, runc, init, ...) so both see the same machine load; two warm-up
//! runs of each are not counted.

use std::{
    fs,
    io::{Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use hearth_proto::{
    frame,
    init::{
        GuestMessage, HostMessage, InstanceSpec, Readiness, RootFs, Stop, Welcome,
        guest_message::Msg as G, host_message::Msg as H,
    },
};
use hearth_testkit::rootfs::{ImageFormat, Rootfs};

use super::stats::{Summary, summarize};
use crate::util::{self, have};

/// Options of `cargo xtask bench init`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measured runs of each (after two warm-up runs).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
}

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(60);

fn httpd_argv() -> Vec<String> {
    ["httpd", "-f", "-p", "8080", "-h", "/www"]
        .map(String::from)
        .to_vec()
}

/// Kills and reaps a child on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A named network namespace with loopback up, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> anyhow::Result<Self> {
        let name = format!("hbench{}", std::process::id());
        util::output(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self(name);
        util::output(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Blocking frames over a Unix socket (the agent's side, minimal).
struct Conn {
    stream: std::os::unix::net::UnixStream,
    buf: BytesMut,
}

impl Conn {
    fn send(&mut self, msg: H) -> anyhow::Result<()> {
        let bytes = frame::encode_to_vec(&HostMessage { msg: Some(msg) })?;
        self.stream.write_all(&bytes)?;
        Ok(())
    }

    fn recv(&mut self) -> anyhow::Result<Option<G>> {
        loop {
            if let Some(m) = frame::decode::<GuestMessage>(&mut self.buf)? {
                if m.msg.is_some() {
                    return Ok(m.msg);
                }
                continue;
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self
                .stream
                .read(&mut chunk)
                .context("Reading from hearth-init")?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Waits until `fd` is readable, up to `timeout`.
fn wait_readable(fd: i32, timeout: Duration) -> anyhow::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n <= 0 {
        bail!("hearth-init did not connect within {timeout:?}");
    }
    Ok(())
}

struct InitSample {
    total_ms: f64,
    start_to_spawn_ms: f64,
    spawn_to_ready_ms: f64,
}

fn init_once(init: &Path, dir: &Path, image: &Path, i: usize) -> anyhow::Result<InitSample> {
    let sock = dir.join(format!("agent-{i}.sock"));
    let listener = UnixListener::bind(&sock)?;
    let console = dir.join(format!("init-{i}.log"));
    let log = fs::File::create(&console)?;
    let spec = InstanceSpec {
        instance_id: format!("bench-{i}"),
        entrypoint: httpd_argv(),
        env: vec!["PATH=/bin".into()],
        root: Some(RootFs {
            image: image.display().to_string(),
            fstype: "erofs".into(),
            scratch_device: String::new(),
            disk_size_bytes: 64 << 20,
        }),
        readiness: Some(Readiness {
            ports: vec![u32::from(PORT)],
            timeout_millis: 30_000,
        }),
        ..Default::default()
    };
    let show = || fs::read_to_string(&console).unwrap_or_default();

    let t0 = Instant::now();
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--",
        ])
        .arg(init)
        .arg(format!("hearth.socket={}", sock.display()))
        .arg(format!("hearth.instance=bench-{i}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("Cannot start unshare")?;
    let mut child = Reap(child);
    wait_readable(listener.as_raw_fd(), TIMEOUT).with_context(show)?;
    let (stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut conn = Conn {
        stream,
        buf: BytesMut::new(),
    };
    match conn.recv()? {
        Some(G::Hello(_)) => {}
        other => bail!("expected Hello, got {other:?}"),
    }
    conn.send(H::Welcome(Welcome {
        protocol_version: hearth_proto::PROTOCOL_VERSION,
        spec: Some(spec),
        resume_after_log_seq: 0,
        root: None,
    }))?;
    let mut start_to_spawn_ms = 0.0;
    let (total, spawn_to_ready_ms) = loop {
        match conn.recv()? {
            Some(G::Started(s)) => start_to_spawn_ms = s.init_to_spawn_micros as f64 / 1000.0,
            Some(G::Ready(r)) => break (t0.elapsed(), r.spawn_to_ready_micros as f64 / 1000.0),
            Some(G::InitError(e)) => bail!("hearth-init failed: {}\n{}", e.message, show()),
            Some(G::Exited(e)) => bail!("the workload exited early: {e:?}\n{}", show()),
            Some(_) => {}
            None => bail!("hearth-init closed the connection\n{}", show()),
        }
    };
    conn.send(H::Stop(Stop {
        signal: libc::SIGKILL,
        grace_millis: 0,
    }))?;
    while let Some(m) = conn.recv()? {
        if matches!(m, G::Exited(_)) {
            break;
        }
    }
    drop(conn);
    let deadline = Instant::now() + TIMEOUT;
    while child.0.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("hearth-init did not end\n{}", show());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = fs::remove_file(&sock);
    Ok(InitSample {
        total_ms: total.as_secs_f64() * 1000.0,
        start_to_spawn_ms,
        spawn_to_ready_ms,
    })
}

/// Polls `127.0.0.1:PORT` inside `netns` on init's readiness schedule; returns when a
/// connection is accepted.
fn poll_port_in(netns: &Path, deadline: Instant) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let ns = fs::File::open(netns);
    std::thread::spawn(move || {
        let ns = ns?;
        // SAFETY: setns on this thread only, with an open namespace file.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], PORT));
        let mut pause = Duration::from_millis(1);
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("runc's httpd never accepted a connection");
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    })
}

fn runc_once(bundle: &Path, netns: &Netns, dir: &Path, i: usize) -> anyhow::Result<f64> {
    let id = format!("hearth-bench-{}-{i}", std::process::id());
    let log = dir.join(format!("runc-{i}.log"));
    let t0 = Instant::now();
    let child = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("Cannot start runc")?;
    let child = Reap(child);
    let result = poll_port_in(&netns.path(), t0 + TIMEOUT)
        .join()
        .map_err(|_| anyhow::anyhow!("the polling thread panicked"))?;
    let took = t0.elapsed();
    let _ = Command::new("runc")
        .args(["kill", &id, "KILL"])
        .stderr(Stdio::null())
        .status();
    drop(child);
    let _ = Command::new("runc")
        .args(["delete", "--force", &id])
        .stderr(Stdio::null())
        .status();
    result.with_context(|| fs::read_to_string(&log).unwrap_or_default())?;
    Ok(took.as_secs_f64() * 1000.0)
}

/// Writes an OCI bundle around `rootfs` with `runc spec`, running httpd in `netns`.
fn make_bundle(bundle: &Path, netns: &Netns) -> anyhow::Result<()> {
    util::output(Command::new("runc").arg("spec").current_dir(bundle))?;
    let path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(httpd_argv());
    config["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    config["root"]["path"] = "rootfs".into();
    let namespaces = config["linux"]["namespaces"]
        .as_array_mut()
        .context("runc spec has no linux.namespaces")?;
    for ns in namespaces.iter_mut() {
        if ns["type"] == "network" {
            ns["path"] = netns.path().display().to_string().into();
        }
    }
    fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

fn ms(s: &Summary) -> String {
    format!(
        "{:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        s.p50, s.p95, s.min, s.max
    )
}

/// Runs the benchmark.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask bench init` needs root (namespaces, mounts, loop devices, runc)");
    }
    for p in ["unshare", "runc", "ip", "mkfs.erofs", "busybox", "strip"] {
        if !have(p) {
            bail!("`{p}` is missing (cargo xtask setup installs it)");
        }
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let init = hearth_testkit::artifacts::hearth_init();
    let dir = tempfile::Builder::new()
        .prefix("hearth-bench-init-")
        .tempdir()?;
    let stripped = dir.path().join("hearth-init.stripped");
    util::output(Command::new("strip").arg("-o").arg(&stripped).arg(&init))?;
    let stripped_bytes = fs::metadata(&stripped)?.len();

    let bundle = dir.path().join("bundle");
    let image = dir.path().join("rootfs.erofs");
    fs::create_dir(&bundle)?;
    Rootfs::busybox()
        .file("/www/index.html", "hello from the benchmark\n", 0o644)
        .write_image(&bundle.join("rootfs"), &image, ImageFormat::Erofs)
        .context("Cannot build the busybox rootfs")?;
    let netns = Netns::new()?;
    make_bundle(&bundle, &netns)?;

    let warmup = 2;
    let mut init_samples = Vec::new();
    let mut runc_samples = Vec::new();
    for i in 0..warmup + args.runs {
        let s = init_once(&init, dir.path(), &image, i).context("hearth-init run failed")?;
        let r = runc_once(&bundle, &netns, dir.path(), i).context("runc run failed")?;
        if i >= warmup {
            init_samples.push(s);
            runc_samples.push(r);
        }
        if !args.json {
            eprint!(".");
        }
    }
    if !args.json {
        eprintln!();
    }
    let total = summarize(&init_samples.iter().map(|s| s.total_ms).collect::<Vec<_>>());
    let to_spawn = summarize(
        &init_samples
            .iter()
            .map(|s| s.start_to_spawn_ms)
            .collect::<Vec<_>>(),
    );
    let to_ready = summarize(
        &init_samples
            .iter()
            .map(|s| s.spawn_to_ready_ms)
            .collect::<Vec<_>>(),
    );
    let runc = summarize(&runc_samples);
    let ratio = total.p50 / runc.p50;
    if args.json {
        let out = serde_json::json!({
            "runs": args.runs,
            "init_to_ready_p50_ms": total.p50,
            "init_to_ready_p95_ms": total.p95,
            "init_start_to_spawn_p50_ms": to_spawn.p50,
            "init_spawn_to_ready_p50_ms": to_ready.p50,
            "runc_to_ready_p50_ms": runc.p50,
            "runc_to_ready_p95_ms": runc.p95,
            "init_over_runc_p50": ratio,
            "init_stripped_bytes": stripped_bytes,
        });
        println!("{out}");
    } else {
        println!(
            "busybox httpd, exec to the first accepted connection on port {PORT} ({} runs each)",
            args.runs
        );
        println!(
            "{:<44} {:>8} {:>8} {:>8} {:>8}",
            "", "p50 ms", "p95 ms", "min ms", "max ms"
        );
        println!(
            "{:<44} {}",
            "hearth-init (sandbox): spawn -> Ready",
            ms(&total)
        );
        println!(
            "{:<44} {}",
            "  inside init: start -> workload spawned",
            ms(&to_spawn)
        );
        println!(
            "{:<44} {}",
            "  inside init: spawned -> Ready",
            ms(&to_ready)
        );
        println!(
            "{:<44} {}",
            "runc run: spawn -> first connection",
            ms(&runc)
        );
        println!("hearth-init / runc (p50): {ratio:.2}");
        println!(
            "hearth-init stripped size: {stripped_bytes} bytes ({:.2} MiB, limit 3 MiB)",
            stripped_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}
