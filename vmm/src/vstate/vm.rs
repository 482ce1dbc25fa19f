//! The KVM VM: memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, irqfds and
//! ioeventfds.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDR;

/// Why the VM could not be created or wired.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM failed.
    #[error("Cannot create the KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("Cannot set the TSS address")]
    Tss(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("Cannot create the in-kernel irqchip")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("Cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("Cannot register guest memory slot {0}")]
    MemorySlot(u32, #[source] kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("Cannot register an irqfd for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// KVM_IOEVENTFD failed.
    #[error("Cannot register an ioeventfd at {0:#x}")]
    Ioeventfd(u64, #[source] kvm_ioctls::Error),
}

/// A VM with its irqchip and PIT, and guest memory registered.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM, the irqchip and the PIT, and registers `mem`.
    pub fn new(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let vm = Self::create(kvm)?;
        vm.setup_irqchip()?;
        vm.register_memory(mem)?;
        Ok(vm)
    }

    /// Creates an empty VM. [`Vm::setup_irqchip`] and [`Vm::register_memory`] complete it;
    /// they take different KVM locks and each waits for an SRCU grace period, so the builder
    /// runs them in parallel.
    pub fn create(kvm: &Kvm) -> Result<Self, VmError> {
        Ok(Self {
            fd: kvm.create_vm().map_err(VmError::Create)?,
        })
    }

    /// Creates the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT (before any vCPU).
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        let fd = &self.fd;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(VmError::Tss)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)
    }

    /// Registers each region of `mem` as a memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
            // the caller keeps alive for as long as the VM runs (the builder stores both).
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(|e| VmError::MemorySlot(slot, e))?;
        }
        Ok(())
    }

    /// The KVM VM handle.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Injects interrupt `gsi` whenever `evt` is written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Irqfd(gsi, e))
    }

    /// Makes guest writes to MMIO `addr` signal `evt` inside KVM, without a vCPU exit to us.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), VmError> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(d) => self.fd.register_ioevent(evt, &a, d),
            None => self.fd.register_ioevent(evt, &a, NoDatamatch),
        }
        .map_err(|e| VmError::Ioeventfd(addr, e))
    }
}
