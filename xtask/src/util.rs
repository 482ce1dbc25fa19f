//! Small helpers shared by the tasks: running commands, printing steps.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

/// The workspace root.
pub fn root() -> PathBuf {
    hearth_testkit::artifacts::workspace_root()
}

/// A `cargo` command for the toolchain that runs xtask.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Renders a command for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio; fails with the command line when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("Cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails with its stderr when it fails.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("Cannot start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when `program` is an executable on PATH (or a path that exists).
pub fn have(program: &str) -> bool {
    which(program).is_some()
}

/// Finds `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Times a named step and prints one line for it.
pub fn step<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    eprintln!("==> {name}");
    let result = f();
    let secs = start.elapsed().as_secs_f64();
    match &result {
        Ok(_) => eprintln!("==> {name}: ok ({secs:.1} s)"),
        Err(_) => eprintln!("==> {name}: FAILED ({secs:.1} s)"),
    }
    result.with_context(|| format!("Step `{name}` failed"))
}

/// Stops a hearth-agent this task started: SIGTERM (it drains its API and, as configured,
/// destroys what it runs), then SIGKILL if it has not exited within `grace`.
pub fn stop_agent(agent: &mut std::process::Child, grace: std::time::Duration) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while agent.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = agent.kill();
    let _ = agent.wait();
}

/// What a hearth-agent this task ran leaves on the node after its instances are gone: the
/// bridge, the NAT table, the bpffs pin directory and the (empty) cgroup parent in every
/// hierarchy the agent used. Removed on a best-effort basis.
pub fn remove_node_leftovers(bridge: &str, nat_table: &str, bpf_root: &str, cgroup_parent: &str) {
    let quiet = |cmd: &mut Command| {
        let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
    };
    quiet(Command::new("ip").args(["link", "del", bridge]));
    quiet(Command::new("nft").args(["delete", "table", "ip", nat_table]));
    let _ = std::fs::remove_dir_all(bpf_root);
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for ctrl in ["memory", "cpu", "pids", ""] {
        let path = own.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, c, path) = (p.next()?, p.next()?, p.next()?);
            c.split(',')
                .any(|x| x == ctrl || (ctrl.is_empty() && x.is_empty()))
                .then(|| path.to_owned())
        });
        if let Some(path) = path {
            let base = if ctrl.is_empty() {
                "/sys/fs/cgroup".to_owned()
            } else {
                format!("/sys/fs/cgroup/{ctrl}")
            };
            let _ = std::fs::remove_dir(format!(
                "{base}{}/{cgroup_parent}",
                path.trim_end_matches('/')
            ));
        }
    }
}
