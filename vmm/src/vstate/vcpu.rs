//! vCPUs: boot-state setup and the run loop that dispatches exits to the buses.

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::{
    arch::x86_64::{cpuid, msr, regs},
    devices::bus::Bus,
    exit::{ExitReason, ExitSignal},
    metrics::{inc, metrics},
};

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("Cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// CPUID could not be built.
    #[error("Cannot build CPUID for vCPU {0}")]
    Cpuid(u8, #[source] cpuid::CpuidError),
    /// A state-setting ioctl failed.
    #[error("Cannot set the {1} of vCPU {0}")]
    Set(u8, &'static str, #[source] kvm_ioctls::Error),
    /// The MSR list could not be built.
    #[error("Cannot build the MSRs of vCPU {0}")]
    Msrs(u8, #[source] msr::MsrError),
    /// Fewer MSRs were set than asked.
    #[error("KVM set only {1} of the boot MSRs of vCPU {0}")]
    MsrsPartial(u8, usize),
    /// The page tables or GDT could not be written.
    #[error("Cannot write the boot tables")]
    Tables(#[source] regs::RegsError),
}

/// One vCPU and what its exits are dispatched to.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(
        fd: VcpuFd,
        index: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            fd,
            index,
            pio,
            mmio,
            exit,
        }
    }

    /// The vCPU's index (its APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC for a 64-bit entry at `entry`.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        vcpu_count: u8,
        entry: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<(), VcpuError> {
        let i = self.index;
        let mut cpuid = supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, i, vcpu_count).map_err(|e| VcpuError::Cpuid(i, e))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::Set(i, "CPUID", e))?;

        let msrs = msr::boot_msrs().map_err(|e| VcpuError::Msrs(i, e))?;
        let n = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuError::Set(i, "MSRs", e))?;
        if n != msrs.as_slice().len() {
            return Err(VcpuError::MsrsPartial(i, n));
        }

        if i == 0 {
            regs::write_boot_tables(mem).map_err(VcpuError::Tables)?;
        }
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(|e| VcpuError::Set(i, "registers", e))?;
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| VcpuError::Set(i, "special registers", e))?;
        regs::setup_sregs(&mut sregs);
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| VcpuError::Set(i, "special registers", e))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(|e| VcpuError::Set(i, "FPU", e))?;

        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| VcpuError::Set(i, "LAPIC", e))?;
        msr::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| VcpuError::Set(i, "LAPIC", e))?;
        Ok(())
    }

    /// Runs the guest until the VM ends; the reason goes to the exit signal.
    pub fn run(mut self) {
        let m = &metrics().vcpu_exits;
        loop {
            if self.exit.reason().is_some() {
                // Another vCPU or the main thread ended the VM: the process is about to exit.
                park_forever();
            }
            let reason = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    inc(&m.io_out);
                    if !self.pio.write(u64::from(port), data) {
                        inc(&m.unhandled);
                    }
                    continue;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    inc(&m.io_in);
                    if !self.pio.read(u64::from(port), data) {
                        // No device: the bus floats high.
                        data.fill(0xff);
                        inc(&m.unhandled);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    inc(&m.mmio_read);
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                        inc(&m.unhandled);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    inc(&m.mmio_write);
                    if !self.mmio.write(addr, data) {
                        inc(&m.unhandled);
                    }
                    continue;
                }
                Ok(VcpuExit::Hlt) => {
                    inc(&m.hlt);
                    ExitReason::GuestError(format!("vCPU {} halted", self.index))
                }
                Ok(VcpuExit::Shutdown) => {
                    inc(&m.shutdown);
                    ExitReason::TripleFault
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    inc(&m.system_event);
                    match kind {
                        KVM_SYSTEM_EVENT_RESET | KVM_SYSTEM_EVENT_SHUTDOWN => {
                            ExitReason::GuestReset
                        }
                        other => ExitReason::GuestError(format!("system event {other}")),
                    }
                }
                Ok(VcpuExit::InternalError) => {
                    inc(&m.error);
                    ExitReason::GuestError(format!(
                        "KVM internal error on vCPU {} (emulation failure)",
                        self.index
                    ))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    inc(&m.error);
                    ExitReason::GuestError(format!(
                        "KVM entry failed on CPU {cpu}: reason {reason:#x}"
                    ))
                }
                Ok(VcpuExit::Intr) => {
                    inc(&m.intr);
                    continue;
                }
                Ok(other) => {
                    inc(&m.other);
                    ExitReason::GuestError(format!("unexpected vCPU exit {other:?}"))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    inc(&m.intr);
                    continue;
                }
                Err(e) => {
                    ExitReason::VmmError(format!("KVM_RUN failed on vCPU {}: {e}", self.index))
                }
            };
            self.exit.signal(reason);
            park_forever();
        }
    }
}

/// The main thread ends the process; the vCPU keeps its descriptors until then (closing them
/// would start tearing the VM down on this thread).
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}
