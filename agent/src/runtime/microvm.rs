//! The microvm runtime: one hearth-vmm process per instance (see `docs/vmm.md`), with the
//! image's rootfs as a read-only disk (`/dev/vda`), a fresh scratch disk (`/dev/vdb`, the
//! writable layer: a sparse file under the state dir with an empty ext4, made anew for every boot), the instance's TAP, and a vsock device whose
//! host side is a Unix socket; hearth-init dials host port 1024, which hearth-vmm maps to
//! `<vsock socket>_1024`, where the agent listens. The VMM runs in its own process group and
//! in an instance cgroup, so it outlives the agent.

use std::{
    fs::OpenOptions,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use hearth_proto::init;

use super::{
    LaunchRequest, Runtime, RuntimeError, RuntimeState, RuntimeUsage, Virtualization,
    cgroup::{Layout, Limits},
    sandbox::remove_if_exists,
    sys,
};
use crate::{
    config::{MicrovmConfig, RuntimeKind},
    images::ResolvedImage,
};

/// Memory the VMM process may use beyond the guest's RAM.
const VMM_OVERHEAD_MIB: u64 = 64;
/// The guest's vsock context id (only the host, CID 2, is ever dialled).
const GUEST_CID: u32 = 3;

/// Creates the boot's scratch disk: a sparse file of `bytes` holding an empty ext4 filesystem,
/// which is what hearth-init expects on its scratch device (it mounts and empties it, it never
/// formats: the guest has no mkfs). No journal (the layer dies with the boot) and lazy inode
/// table init, so the file stays sparse and mkfs takes about 10 ms.
fn make_scratch(path: &Path, bytes: u64) -> Result<(), RuntimeError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(bytes).map_err(io(path))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-L",
            "hearth-scratch",
        ])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RuntimeError::Spawn {
            what: "mkfs.ext4 for the scratch disk (install e2fsprogs)".into(),
            source,
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(RuntimeError::Scratch {
            path: path.to_owned(),
            why: format!(
                "mkfs.ext4 failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Asks hearth-vmm's control socket for `metrics` (one line of JSON), briefly.
fn vmm_metrics(socket: &Path) -> Option<serde_json::Value> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let t = Some(std::time::Duration::from_millis(200));
    s.set_read_timeout(t).ok()?;
    s.set_write_timeout(t).ok()?;
    s.write_all(b"metrics\n").ok()?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    (v["ok"] == true).then_some(v)
}

/// The microvm runtime.
#[derive(Debug)]
pub struct Microvm {
    cfg: MicrovmConfig,
    run_dir: PathBuf,
    state_dir: PathBuf,
    cgroups: Layout,
}

impl Microvm {
    /// A microvm runtime; fails when the host cannot run it (no silent fallback).
    pub fn new(
        cfg: MicrovmConfig,
        run_dir: PathBuf,
        state_dir: PathBuf,
        cgroups: Layout,
        virt: &Virtualization,
    ) -> Result<Self, RuntimeError> {
        if !virt.hardware && !cfg.allow_without_hardware_virtualization {
            return Err(RuntimeError::Unavailable {
                runtime: "microvm",
                why: format!(
                    "no hardware virtualization ({}); configure runtime = \"sandbox\" to use the sandbox",
                    virt.note
                ),
            });
        }
        for (what, path) in [
            ("hearth-vmm", &cfg.vmm_path),
            ("the guest kernel", &cfg.kernel),
        ] {
            if !path.is_file() {
                return Err(RuntimeError::Unavailable {
                    runtime: "microvm",
                    why: format!("{what} not found at {}", path.display()),
                });
            }
        }
        cgroups.prepare()?;
        Ok(Self {
            cfg,
            run_dir,
            state_dir,
            cgroups,
        })
    }

    fn vsock_socket(&self, id: &str) -> PathBuf {
        // Short: Unix socket paths are limited to 107 bytes (and `_1024` is appended).
        self.run_dir.join("i").join(format!("{id}.vsock"))
    }

    /// The boot's writable disk: on the state disk, never in the run dir (a tmpfs on most hosts,
    /// where a guest filling its disk would fill host memory). Named after the boot's run dir,
    /// which stays with the boot when a warm-pool member is handed to an instance.
    fn scratch_path(&self, dir: &Path) -> PathBuf {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.state_dir.join("scratch").join(format!("{name}.img"))
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join("i").join(id)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Runtime for Microvm {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Microvm
    }

    fn control_socket(&self, id: &str) -> PathBuf {
        let mut s = self.vsock_socket(id).into_os_string();
        s.push(format!("_{}", hearth_proto::INIT_VSOCK_PORT));
        s.into()
    }

    fn init_rootfs(&self, image: &ResolvedImage, disk_bytes: u64) -> init::RootFs {
        init::RootFs {
            image: "/dev/vda".into(),
            fstype: image.fstype.clone(),
            scratch_device: "/dev/vdb".into(),
            disk_size_bytes: disk_bytes,
        }
    }

    fn launch(&self, req: &LaunchRequest<'_>) -> Result<RuntimeState, RuntimeError> {
        let dir = self.instance_dir(req.id);
        // A fresh writable layer every boot.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let scratch = self.scratch_path(&dir);
        make_scratch(&scratch, req.instance_type.disk_mib << 20)?;
        let logs = self.state_dir.join("instances").join(req.id);
        std::fs::create_dir_all(&logs).map_err(io(&logs))?;
        super::rotate_boot_logs(&logs);
        let out_path = logs.join("runtime.log");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(io(&out_path))?;
        let control = dir.join("ctl.sock");
        let vsock = self.vsock_socket(req.id);
        remove_if_exists(&vsock);
        let mut cmdline = "console=ttyS0 reboot=k panic=1 pci=off".to_owned();
        // A warm-pool member says Hello without an instance id and waits for `assign`.
        if !req.warm {
            cmdline.push_str(&format!(" hearth.instance={}", req.id));
        }
        if !self.cfg.kernel_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.cfg.kernel_cmdline);
        }
        let mut cmd = Command::new(&self.cfg.vmm_path);
        cmd.arg("--kernel")
            .arg(&self.cfg.kernel)
            .arg("--cmdline")
            .arg(&cmdline)
            .arg("--vcpus")
            .arg(req.instance_type.vcpus.to_string())
            .arg("--memory-mib")
            .arg(req.instance_type.memory_mib.to_string())
            .arg("--disk")
            .arg(format!("path={},ro,id=rootfs", req.image.rootfs.display()))
            .arg("--disk")
            .arg(format!("path={},id=scratch", scratch.display()))
            .arg("--vsock")
            .arg(format!("cid={GUEST_CID},uds={}", vsock.display()))
            .arg("--serial")
            .arg(format!("file:{}", logs.join("console.log").display()))
            .arg("--control-socket")
            .arg(&control);
        if !self.cfg.initrd.as_os_str().is_empty() {
            cmd.arg("--initrd").arg(&self.cfg.initrd);
        }
        if let Some(tap) = &req.tap {
            let mut net = format!("tap={tap}");
            if let Some(mac) = &req.mac {
                net.push_str(&format!(",mac={mac}"));
            }
            cmd.arg("--net").arg(net);
        }
        let err_out = out.try_clone().map_err(io(&out_path))?;
        // Its own process group: signals to the agent's group do not reach it.
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err_out)
            .process_group(0);
        let cgroup = self.cgroups.instance(req.id);
        cgroup.reap()?;
        cgroup.create(&Limits {
            memory_bytes: (req.instance_type.memory_mib + VMM_OVERHEAD_MIB) << 20,
            vcpus: req.instance_type.vcpus,
            pids: 64,
        })?;
        let child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            what: format!("hearth-vmm ({})", self.cfg.vmm_path.display()),
            source,
        })?;
        let pid = child.id() as i32;
        // Reaped through its pidfd by the supervisor.
        drop(child);
        if let Err(source) = cgroup.add(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(RuntimeError::Spawn {
                what: "placing hearth-vmm in its cgroup".into(),
                source,
            });
        }
        Ok(RuntimeState {
            kind: RuntimeKind::Microvm,
            pid,
            start_time: sys::start_time(pid).unwrap_or(0),
            cgroup: Some(cgroup),
            dir,
            control_socket: self.control_socket(req.id),
            vmm_socket: Some(control),
        })
    }

    fn kill(&self, state: &RuntimeState) {
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
        if let Some(id) = state.dir.file_name().and_then(|n| n.to_str()) {
            remove_if_exists(&self.vsock_socket(id));
        }
        let _ = std::fs::remove_file(self.scratch_path(&state.dir));
        let _ = std::fs::remove_dir_all(&state.dir);
        Ok(())
    }

    fn reap(&self, id: &str) -> Result<(), RuntimeError> {
        self.cgroups.instance(id).reap()?;
        let dir = self.instance_dir(id);
        remove_if_exists(&self.control_socket(id));
        remove_if_exists(&self.vsock_socket(id));
        let _ = std::fs::remove_file(self.scratch_path(&dir));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    fn oom_kills(&self, state: &RuntimeState) -> u64 {
        state.cgroup.as_ref().map(|c| c.oom_kills()).unwrap_or(0)
    }

    fn usage(&self, state: &RuntimeState) -> RuntimeUsage {
        // The VMM's resident set (guest memory it touched plus its own).
        let rss = std::fs::read_to_string(format!("/proc/{}/status", state.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(|kib| kib * 1024)
            .unwrap_or(0);
        let mut usage = RuntimeUsage {
            rss_bytes: rss,
            ..Default::default()
        };
        if let Some(m) = state.vmm_socket.as_deref().and_then(vmm_metrics) {
            usage.boot_time_us = m["metrics"]["boot_time_us"].as_u64().unwrap_or(0);
            usage.vcpu_exits = m["metrics"]["vcpu_exits"]
                .as_object()
                .map(|o| o.values().filter_map(|v| v.as_u64()).sum())
                .unwrap_or(0);
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn scratch_disk_is_a_clean_sparse_ext4() {
        hearth_testkit::require!(hearth_testkit::skip::program("mkfs.ext4"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratch").join("boot.img");
        make_scratch(&path, 256 << 20).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        assert!(
            meta.blocks() * 512 < 8 << 20,
            "scratch disk is not sparse: {} bytes allocated",
            meta.blocks() * 512
        );
        // e2fsck -n: read-only check; exit 0 means a clean filesystem.
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        // A second boot gets a fresh one over the old file.
        std::fs::write(&path, b"leftover").unwrap();
        make_scratch(&path, 64 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 20);
    }
}
