//! Runtime for hearth-vmm's `no_std` test guests.
//!
//! Guests poll (no interrupts, no exceptions, no SSE): on PVM hosts every instruction is
//! emulated, so each guest stays under about a million instructions.
//!
//! # Layout
//!
//! - [`io`]: port and MMIO access.
//! - [`serial`]: a polling 8250 writer on 0x3f8, and the `println!` macro.
//! - [`exit`]: ending the guest: boot timer, i8042 reset, halt.
//! - [`boot`]: the boot state the VMM handed over: zero page, command line, e820.
//! - [`cpu`]: CPUID, MSRs, control registers.
//! - [`virtio`]: a HAL for the `virtio-drivers` crate, device discovery from the command line.
//! - [`heap`]: a bump allocator (virtio-drivers' vsock driver needs `alloc`).
//! - [`report`]: check results in the lines the host-side tests look for.
//!
//! The crate also holds the guests' panic handler (report on COM1, then reset).

#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod boot;
pub mod cpu;
pub mod exit;
pub mod heap;
pub mod io;
pub mod report;
pub mod serial;
pub mod virtio;

pub use virtio_drivers;

/// Guest-physical address of the VMM's boot-timer page (Firecracker's convention).
pub const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
/// The value that marks "guest reached this point" on the boot timer.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Every guest's panic handler: reports the panic on the serial port and resets the VM, so a
/// failing guest ends its VMM.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write as _;
    let mut out = serial::Serial::com1();
    let _ = writeln!(out, "GUEST PANIC: {info}");
    exit::reset()
}
