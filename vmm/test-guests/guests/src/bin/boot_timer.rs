//! Writes the boot timer first, prints one line, then resets through the i8042: the guest of
//! `cargo xtask bench vmm`.
//!
//! For the qemu baseline it also carries a PVH ELF note: qemu enters `pvh_start32` in 32-bit
//! protected mode, where the guest prints `T` (its "first instruction" marker for the
//! benchmark) and exits through qemu's isa-debug-exit port 0xf4.

#![no_std]
#![no_main]

use guest_rt::{exit, serial::Serial};

core::arch::global_asm!(
    ".pushsection .head, \"ax\"",
    ".code32",
    ".global pvh_start32",
    "pvh_start32:",
    "mov dx, 0x3f8",
    "mov al, 0x54",
    "out dx, al",
    "mov al, 0x0a",
    "out dx, al",
    "mov dx, 0xf4",
    "xor eax, eax",
    "out dx, al",
    "2:",
    "hlt",
    "jmp 2b",
    ".code64",
    ".popsection",
    // XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit PVH entry point.
    ".pushsection .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4",
    ".long 4",
    ".long 18",
    ".asciz \"Xen\"",
    ".balign 4",
    ".long pvh_start32",
    ".popsection",
);

/// Entry point: the VMM jumps here in 64-bit mode with boot_params in RSI.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start() -> ! {
    exit::boot_timer();
    Serial::com1().write_bytes(b"boot_timer guest: up\n");
    exit::reset()
}
