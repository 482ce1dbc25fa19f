//! Ways a guest reports progress and ends.

use crate::io::{mmio_write8, outb};

/// Writes the boot-timer magic, so the VMM logs the time since its own start.
pub fn boot_timer() {
    // SAFETY: the VMM's initial page tables map the boot-timer page, which is device memory no
    // Rust object lives in.
    unsafe { mmio_write8(crate::BOOT_TIMER_ADDR, crate::BOOT_TIMER_MAGIC) }
}

/// Asks the i8042 controller to pulse the CPU reset line (command 0xfe on port 0x64): the way a
/// guest without ACPI ends its VM. Halts if the VMM ignores it.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    halt()
}

/// Halts forever.
pub fn halt() -> ! {
    loop {
        // SAFETY: `hlt` only stops the vCPU until the next interrupt.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
    }
}
