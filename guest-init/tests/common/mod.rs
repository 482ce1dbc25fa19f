//! Test support for running the real static hearth-init as PID 1 in fresh namespaces, with a
//! test agent that speaks the real protocol over a Unix socket.
//!
//! - [`Fixture`]: a temp dir with a busybox erofs image and the agent's socket path.
//! - [`Sandbox`]: `unshare --pid --fork --mount --uts --ipc [--net]` running hearth-init, its
//!   console captured to files; killed on drop.
//! - [`Agent`]: the agent's end of one connection, recording everything init sends and
//!   acknowledging log records.
//! - [`TestCgroup`], [`TestNetns`]: per-test cgroups and network namespaces, removed on drop.

#![allow(dead_code)]

use std::{
    fs,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use hearth_proto::{
    channel::{HostChannel, HostReceiver, HostSender},
    init::{
        ExecResult, Exited, InitError, InstanceSpec, LogRecord, LogStream, LogsDropped, Metrics,
        Ready, RootFs, Started, guest_message::Msg,
    },
};
use hearth_testkit::rootfs::{ImageFormat, Rootfs};
use tokio::net::{UnixListener, UnixStream};

/// Generous timeout for anything on a loaded 2-core machine.
pub const LONG: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The checks every sandbox test needs; returns from the test when one says skip.
#[macro_export]
macro_rules! require_sandbox {
    () => {
        hearth_testkit::require!(
            hearth_testkit::skip::root(),
            hearth_testkit::skip::program("unshare"),
            hearth_testkit::skip::program("mkfs.erofs"),
            hearth_testkit::skip::program("busybox"),
        );
    };
}

/// A temp dir holding the image and the socket.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
}

impl Fixture {
    /// A busybox rootfs with users `app` (1000, also in group `extra` 2000) and `nobody`.
    pub fn new() -> Self {
        Self::with(ImageFormat::Erofs, |r| r)
    }

    /// A rootfs changed by `f`, as an image of `format`.
    pub fn with(format: ImageFormat, f: impl FnOnce(Rootfs) -> Rootfs) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hearth-init-test")
            .tempdir()
            .unwrap();
        let image = dir.path().join(match format {
            ImageFormat::Erofs => "rootfs.erofs",
            ImageFormat::Ext4 { .. } => "rootfs.ext4",
        });
        let rootfs = Rootfs::busybox()
            .user("app", 1000, 1000, "/home/app")
            .group("app", 1000, &[])
            .group("extra", 2000, &["app"])
            .dir("/home/app", 0o755)
            .file("/www/index.html", "hello from hearth\n", 0o644);
        f(rootfs)
            .write_image(&dir.path().join("tree"), &image, format)
            .unwrap();
        let socket = dir.path().join("agent.sock");
        Self { dir, image, socket }
    }

    /// A spec running `argv` on this image with a 64 MiB writable layer.
    pub fn spec(&self, argv: &[&str]) -> InstanceSpec {
        InstanceSpec {
            instance_id: unique("t"),
            entrypoint: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: vec!["PATH=/bin".into()],
            root: Some(RootFs {
                image: self.image.display().to_string(),
                fstype: if self.image.extension().is_some_and(|e| e == "ext4") {
                    "ext4".into()
                } else {
                    "erofs".into()
                },
                scratch_device: String::new(),
                disk_size_bytes: 64 << 20,
            }),
            ..Default::default()
        }
    }

    /// Listens on the socket path.
    pub fn listen(&self) -> UnixListener {
        let _ = fs::remove_file(&self.socket);
        UnixListener::bind(&self.socket).unwrap()
    }

    /// The init arguments for this fixture.
    pub fn args(&self, instance: &str) -> Vec<String> {
        vec![
            format!("hearth.socket={}", self.socket.display()),
            format!("hearth.instance={instance}"),
            "hearth.log=debug".into(),
        ]
    }
}

/// How to launch init.
#[derive(Default)]
pub struct Launch {
    /// Join this network namespace (a file under /run/netns) instead of creating one.
    pub netns: Option<PathBuf>,
    /// `cgroup.procs` files to put init in.
    pub cgroup_procs: Vec<PathBuf>,
    /// Extra environment for init.
    pub env: Vec<(String, String)>,
}

/// hearth-init running as PID 1 of new PID/mount/UTS/IPC(/net) namespaces.
pub struct Sandbox {
    child: Option<Child>,
    pub console: PathBuf,
    pub errors: PathBuf,
    pub started: Instant,
}

/// Pids whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command (which may contain spaces) start after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(&ppid.to_string()) {
            out.push(pid);
        }
    }
    out
}

impl Sandbox {
    /// Starts hearth-init with `args`, its console in `dir`.
    pub fn launch(dir: &Path, args: &[String], launch: Launch) -> Self {
        let init = hearth_testkit::artifacts::hearth_init();
        let console = dir.join(unique("console-"));
        let errors = dir.join(unique("stderr-"));
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--uts",
            "--ipc",
        ]);
        if launch.netns.is_none() {
            cmd.arg("--net");
        }
        cmd.arg("--").arg(&init).args(args).envs(launch.env);
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&console).unwrap())
            .stderr(fs::File::create(&errors).unwrap());
        let netns = launch.netns.map(|p| fs::File::open(p).unwrap());
        let procs: Vec<fs::File> = launch
            .cgroup_procs
            .iter()
            .map(|p| fs::OpenOptions::new().write(true).open(p).unwrap())
            .collect();
        // SAFETY: only setns(2) and write(2) on descriptors opened above.
        unsafe {
            cmd.pre_exec(move || {
                for f in &procs {
                    if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(ns) = &netns
                    && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd.spawn().unwrap();
        Self {
            child: Some(child),
            console,
            errors,
            started,
        }
    }

    /// The host pid of init (PID 1 inside), once unshare has forked it.
    pub fn init_pid(&self) -> u32 {
        let ppid = self.child.as_ref().unwrap().id();
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(pid) = children_of(ppid).first() {
                return *pid;
            }
            assert!(Instant::now() < deadline, "unshare never forked init");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for init (and unshare) to end.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "init did not end within {timeout:?}; console:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What init printed (stdout, then stderr).
    pub fn output(&self) -> String {
        format!(
            "{}--- stderr ---\n{}",
            fs::read_to_string(&self.console).unwrap_or_default(),
            fs::read_to_string(&self.errors).unwrap_or_default()
        )
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && child.try_wait().ok().flatten().is_none()
        {
            // unshare --kill-child takes init (and so the namespaces) with it.
            let _ = child.kill();
            let _ = child.wait();
        }
        eprintln!("=== hearth-init console ===\n{}", self.output());
    }
}

/// Everything init sent, by kind.
#[derive(Debug, Default)]
pub struct Got {
    pub hello_reconnect: bool,
    pub started: Vec<Started>,
    pub ready: Vec<Ready>,
    pub logs: Vec<LogRecord>,
    pub dropped: Vec<LogsDropped>,
    pub metrics: Vec<Metrics>,
    pub errors: Vec<InitError>,
    pub exec: Vec<ExecResult>,
    pub exited: Option<Exited>,
    pub pongs: Vec<u64>,
}

impl Got {
    fn text(&self, stream: LogStream) -> String {
        let mut s = String::new();
        for r in self.logs.iter().filter(|r| r.stream == stream as i32) {
            s.push_str(&String::from_utf8_lossy(&r.data));
            if !r.partial {
                s.push('\n');
            }
        }
        s
    }

    /// The workload's stdout, lines joined.
    pub fn stdout(&self) -> String {
        self.text(LogStream::Stdout)
    }

    /// The workload's stderr, lines joined.
    pub fn stderr(&self) -> String {
        self.text(LogStream::Stderr)
    }
}

/// The agent's end of one connection.
pub struct Agent {
    pub tx: HostSender<UnixStream>,
    pub rx: HostReceiver<UnixStream>,
    pub got: Got,
    /// Acknowledge log records as they arrive.
    pub ack: bool,
}

impl Agent {
    /// Accepts the next connection and reads its Hello.
    pub async fn accept(listener: &UnixListener) -> (Self, hearth_proto::init::Hello) {
        let (stream, _) = tokio::time::timeout(LONG, listener.accept())
            .await
            .expect("init did not connect")
            .unwrap();
        let ch = HostChannel::accept(stream, LONG).await.unwrap();
        let hello = ch.hello().clone();
        let (tx, rx) = ch.split();
        let agent = Self {
            tx,
            rx,
            got: Got {
                hello_reconnect: hello.reconnect,
                ..Got::default()
            },
            ack: true,
        };
        (agent, hello)
    }

    /// Accepts a connection and welcomes it with `spec`.
    pub async fn start(listener: &UnixListener, spec: InstanceSpec) -> Self {
        let (stream, _) = tokio::time::timeout(LONG, listener.accept())
            .await
            .expect("init did not connect")
            .unwrap();
        let mut ch = HostChannel::accept(stream, LONG).await.unwrap();
        assert!(!ch.hello().reconnect);
        ch.welcome(Some(spec), 0).await.unwrap();
        let (tx, rx) = ch.split();
        Self {
            tx,
            rx,
            got: Got::default(),
            ack: true,
        }
    }

    /// Receives one message (recording it); `None` when init closed the connection.
    pub async fn next(&mut self) -> Option<Msg> {
        let msg = tokio::time::timeout(LONG, self.rx.recv())
            .await
            .expect("init sent nothing for a long time")
            .ok()??;
        match &msg {
            Msg::Started(s) => self.got.started.push(*s),
            Msg::Ready(r) => self.got.ready.push(*r),
            Msg::Log(r) => {
                self.got.logs.push(r.clone());
                if self.ack {
                    let _ = self.tx.ack_logs(r.seq).await;
                }
            }
            Msg::LogsDropped(d) => self.got.dropped.push(*d),
            Msg::Metrics(m) => self.got.metrics.push(*m),
            Msg::InitError(e) => self.got.errors.push(e.clone()),
            Msg::ExecResult(e) => self.got.exec.push(e.clone()),
            Msg::Exited(e) => self.got.exited = Some(*e),
            Msg::Pong(p) => self.got.pongs.push(p.nonce),
            Msg::Hello(_) => panic!("a second Hello on one connection"),
        }
        Some(msg)
    }

    /// Receives until `pred` holds.
    pub async fn until(&mut self, what: &str, pred: impl Fn(&Got) -> bool) {
        let deadline = Instant::now() + LONG;
        while !pred(&self.got) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            if self.next().await.is_none() {
                assert!(
                    pred(&self.got),
                    "connection closed before {what}: {:?}",
                    self.got
                );
                return;
            }
        }
    }

    /// Receives until `Exited`, then until init closes, then closes; returns `Exited`.
    pub async fn run_to_exit(&mut self) -> Exited {
        self.until("Exited", |g| g.exited.is_some()).await;
        // init half-closes once everything is delivered.
        while self.next().await.is_some() {}
        let _ = self.tx.close().await;
        self.got.exited.unwrap()
    }
}

/// A memory cgroup below this process's own, removed on drop.
pub struct TestCgroup {
    pub dirs: Vec<PathBuf>,
}

fn own_cgroup_dirs() -> (Option<PathBuf>, Option<PathBuf>) {
    let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut v1_memory = None;
    let mut v2 = None;
    for line in cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let rel = path.trim_start_matches('/');
        if ctrl.split(',').any(|c| c == "memory") {
            v1_memory = Some(Path::new("/sys/fs/cgroup/memory").join(rel));
        } else if ctrl.is_empty() {
            for base in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                let p = Path::new(base).join(rel);
                if p.join("memory.max").exists() || p.join("cgroup.controllers").exists() {
                    v2 = Some(p);
                    break;
                }
            }
        }
    }
    (v1_memory, v2)
}

impl TestCgroup {
    /// A cgroup limited to `memory` bytes (v1 memory controller on hybrid hosts, else v2).
    pub fn new(memory: u64) -> Self {
        let (v1, v2) = own_cgroup_dirs();
        let name = unique("hearth-init-test-");
        let dir = if let Some(v1) = v1 {
            let d = v1.join(&name);
            fs::create_dir(&d).unwrap();
            fs::write(d.join("memory.limit_in_bytes"), memory.to_string()).unwrap();
            if d.join("memory.memsw.limit_in_bytes").exists() {
                let _ = fs::write(d.join("memory.memsw.limit_in_bytes"), memory.to_string());
            }
            d
        } else {
            let base = v2.expect("no memory cgroup found");
            let d = base.join(&name);
            fs::create_dir(&d).unwrap();
            fs::write(d.join("memory.max"), memory.to_string()).unwrap();
            let _ = fs::write(d.join("memory.swap.max"), "0");
            d
        };
        Self { dirs: vec![dir] }
    }

    /// The `cgroup.procs` files to join.
    pub fn procs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // The processes may take a moment to leave after being killed.
            for _ in 0..500 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A named network namespace (`ip netns`), deleted on drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    /// Creates it.
    pub fn new() -> Self {
        let name = unique("hin");
        run("ip", &["netns", "add", &name]);
        Self { name }
    }

    /// Its file for setns.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip args...` inside it.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        run("ip", &all);
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
