//! `cargo xtask demo`: the main job, end to end.
//!
//! Sets up, starts a local registry with a sample HTTP image, starts `hearth-agent` with its
//! embedded defaults (plus the few overrides a demo needs: its own directories, node network
//! and ports, printed on screen) in the microvm runtime where hardware virtualization exists and
//! the sandbox otherwise (said on screen), runs the sample container, fetches a page through the
//! ingress, shows its logs, stops it and shows the stopped event with its exit code. Everything
//! it started is removed at the end, also when a step fails.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util;

/// Options of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Keep the agent's state directory (its path is printed) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

const ID: &str = "demo-web";
const BRIDGE: &str = "hearthdemo0";
const NAT_TABLE: &str = "hearth_demo";
const BPF_ROOT: &str = "/sys/fs/bpf/hearth-demo";
const CGROUP_PARENT: &str = "hearth-demo";

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What the demo started, removed on drop.
struct Demo {
    dir: tempfile::TempDir,
    agent: Option<Child>,
    hearthctl: PathBuf,
    socket: PathBuf,
    keep: bool,
}

impl Demo {
    fn ctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.hearthctl);
        c.arg("--socket").arg(&self.socket).args(args);
        c
    }

    fn show(&self, args: &[&str]) -> anyhow::Result<()> {
        println!("$ hearthctl {}", args.join(" "));
        util::run(&mut self.ctl(args))
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self
            .ctl(&["destroy", ID])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut agent) = self.agent.take() {
            util::stop_agent(&mut agent, Duration::from_secs(15));
        }
        util::remove_node_leftovers(BRIDGE, NAT_TABLE, BPF_ROOT, CGROUP_PARENT);
        if self.keep {
            let path = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            println!("demo: state kept in {}", path.keep().display());
        }
    }
}

fn http_get(port: u16, id: &str) -> anyhow::Result<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {id}.hearth.localhost\r\nx-hearth-instance: {id}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Ok((
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    ))
}

fn wait_for_socket(agent: &mut Child, socket: &Path, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if let Some(status) = agent.try_wait()? {
            bail!(
                "hearth-agent exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("hearth-agent did not open its socket within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Hardware virtualization as the agent detects it: `/dev/kvm`, a vmx/svm flag, not PVM.
fn hardware_virtualization() -> (bool, String) {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm = Path::new("/dev/kvm").exists();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    match (kvm, flag, pvm) {
        (false, _, _) => (false, "no /dev/kvm".into()),
        (true, _, true) => (false, "KVM here is PVM: guests are emulated".into()),
        (true, false, _) => (false, "the CPU has no vmx/svm flag".into()),
        (true, true, false) => (true, "KVM with vmx/svm".into()),
    }
}

/// Runs the demo.
pub fn run(args: &Args) -> anyhow::Result<()> {
    crate::setup::run(&crate::setup::Args { check: false })?;
    if !util::is_root() {
        bail!("the demo starts instances in namespaces and cgroups: run it as root");
    }
    let root = util::root();
    util::step("build hearth-agent and hearthctl", || {
        util::run(util::cargo().current_dir(&root).args([
            "build",
            "--quiet",
            "--package",
            "hearth-agent",
            "--bins",
        ]))
    })?;
    let bin = hearth_testkit::artifacts::target_dir().join("debug");
    let init = util::step("build the static hearth-init", || {
        Ok(hearth_testkit::artifacts::hearth_init())
    })?;

    let (hw, why) = hardware_virtualization();
    let runtime = if hw { "microvm" } else { "sandbox" };
    println!(
        "demo: hardware virtualization {} ({why}) -> the agent runs the {runtime} runtime",
        if hw { "present" } else { "absent" }
    );

    let registry = util::step("start a local registry with a sample HTTP image", || {
        Ok(hearth_testkit::registry::Registry::start())
    })?;
    let image = hearth_testkit::oci::httpd_image().push(&registry, "hearth/httpd", "v1");
    println!("demo: registry at {}, image {image}", registry.host());

    let dir = tempfile::Builder::new()
        .prefix("hearth-demo")
        .tempdir_in("/tmp")?;
    let socket = dir.path().join("run/agent.sock");
    let ingress_port = free_port()?;
    let metrics_port = free_port()?;
    // Embedded defaults, plus only what keeps the demo apart from a real agent on this host.
    let overrides = format!(
        r#"runtime = "{runtime}"
state_dir = "{state}"
run_dir = "{run}"
ingress_listen = "127.0.0.1:{ingress_port}"
bpf_root = "{BPF_ROOT}"

[api]
socket = "{socket}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[sandbox]
init_path = "{init}"

[cgroup]
parent = "{CGROUP_PARENT}"

[images]
insecure_registries = ["{registry}"]

[network]
subnet = "10.89.0.0/24"
bridge = "{BRIDGE}"
interface_prefix = "hdemo"
nat_table = "{NAT_TABLE}"
"#,
        state = dir.path().join("state").display(),
        run = dir.path().join("run").display(),
        socket = socket.display(),
        init = init.display(),
        registry = registry.host(),
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, &overrides)?;
    println!("demo: hearth-agent config = embedded defaults + these overrides:\n{overrides}");

    let log = dir.path().join("agent.log");
    let agent = Command::new(bin.join("hearth-agent"))
        .arg("--config")
        .arg(&config)
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?)
        .spawn()
        .context("Cannot start hearth-agent")?;
    let mut demo = Demo {
        dir,
        agent: Some(agent),
        hearthctl: bin.join("hearthctl"),
        socket: socket.clone(),
        keep: args.keep,
    };
    util::step("start hearth-agent", || {
        wait_for_socket(demo.agent.as_mut().expect("agent"), &socket, &log)
    })?;
    demo.show(&["node"])?;

    demo.show(&[
        "run",
        "--id",
        ID,
        &image,
        "--port",
        "8080",
        "--ready-port",
        "8080",
        "--grace",
        "10s",
    ])?;

    println!("$ curl -H 'x-hearth-instance: {ID}' http://127.0.0.1:{ingress_port}/");
    let (status, body) = http_get(ingress_port, ID)?;
    println!("{status}\n{body}");
    if !status.contains(" 200 ") {
        bail!("the ingress answered {status}: {body}");
    }
    println!(
        "demo: fetched the page through the ingress: {:?}",
        body.trim()
    );

    demo.show(&["logs", ID])?;
    demo.show(&["stop", ID, "--wait"])?;
    println!("$ hearthctl events --id {ID}");
    let out = util::output(&mut demo.ctl(&["events", "--id", ID]))?;
    print!("{out}");
    let stopped = out
        .lines()
        .find(|l| l.contains(" stopped "))
        .context("no stopped event")?;
    let code = stopped
        .split_whitespace()
        .find_map(|w| w.strip_prefix("exit_code="))
        .context("the stopped event has no exit code")?;
    println!("demo: {ID} stopped with exit code {code}");
    drop(demo);
    drop(registry);
    println!("demo: done (agent stopped, instance destroyed, node network removed)");
    Ok(())
}
