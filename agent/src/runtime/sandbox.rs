//! The sandbox runtime: the static hearth-init as PID 1 of new PID, mount, network, UTS and IPC
//! namespaces, in a cgroup with the instance type's limits. The image file is handed to init,
//! which mounts it read-only under a size-capped tmpfs upper layer (the instance's disk). The
//! control channel is a Unix socket the agent listens on.
//!
//! Weaker isolation than the microvm: it is only used when the config says `sandbox`.

use std::{
    ffi::CString,
    fs::OpenOptions,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use hearth_proto::init;

use super::{
    LaunchRequest, Runtime, RuntimeError, RuntimeState, RuntimeUsage,
    cgroup::{Layout, Limits},
    sys,
};
use crate::{config::RuntimeKind, images::ResolvedImage};

/// Tasks allowed per instance.
const PIDS_MAX: u64 = 4096;

/// The sandbox runtime.
#[derive(Debug)]
pub struct Sandbox {
    init_path: PathBuf,
    run_dir: PathBuf,
    state_dir: PathBuf,
    cgroups: Layout,
}

impl Sandbox {
    /// A sandbox runtime that starts `init_path`, keeps sockets under `run_dir`, runtime logs
    /// under `state_dir`, and instance cgroups in `cgroups`.
    pub fn new(
        init_path: PathBuf,
        run_dir: PathBuf,
        state_dir: PathBuf,
        cgroups: Layout,
    ) -> Result<Self, RuntimeError> {
        if !init_path.is_file() {
            return Err(RuntimeError::Unavailable {
                runtime: "sandbox",
                why: format!("hearth-init not found at {}", init_path.display()),
            });
        }
        cgroups.prepare()?;
        Ok(Self {
            init_path,
            run_dir,
            state_dir,
            cgroups,
        })
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join("i").join(id)
    }
}

fn cstr(bytes: &[u8]) -> CString {
    CString::new(bytes).unwrap_or_else(|_| CString::new("?").expect("no NUL"))
}

impl Runtime for Sandbox {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Sandbox
    }

    fn control_socket(&self, id: &str) -> PathBuf {
        // Short: a Unix socket path is limited to 107 bytes.
        self.run_dir.join("i").join(format!("{id}.sock"))
    }

    fn init_rootfs(&self, image: &ResolvedImage, disk_bytes: u64) -> init::RootFs {
        init::RootFs {
            image: image.rootfs.to_string_lossy().into_owned(),
            fstype: image.fstype.clone(),
            scratch_device: String::new(),
            disk_size_bytes: disk_bytes,
        }
    }

    fn launch(&self, req: &LaunchRequest<'_>) -> Result<RuntimeState, RuntimeError> {
        let dir = self.instance_dir(req.id);
        std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
            path: dir.clone(),
            source,
        })?;
        // Left from a boot that ended while the agent was down.
        let cgroup = self.cgroups.instance(req.id);
        cgroup.reap()?;
        cgroup.create(&Limits {
            memory_bytes: req.instance_type.memory_mib << 20,
            vcpus: req.instance_type.vcpus,
            pids: PIDS_MAX,
        })?;
        let log_dir = self.state_dir.join("instances").join(req.id);
        std::fs::create_dir_all(&log_dir).map_err(|source| RuntimeError::Io {
            path: log_dir.clone(),
            source,
        })?;
        super::rotate_boot_logs(&log_dir);
        let log_path = log_dir.join("runtime.log");
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| RuntimeError::Io {
                path: log_path.clone(),
                source,
            })?;
        let socket = self.control_socket(req.id);
        let mut sock_arg = b"hearth.socket=".to_vec();
        sock_arg.extend_from_slice(socket.as_os_str().as_bytes());
        let mut args = vec![cstr(b"hearth-init"), cstr(&sock_arg)];
        // A warm-pool member says Hello without an instance id and waits for `assign`.
        if !req.warm {
            args.push(cstr(format!("hearth.instance={}", req.id).as_bytes()));
        }
        let new_net = if req.netns.is_some() {
            0
        } else {
            libc::CLONE_NEWNET
        };
        let cmd = sys::NamespacedCommand {
            program: cstr(self.init_path.as_os_str().as_bytes()),
            args,
            env: vec![cstr(b"PATH=/usr/sbin:/usr/bin:/sbin:/bin")],
            output: output.into(),
            namespaces: libc::CLONE_NEWPID
                | libc::CLONE_NEWNS
                | new_net
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWIPC,
            netns: req.netns.map(|fd| std::os::fd::AsRawFd::as_raw_fd(&fd)),
        };
        let pid = sys::spawn_namespaced(&cmd, |pid| cgroup.add(pid)).map_err(|source| {
            let _ = cgroup.remove();
            RuntimeError::Spawn {
                what: format!("hearth-init ({})", self.init_path.display()),
                source,
            }
        })?;
        let start_time = sys::start_time(pid).unwrap_or(0);
        Ok(RuntimeState {
            kind: RuntimeKind::Sandbox,
            pid,
            start_time,
            cgroup: Some(cgroup),
            dir,
            control_socket: socket,
            vmm_socket: None,
        })
    }

    fn kill(&self, state: &RuntimeState) {
        // Killing PID 1 of the namespace takes every process in it; the cgroup sweep catches
        // anything that escaped the PID namespace (none should).
        if sys::start_time(state.pid).ok() == Some(state.start_time) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(state.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(cg) = &state.cgroup {
            cg.kill_all();
        }
    }

    fn cleanup(&self, state: &RuntimeState) -> Result<(), RuntimeError> {
        if let Some(cg) = &state.cgroup {
            cg.kill_all();
            cg.remove()?;
        }
        remove_if_exists(&state.control_socket);
        let _ = std::fs::remove_dir_all(&state.dir);
        Ok(())
    }

    fn reap(&self, id: &str) -> Result<(), RuntimeError> {
        self.cgroups.instance(id).reap()?;
        remove_if_exists(&self.control_socket(id));
        let _ = std::fs::remove_dir_all(self.instance_dir(id));
        Ok(())
    }

    fn oom_kills(&self, state: &RuntimeState) -> u64 {
        state.cgroup.as_ref().map(|c| c.oom_kills()).unwrap_or(0)
    }

    fn usage(&self, state: &RuntimeState) -> RuntimeUsage {
        RuntimeUsage {
            rss_bytes: state.cgroup.as_ref().map(|c| c.memory_usage()).unwrap_or(0),
            ..Default::default()
        }
    }
}

/// Removes a file, ignoring "not found".
pub fn remove_if_exists(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove file");
    }
}
