//! The microvm runtime: one hearth-vmm process per instance (see `docs/vmm.md`), with the
//! image's rootfs as a read-only disk, a fresh scratch disk, a TAP device and a vsock device
//! whose host side is a Unix socket; hearth-init dials host port 1024, which hearth-vmm maps to
//! `<vsock socket>_1024`, where the agent listens.

use std::path::PathBuf;

use hearth_proto::init;

use super::{LaunchRequest, Runtime, RuntimeError, RuntimeState, RuntimeUsage, Virtualization};
use crate::{
    config::{MicrovmConfig, RuntimeKind},
    images::ResolvedImage,
};

/// The microvm runtime.
#[derive(Debug)]
pub struct Microvm {
    cfg: MicrovmConfig,
    run_dir: PathBuf,
    state_dir: PathBuf,
}

impl Microvm {
    /// A microvm runtime; fails when the host cannot run it (no silent fallback).
    pub fn new(
        cfg: MicrovmConfig,
        run_dir: PathBuf,
        state_dir: PathBuf,
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
        if !cfg.vmm_path.is_file() {
            return Err(RuntimeError::Unavailable {
                runtime: "microvm",
                why: format!("hearth-vmm not found at {}", cfg.vmm_path.display()),
            });
        }
        Ok(Self {
            cfg,
            run_dir,
            state_dir,
        })
    }
}

impl Runtime for Microvm {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Microvm
    }

    fn control_socket(&self, id: &str) -> PathBuf {
        self.run_dir
            .join("i")
            .join(format!("{id}.vsock_{}", hearth_proto::INIT_VSOCK_PORT))
    }

    fn init_rootfs(&self, image: &ResolvedImage, disk_bytes: u64) -> init::RootFs {
        init::RootFs {
            image: "/dev/vda".into(),
            fstype: image.fstype.clone(),
            scratch_device: "/dev/vdb".into(),
            disk_size_bytes: disk_bytes,
        }
    }

    fn launch(&self, _req: &LaunchRequest<'_>) -> Result<RuntimeState, RuntimeError> {
        let _ = (&self.cfg, &self.state_dir);
        Err(RuntimeError::Unavailable {
            runtime: "microvm",
            why: "launching hearth-vmm is not implemented yet".into(),
        })
    }

    fn kill(&self, state: &RuntimeState) {
        if super::sys::start_time(state.pid).ok() == Some(state.start_time) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(state.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    fn cleanup(&self, state: &RuntimeState) -> Result<(), RuntimeError> {
        super::sandbox::remove_if_exists(&state.control_socket);
        let _ = std::fs::remove_dir_all(&state.dir);
        Ok(())
    }

    fn oom_kills(&self, _state: &RuntimeState) -> u64 {
        0
    }

    fn usage(&self, _state: &RuntimeState) -> RuntimeUsage {
        RuntimeUsage::default()
    }
}
