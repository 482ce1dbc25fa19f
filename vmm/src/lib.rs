//! hearth-vmm: one process per microVM, built on the rust-vmm crates.
//!
//! # Layout
//!
//! - [`vstate`]: KVM state (the `/dev/kvm` handle, VM, vCPUs, guest memory).

#![deny(missing_docs)]

pub mod vstate;
