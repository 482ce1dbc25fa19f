//! The doctor's two active probes: the KVM API version ioctl (the module's only `unsafe`) and
//! a real TCX attach of the agent's own eBPF program.

use std::{os::fd::AsRawFd as _, path::Path};

use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
use hearth_ebpf_common::{MAP_FLOWS, PROG_EGRESS};

// KVM_GET_API_VERSION = _IO(KVMIO, 0x00), KVMIO = 0xAE (linux/kvm.h).
nix::ioctl_none!(kvm_get_api_version, 0xAE, 0x00);

/// `KVM_GET_API_VERSION` on the device at `path` (12 on every kernel since 2.6.22).
pub fn kvm_api_version(path: &Path) -> std::io::Result<i32> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    // SAFETY: the fd is an open file for the duration of the call; KVM_GET_API_VERSION takes
    // no argument and only returns an integer. On another kind of file the kernel answers
    // ENOTTY, which becomes an error.
    let version = unsafe { kvm_get_api_version(dev.as_raw_fd()) }?;
    Ok(version)
}

/// Loads the agent's embedded eBPF object and attaches its egress classifier with TCX to `lo`
/// of a network namespace made for this probe (on a helper thread, so the host's interfaces
/// are never touched), then detaches it. This is what the agent does for every instance, so a
/// pass means BTF, the verifier, CAP_BPF and TCX all work. Needs root.
pub fn probe_tcx() -> Result<(), String> {
    std::thread::Builder::new()
        .name("doctor-tcx".into())
        .spawn(|| {
            // Only this thread moves: the namespace goes away with it.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("cannot create a network namespace for the probe: {e}"))?;
            let mut ebpf = aya::EbpfLoader::new()
                .map_max_entries(MAP_FLOWS, 64)
                .load(crate::ebpf::OBJECT)
                .map_err(|e| format!("loading the eBPF object failed: {}", chain(&e)))?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(PROG_EGRESS)
                .ok_or_else(|| format!("the eBPF object has no program {PROG_EGRESS}"))?
                .try_into()
                .map_err(|e| format!("{PROG_EGRESS} is not a tc classifier: {e}"))?;
            prog.load()
                .map_err(|e| format!("the verifier refused {PROG_EGRESS}: {}", chain(&e)))?;
            let link = prog
                .attach_with_options(
                    "lo",
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| format!("TCX attach failed: {}", chain(&e)))?;
            prog.detach(link)
                .map_err(|e| format!("TCX detach failed: {}", chain(&e)))?;
            Ok(())
        })
        .map_err(|e| format!("cannot start the probe thread: {e}"))?
        .join()
        .map_err(|_| "the probe thread panicked".to_owned())?
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
