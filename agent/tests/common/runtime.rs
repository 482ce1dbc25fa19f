//! Which runtime the end-to-end suite runs with, and what that runtime needs.
//!
//! `HEARTH_TEST_RUNTIME=sandbox|microvm` (default `sandbox`) selects it. The microvm mode runs
//! the same tests with a hearth-vmm microVM per instance booting the real guest kernel, with
//! hearth-init as `/init` of an initramfs; it needs hardware virtualization (not PVM, not
//! emulated KVM) and the files named by the variables below. `cargo xtask e2e` sets them all
//! on such hosts; on this kind of machine the suite runs in the sandbox mode.

use std::path::PathBuf;

use hearth_agent::{config::RuntimeKind, model::pb};

/// Selects the runtime of the suite.
pub const RUNTIME_ENV: &str = "HEARTH_TEST_RUNTIME";
/// microvm mode: the guest kernel (`vmlinux`, as printed by `cargo xtask kernel`).
pub const KERNEL_ENV: &str = "HEARTH_TEST_KERNEL";
/// microvm mode: an initramfs holding the static hearth-init as `/init`
/// (`cargo xtask e2e --write-initrd PATH` writes one).
pub const INITRD_ENV: &str = "HEARTH_TEST_INITRD";
/// microvm mode, optional: the hearth-vmm binary (default: a debug build of the workspace's).
pub const VMM_ENV: &str = "HEARTH_TEST_VMM";

/// The smallest guest the microvm mode gives an instance: the kernel and hearth-init need
/// room that a namespace sandbox does not.
pub const MICROVM_MIN_MEMORY_MIB: u64 = 128;

/// The runtime this run of the suite uses (panics on a value that is not a runtime, so a typo
/// never silently runs the sandbox).
pub fn kind() -> RuntimeKind {
    match std::env::var(RUNTIME_ENV) {
        Err(_) => RuntimeKind::Sandbox,
        Ok(v) if v.is_empty() => RuntimeKind::Sandbox,
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{RUNTIME_ENV}={v:?}: {e}")),
    }
}

/// Whether the suite runs with the microvm runtime.
pub fn microvm() -> bool {
    kind() == RuntimeKind::Microvm
}

/// `Some(reason)` when this host cannot run the suite in the selected mode (for
/// `hearth_testkit::require!`).
pub fn unavailable() -> Option<String> {
    match kind() {
        RuntimeKind::Sandbox => None,
        RuntimeKind::Microvm => microvm_unavailable(),
    }
}

fn microvm_unavailable() -> Option<String> {
    let virt = hearth_agent::runtime::detect_virtualization();
    if !virt.hardware {
        return Some(format!(
            "{RUNTIME_ENV}=microvm needs hardware virtualization to boot the guest kernel, and \
             this host has none: {}. Run the suite in the sandbox mode here (the default), and \
             in microvm mode on a hardware-KVM host (`cargo xtask e2e` does)",
            virt.note
        ));
    }
    for (var, what) in [
        (
            KERNEL_ENV,
            "the guest kernel (cargo xtask kernel prints its path)",
        ),
        (
            INITRD_ENV,
            "an initramfs with hearth-init as /init (cargo xtask e2e --write-initrd PATH)",
        ),
    ] {
        match std::env::var_os(var) {
            None => return Some(format!("{RUNTIME_ENV}=microvm needs {var}: {what}")),
            Some(p) if !PathBuf::from(&p).is_file() => {
                return Some(format!(
                    "{var}={} is not a file: it must name {what}",
                    PathBuf::from(p).display()
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// Points the agent's microvm settings at hearth-vmm, the kernel and the initramfs of the
/// suite (panics with the reason when this host cannot run them).
pub fn configure_microvm(cfg: &mut hearth_agent::config::MicrovmConfig) {
    if let Some(why) = microvm_unavailable() {
        panic!("{why}");
    }
    let path = |var: &str| PathBuf::from(std::env::var_os(var).expect("checked above"));
    cfg.vmm_path = std::env::var_os(VMM_ENV).map_or_else(
        || hearth_testkit::artifacts::host_bin("hearth-vmm", "hearth-vmm"),
        PathBuf::from,
    );
    cfg.kernel = path(KERNEL_ENV);
    cfg.initrd = path(INITRD_ENV);
    cfg.allow_without_hardware_virtualization = false;
}

/// A guest size for the selected runtime: `memory_mib` as asked in the sandbox, at least
/// [`MICROVM_MIN_MEMORY_MIB`] in a microVM.
pub fn memory_mib(memory_mib: u64) -> u64 {
    if microvm() {
        memory_mib.max(MICROVM_MIN_MEMORY_MIB)
    } else {
        memory_mib
    }
}

/// An instance type with [`memory_mib`] applied.
pub fn instance_type(vcpus: u32, memory: u64, disk_mib: u64) -> pb::InstanceType {
    pb::InstanceType {
        vcpus,
        memory_mib: memory_mib(memory),
        disk_mib,
    }
}

/// The file of the instance's state dir that holds hearth-init's own output (`started pid=`
/// lines and diagnostics): its stdout in the sandbox, the serial console in a microVM.
pub fn init_output_file() -> &'static str {
    match kind() {
        RuntimeKind::Sandbox => "runtime.log",
        RuntimeKind::Microvm => "console.log",
    }
}
