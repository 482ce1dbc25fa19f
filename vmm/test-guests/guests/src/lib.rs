//! hearth-vmm's test guests; each binary in `src/bin` is one guest.
//!
//! # Layout
//!
//! - `src/bin/boot_timer.rs`: writes the boot timer at its first instruction, then resets.

#![no_std]
#![deny(missing_docs)]
