//! Port and MMIO access.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O in a test guest has no memory-safety effect on the guest; the VMM
    // handles the exit.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes a byte to a guest-physical MMIO address.
///
/// # Safety
///
/// `addr` must be mapped by the guest's page tables and must not alias memory Rust code owns.
pub unsafe fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: the caller guarantees `addr` is a mapped device address.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// Reads 32 bits from a guest-physical MMIO address.
///
/// # Safety
///
/// As for [`mmio_write8`].
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees `addr` is a mapped device address.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
