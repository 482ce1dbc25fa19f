//! hearth-vmm's test guests; each binary in `src/bin` is one guest. All are linked by
//! `guest.ld` with `_start` at 0x100200 (so they also work packaged as a bzImage) and report
//! on COM1, then reset through the i8042.
//!
//! # Layout
//!
//! - `boot_timer`: writes the boot timer at its first instruction, then resets; carries a PVH
//!   note and a 32-bit entry for the qemu baseline of `cargo xtask bench vmm`.
//! - `boot_check`: checks the boot state (zero page, e820, command line, CPUID, MP table, MSRs,
//!   paging, GDT).
//! - `virtio_blk`: reads, writes, flushes and identifies disks through virtio-drivers.
//! - `virtio_net`: sends a frame to the TAP and waits for one back.
//! - `virtio_vsock`: connects to the host, and accepts a connection from it.
//! - `init_hello`: sends hearth-init's Hello frame on vsock port 1024, then never stops.
//! - `ctrl_alt_del`: waits for Ctrl-Alt-Del on the i8042 keyboard, then resets.

#![no_std]
#![deny(missing_docs)]
