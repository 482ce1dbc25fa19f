//! Test support for the agent's end-to-end tests: a real agent (in this process, or the
//! `hearth-agent` binary) with the runtime [`runtime`] selects (the sandbox with the real
//! static hearth-init by default; hearth-vmm microVMs on hardware-KVM hosts), a real
//! `docker-registry` with test images, and cleanup of every instance process and cgroup on
//! drop — also when the test fails.
//!
//! # Layout
//!
//! - this file: the agent's environment ([`Env`]), the agent in-process ([`TestAgent`]) or as
//!   a process ([`AgentProcess`]), the test images, and small API and HTTP helpers;
//! - [`runtime`]: `HEARTH_TEST_RUNTIME`, and what the microvm mode needs.

#![allow(dead_code)]

pub mod runtime;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use hearth_agent::{
    config::{Config, RuntimeKind},
    ctl::{self, Client},
    daemon::{Daemon, Listeners},
    images::HearthImages,
    model::pb,
    runtime::cgroup::Layout,
};
use hearth_testkit::registry::Registry;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short name for this test's resources.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where a test agent keeps everything, and how it is cleaned up.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub cfg: Config,
    pub registry: Arc<Registry>,
}

impl Env {
    /// A config for the suite's runtime ([`runtime::kind`]) in a temp dir, with `registry` as an
    /// insecure registry. In microvm mode it panics with the reason when this host cannot run
    /// microVMs: tests check [`runtime::unavailable`] first, to skip with that reason.
    pub fn new(registry: Arc<Registry>) -> Self {
        let mut env = Self::sandbox(registry);
        if runtime::microvm() {
            env.cfg.runtime = RuntimeKind::Microvm;
            runtime::configure_microvm(&mut env.cfg.microvm);
        }
        env
    }

    /// The microvm runtime with a `no_std` test guest as its kernel (no initramfs): what this
    /// PVM host can run, emulated, whatever `HEARTH_TEST_RUNTIME` says.
    pub fn microvm_test_guest(registry: Arc<Registry>, guest: &str) -> Self {
        let mut env = Self::sandbox(registry);
        env.cfg.runtime = RuntimeKind::Microvm;
        env.cfg.microvm.vmm_path = hearth_testkit::artifacts::host_bin("hearth-vmm", "hearth-vmm");
        env.cfg.microvm.kernel = hearth_testkit::artifacts::test_guest(guest);
        // PVM: the no_std guest runs emulated, which is all such a test needs.
        env.cfg.microvm.allow_without_hardware_virtualization = true;
        env
    }

    /// A config for the sandbox runtime in a temp dir, with `registry` as an insecure registry.
    pub fn sandbox(registry: Arc<Registry>) -> Self {
        // Short paths: Unix socket paths are limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ha")
            .tempdir_in("/tmp")
            .unwrap();
        let mut cfg = Config {
            runtime: RuntimeKind::Sandbox,
            state_dir: dir.path().join("s"),
            run_dir: dir.path().join("r"),
            ..Config::default()
        };
        cfg.api.socket = dir.path().join("r/api.sock");
        cfg.api.drain_timeout = Duration::from_secs(2);
        cfg.metrics.listen = "127.0.0.1:0".into();
        cfg.sandbox.init_path = hearth_testkit::artifacts::hearth_init();
        cfg.cgroup.parent = unique("hearth-test");
        cfg.images.insecure_registries = vec![registry.host()];
        cfg.lifecycle.kill_margin = Duration::from_secs(2);
        cfg.lifecycle.init_connect_timeout = Duration::from_secs(180);
        // A network of its own: subnet, bridge, interface names, NAT table, bpffs dir.
        let u = (std::process::id() % 10_000) * 10 + COUNTER.fetch_add(1, Ordering::Relaxed) % 10;
        cfg.network.subnet = format!("10.{}.{}.0/24", 100 + (u / 256) % 100, u % 256)
            .parse()
            .unwrap();
        cfg.network.bridge = format!("hb{u}");
        cfg.network.interface_prefix = format!("h{u}v");
        cfg.network.nat_table = format!("hearth_t{u}");
        cfg.network.resolver = Some(std::net::Ipv4Addr::new(10, 0, 0, 53));
        cfg.bpf_root = format!("/sys/fs/bpf/hearth-test-{u}").into();
        cfg.ingress_listen = "127.0.0.1:0".into();
        Self { dir, cfg, registry }
    }

    /// Kills every process in the test's instance cgroups and removes them.
    pub fn cleanup_cgroups(&self) {
        let Ok(layout) = Layout::host(&self.cfg.cgroup.parent) else {
            return;
        };
        for (_, parent) in &layout.parents {
            if let Ok(rd) = std::fs::read_dir(parent) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let id = e.file_name().to_string_lossy().into_owned();
                        let cg = layout.instance(&id);
                        cg.kill_all();
                        let _ = cg.remove();
                    }
                }
            }
            let _ = std::fs::remove_dir(parent);
        }
    }

    /// Writes the config as a file (for the agent binary).
    pub fn write_config(&self) -> PathBuf {
        let p = self.dir.path().join("agent.toml");
        let mut cfg = self.cfg.clone();
        cfg.metrics.listen = String::new();
        cfg.ingress_listen = String::new();
        std::fs::write(&p, cfg.to_toml()).unwrap();
        p
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cleanup_cgroups();
        // The node network and the eBPF pins this test's agent made.
        let _ = Command::new("ip")
            .args(["link", "del", &self.cfg.network.bridge])
            .output();
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.cfg.network.nat_table])
            .output();
        if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
            let prefix = format!(" {}", self.cfg.network.interface_prefix);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(name) = line
                    .split(':')
                    .nth(1)
                    .filter(|n| n.starts_with(&prefix))
                    .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
                {
                    let _ = Command::new("ip").args(["link", "del", &name]).output();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.cfg.bpf_root);
    }
}

/// An agent running in this process.
pub struct TestAgent {
    pub daemon: Option<Daemon>,
    pub client: Client,
    pub metrics_addr: std::net::SocketAddr,
    pub ingress_addr: Option<std::net::SocketAddr>,
    pub tcp_addr: Option<std::net::SocketAddr>,
}

impl TestAgent {
    pub async fn start(env: &Env) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let images = Arc::new(HearthImages::open(&env.cfg).expect("image cache opens"));
        let listeners = Listeners::bind(&env.cfg).await.expect("listeners bind");
        let metrics_addr = listeners.metrics.as_ref().unwrap().local_addr().unwrap();
        let ingress_addr = listeners.ingress.as_ref().map(|l| l.local_addr().unwrap());
        let tcp_addr = listeners.api_tcp.as_ref().map(|l| l.local_addr().unwrap());
        let daemon = Daemon::start(env.cfg.clone(), images, listeners)
            .await
            .expect("agent starts");
        let client = ctl::connect(&env.cfg.api.socket)
            .await
            .expect("client connects");
        Self {
            daemon: Some(daemon),
            client,
            metrics_addr,
            ingress_addr,
            tcp_addr,
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
    }
}

/// The registry shared by the tests of one binary, with the test images pushed once.
pub struct Images {
    pub registry: Arc<Registry>,
    pub httpd: String,
    pub busybox: String,
}

pub fn images() -> Images {
    let registry = Arc::new(Registry::start());
    let httpd = hearth_testkit::oci::httpd_image().push(&registry, "hearth/httpd", "v1");
    let busybox = hearth_testkit::oci::busybox_image().push(&registry, "hearth/busybox", "v1");
    Images {
        registry,
        httpd,
        busybox,
    }
}

/// A spec running `sh -c script` in the busybox image.
pub fn sh_spec(image: &str, script: &str) -> pb::InstanceSpec {
    pb::InstanceSpec {
        image: image.to_owned(),
        entrypoint: Some(pb::Command {
            args: vec!["/bin/sh".into()],
        }),
        cmd: Some(pb::Command {
            args: vec!["-c".into(), script.to_owned()],
        }),
        instance_type: Some(runtime::instance_type(1, 64, 64)),
        ..Default::default()
    }
}

/// Creates instance `id` with `spec` and starts it (without waiting for it).
pub async fn create_start(c: &mut Client, id: &str, spec: pb::InstanceSpec) {
    c.create_instance(pb::CreateInstanceRequest {
        id: id.into(),
        spec: Some(spec),
    })
    .await
    .unwrap();
    c.start_instance(pb::StartInstanceRequest { id: id.into() })
        .await
        .unwrap();
}

/// The instance `id` (which must exist).
pub async fn get(c: &mut Client, id: &str) -> pb::Instance {
    c.get_instance(pb::GetInstanceRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Asks for a stop of `id` with `signal` (0: the spec's) and `grace_millis` (None: the spec's).
pub async fn stop(c: &mut Client, id: &str, signal: i32, grace_millis: Option<i64>) {
    c.stop_instance(pb::StopInstanceRequest {
        id: id.into(),
        signal,
        grace_millis,
    })
    .await
    .unwrap();
}

/// Destroys `id`.
pub async fn destroy(c: &mut Client, id: &str) {
    c.destroy_instance(pb::DestroyInstanceRequest { id: id.into() })
        .await
        .unwrap();
}

/// Polls the logs of `id` until they contain `needle`; returns them.
pub async fn wait_logs(c: &mut Client, id: &str, needle: &str, timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = logs(c, id).await;
        if text.contains(needle) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in the logs of {id}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `sh -c script` in the instance: exit code, and stdout followed by stderr.
pub async fn exec_sh(c: &mut Client, id: &str, script: &str) -> (i32, String) {
    let r = c
        .exec(pb::ExecRequest {
            id: id.into(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout_millis: 20_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr),
    )
}

/// GET / through the ingress for instance `id`: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, id: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nx-hearth-instance: {id}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The agent's Prometheus text.
pub async fn prometheus(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The processes in the instance cgroup `name` (an instance id, or a pool member's name):
/// hearth-init's sandbox, or the hearth-vmm process.
pub fn cgroup_pids(env: &Env, name: &str) -> Vec<i32> {
    Layout::host(&env.cfg.cgroup.parent)
        .unwrap()
        .instance(name)
        .pids()
}

pub fn state(i: &pb::Instance) -> pb::InstanceState {
    pb::InstanceState::try_from(i.state).unwrap()
}

/// Polls until the instance is in one of `states` (generous timeout: two busy cores).
pub async fn wait_state(
    c: &mut Client,
    id: &str,
    states: &[pb::InstanceState],
    timeout: Duration,
) -> pb::Instance {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let i = c
            .get_instance(pb::GetInstanceRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if states.contains(&state(&i)) {
            return i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "instance {id} stayed {:?} (wanted {states:?}): {i:?}",
            state(&i)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every stored event of `id`.
pub async fn events(c: &mut Client, id: &str) -> Vec<pb::Event> {
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            from_seq: 1,
            instance_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), s.next()).await {
        out.push(e.unwrap());
    }
    out
}

pub fn names(evs: &[pb::Event]) -> Vec<&'static str> {
    evs.iter().map(hearth_agent::model::event_name).collect()
}

/// The stopped event's exit status.
pub fn stopped_exit(evs: &[pb::Event]) -> pb::ExitStatus {
    evs.iter()
        .rev()
        .find_map(|e| match &e.kind {
            Some(pb::event::Kind::Stopped(s)) => s.exit,
            _ => None,
        })
        .expect("a stopped event")
}

/// All log text of an instance.
pub async fn logs(c: &mut Client, id: &str) -> String {
    let mut s = c
        .stream_logs(pb::StreamLogsRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(l) = s.next().await {
        let l = l.unwrap();
        out.extend(l.data);
        if !l.partial {
            out.push(b'\n');
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `hearthctl --socket SOCKET ARGS...`: (success, stdout, stderr).
pub async fn hearthctl(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hearthctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `hearth-agent` binary as a child process (for SIGKILL tests).
pub struct AgentProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl AgentProcess {
    pub fn spawn(config: &Path, socket: &Path, log_path: &Path) -> Self {
        Self::spawn_with_env(config, socket, log_path, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables (e.g. test failpoints).
    pub fn spawn_with_env(
        config: &Path,
        socket: &Path,
        log_path: &Path,
        vars: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hearth-agent"))
            .arg("--config")
            .arg(config)
            .envs(vars.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            socket: socket.to_owned(),
            log: log_path.to_owned(),
        }
    }

    pub async fn client(&mut self) -> Client {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("hearth-agent exited early: {status}");
            }
            if let Ok(mut c) = ctl::connect(&self.socket).await
                && c.get_node(pb::GetNodeRequest {}).await.is_ok()
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("hearth-agent did not come up");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The warm pools as the API lists them.
pub async fn pools(c: &mut hearth_agent::ctl::Client) -> pb::ListWarmPoolsResponse {
    c.list_warm_pools(pb::ListWarmPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls until the pool of `image` has `ready` members ready (and returns the listing).
pub async fn wait_ready_members(
    c: &mut hearth_agent::ctl::Client,
    image: &str,
    ready: u32,
) -> pb::WarmPool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let l = pools(c).await;
        if let Some(p) = l.pools.iter().find(|p| p.image == image)
            && p.ready == ready
        {
            return p.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool of {image} never had {ready} ready members: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The started events, oldest first.
pub fn started(evs: &[pb::Event]) -> Vec<pb::event::Started> {
    evs.iter()
        .filter_map(|e| match &e.kind {
            Some(pb::event::Kind::Started(s)) => Some(*s),
            _ => None,
        })
        .collect()
}
