//! Writes the boot timer first, prints one line, then resets through the i8042: the guest of
//! `cargo xtask bench vmm`.

#![no_std]
#![no_main]

use guest_rt::{exit, serial::Serial};

/// Entry point: the VMM jumps here in 64-bit mode with boot_params in RSI.
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    exit::boot_timer();
    Serial::com1().write_bytes(b"boot_timer guest: up\n");
    exit::reset()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    guest_rt::panic(info)
}
