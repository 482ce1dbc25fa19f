//! Runtimes: how an instance's isolated environment is started, watched and ended.
//!
//! Both runtimes sit behind [`Runtime`]. The agent chooses one from its config and never falls
//! back to the other on its own. A runtime starts hearth-init (as PID 1 of new namespaces, or
//! inside a hearth-vmm microVM) and tells the agent where init will dial; everything after that
//! (the init protocol, lifecycle, logs) is shared.
//!
//! The processes a runtime starts outlive the agent: [`RuntimeState`] (stored with the
//! instance) is enough for a restarted agent to find them again ([`Process::adopt`]).
//!
//! # Layout
//!
//! - [`sys`]: raw process calls (pidfd, clone into namespaces); all `unsafe` of the runtimes.
//! - [`cgroup`]: instance cgroups and their limits.
//! - [`sandbox`]: hearth-init in Linux namespaces.
//! - [`microvm`]: one hearth-vmm per instance.

pub mod cgroup;
pub mod microvm;
pub mod sandbox;
pub mod sys;

use std::{os::fd::OwnedFd, path::PathBuf};

use hearth_proto::init;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::{config::RuntimeKind, images::ResolvedImage, model::pb};

pub use sys::ExitInfo;

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime cannot work on this host (with the reason).
    #[error("The {runtime} runtime is unavailable: {why}")]
    Unavailable {
        /// Which runtime.
        runtime: &'static str,
        /// Why.
        why: String,
    },
    /// Setting up the instance's cgroup failed.
    #[error("Instance cgroup setup failed")]
    Cgroup(#[from] cgroup::CgroupError),
    /// Starting the process failed.
    #[error("Starting {what} failed")]
    Spawn {
        /// What was started.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The boot's scratch disk could not be made.
    #[error("Making the scratch disk {path} failed: {why}")]
    Scratch {
        /// The disk file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// A file operation failed.
    #[error("Runtime file operation on {path} failed")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a runtime needs to launch one boot of an instance.
#[derive(Debug)]
pub struct LaunchRequest<'a> {
    /// Instance id.
    pub id: &'a str,
    /// Boot number (1-based).
    pub boot: u32,
    /// The image.
    pub image: &'a ResolvedImage,
    /// vCPUs, memory, disk.
    pub instance_type: &'a pb::InstanceType,
    /// Host-side network interface to give the instance (a TAP name for the microvm), if any.
    pub tap: Option<String>,
    /// MAC address of the guest's interface, if any.
    pub mac: Option<String>,
    /// A warm-pool member (`id` is the member's name): hearth-init starts without an instance
    /// id and waits for `assign`.
    pub warm: bool,
    /// Sandbox: a network namespace prepared with the instance's interface, to join instead of
    /// a new empty one.
    pub netns: Option<std::os::fd::BorrowedFd<'a>>,
}

/// What the agent stores to find an instance's processes again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeState {
    /// Which runtime started it.
    pub kind: RuntimeKind,
    /// The main process: hearth-init (sandbox) or hearth-vmm (microvm).
    pub pid: i32,
    /// Its start time (`/proc/PID/stat`), against pid reuse.
    pub start_time: u64,
    /// The instance cgroup (sandbox).
    #[serde(default)]
    pub cgroup: Option<cgroup::InstanceCgroup>,
    /// Per-boot runtime files.
    pub dir: PathBuf,
    /// The socket the agent listens on for hearth-init.
    pub control_socket: PathBuf,
    /// hearth-vmm's control socket (microvm).
    #[serde(default)]
    pub vmm_socket: Option<PathBuf>,
}

/// Resource use the runtime sees from outside.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuntimeUsage {
    /// Resident memory of the VMM, or memory charged to the sandbox's cgroup.
    pub rss_bytes: u64,
    /// The VMM's start to the guest's boot-timer write (microvm; 0 when unknown).
    pub boot_time_us: u64,
    /// vCPU exits so far (microvm).
    pub vcpu_exits: u64,
}

/// A runtime.
pub trait Runtime: Send + Sync {
    /// Which one.
    fn kind(&self) -> RuntimeKind;
    /// Where the agent must listen for hearth-init of instance `id` (bound before launch).
    fn control_socket(&self, id: &str) -> PathBuf;
    /// How hearth-init finds its root filesystem in this runtime.
    fn init_rootfs(&self, image: &ResolvedImage, disk_bytes: u64) -> init::RootFs;
    /// Starts one boot; returns what identifies it.
    fn launch(&self, req: &LaunchRequest<'_>) -> Result<RuntimeState, RuntimeError>;
    /// Kills everything of the instance at once (SIGKILL).
    fn kill(&self, state: &RuntimeState);
    /// Removes what the boot left (cgroup, sockets, scratch files); after the process ended.
    fn cleanup(&self, state: &RuntimeState) -> Result<(), RuntimeError>;
    /// Kills and removes what a boot of `id` left with no [`RuntimeState`] to find it by (the
    /// agent died between launch and storing the state): its cgroup and every process in it.
    fn reap(&self, id: &str) -> Result<(), RuntimeError>;
    /// OOM kills seen in the instance (0 when the runtime cannot tell).
    fn oom_kills(&self, state: &RuntimeState) -> u64;
    /// Resource use seen from outside.
    fn usage(&self, state: &RuntimeState) -> RuntimeUsage;
}

/// The runtime's log files of one boot (`runtime.log`, and `console.log` of a microVM) live in
/// `<state_dir>/instances/<id>/`; the previous boot's are kept as `<name>.1`. Call before a
/// launch opens them.
pub fn rotate_boot_logs(dir: &std::path::Path) {
    for name in BOOT_LOGS {
        let path = dir.join(name);
        if path.exists() {
            let _ = std::fs::rename(&path, dir.join(format!("{name}.1")));
        }
    }
}

/// The files [`rotate_boot_logs`] rotates.
pub const BOOT_LOGS: [&str; 2] = ["runtime.log", "console.log"];

/// A warm-pool member became instance `id`: its boot logs (written under the member's name,
/// still open in its processes) move to the instance's directory (the same file system, so
/// the processes keep writing to them), the instance's previous ones rotated.
pub fn move_boot_logs(state_dir: &std::path::Path, member: &str, id: &str) -> std::io::Result<()> {
    let from = state_dir.join("instances").join(member);
    let to = state_dir.join("instances").join(id);
    std::fs::create_dir_all(&to)?;
    rotate_boot_logs(&to);
    for name in BOOT_LOGS {
        match std::fs::rename(from.join(name), to.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::remove_dir_all(&from).or_else(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })
}

/// A watched main process (ours, or adopted after a restart).
#[derive(Debug)]
pub struct Process {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
}

impl Process {
    /// Watches `state`'s main process. `Ok(None)` when it is gone (or its pid was reused).
    pub fn adopt(state: &RuntimeState) -> std::io::Result<Option<Self>> {
        let fd = match sys::pidfd_open(state.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        // Checked after opening the pidfd, so the pidfd cannot refer to a later process.
        match sys::start_time(state.pid) {
            Ok(t) if t == state.start_time => {}
            _ => return Ok(None),
        }
        Ok(Some(Self {
            pid: state.pid,
            fd: sys::async_pidfd(fd)?,
        }))
    }

    /// The pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits for the process to end; reaps it when it is our child. The exit status is only
    /// known for our own children (not for one adopted after a restart).
    pub async fn wait(&self) -> ExitInfo {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return ExitInfo::default();
            };
            match sys::waitid_pidfd(self.fd.get_ref()) {
                Ok(Some(info)) => return info,
                Ok(None) => guard.clear_ready(),
                // A pidfd of a process that is not our child turns readable when it ends.
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return ExitInfo::default(),
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "waitid on a pidfd failed");
                    return ExitInfo::default();
                }
            }
        }
    }

    /// Sends SIGKILL (through the pidfd, so never to a recycled pid).
    pub fn kill(&self) {
        let _ = sys::pidfd_send_signal(self.fd.get_ref(), libc::SIGKILL);
    }
}

/// What the host offers for virtualization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Virtualization {
    /// Hardware virtualization usable by KVM (vmx/svm, /dev/kvm, not PVM).
    pub hardware: bool,
    /// Why not, when not.
    pub note: String,
}

/// Detects hardware virtualization: `/dev/kvm`, a `vmx`/`svm` CPU flag, and not the PVM module
/// (which emulates guests instead).
pub fn detect_virtualization() -> Virtualization {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let (hardware, note) = match (kvm, flag, pvm) {
        (false, _, _) => (false, "no usable /dev/kvm".to_owned()),
        (true, _, true) => (
            false,
            "KVM is PVM (kvm_pvm): guests are emulated, Linux cannot boot".to_owned(),
        ),
        (true, false, false) => (false, "the CPU has no vmx/svm flag".to_owned()),
        (true, true, false) => (true, String::new()),
    };
    Virtualization { hardware, note }
}
