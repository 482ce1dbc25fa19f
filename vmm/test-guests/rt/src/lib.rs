//! Runtime for hearth-vmm's `no_std` test guests.
//!
//! Guests poll (no interrupts, no exceptions, no SSE): on PVM hosts every instruction is
//! emulated, so each guest stays under about a million instructions.
//!
//! # Layout
//!
//! - [`io`]: port and MMIO access (the only `unsafe` in the guests).
//! - [`serial`]: a polling 8250 writer on 0x3f8.
//! - [`exit`]: ending the guest: boot timer, i8042 reset, halt.

#![no_std]
#![deny(missing_docs)]

pub mod exit;
pub mod io;
pub mod serial;

/// Guest-physical address of the VMM's boot-timer page (Firecracker's convention).
pub const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
/// The value that marks "guest reached this point" on the boot timer.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Reports a panic on the serial port and resets the VM, so a failing guest ends its VMM.
pub fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write as _;
    let mut out = serial::Serial::com1();
    let _ = writeln!(out, "GUEST PANIC: {info}");
    exit::reset()
}
