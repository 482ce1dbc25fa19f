//! hearth-vmm: one process per microVM, built on the rust-vmm crates.
//!
//! # Layout
//!
//! Laid out like Firecracker's `src/vmm`:
//!
//! - [`arch`]: x86-64 specifics: the memory layout ([`arch::x86_64::layout`], the one place
//!   every guest address and IRQ is defined), boot protocol, CPUID, MSRs, MP table, registers.
//! - [`vstate`]: KVM state: `/dev/kvm`, the VM, vCPUs, guest memory.
//! - [`devices`]: the port/MMIO buses, legacy devices (serial, i8042, boot timer) and the
//!   virtio-mmio transport and devices (block, net, vsock).
//! - [`builder`]: turns a [`config::VmConfig`] into a running VM.
//! - [`config`]: the config file and command-line flags.
//! - [`control`]: the control socket (`status`, `metrics`, `serial`, `shutdown`, `kill`).
//! - [`seccomp`]: the per-thread seccomp filters.
//! - [`exit`]: how a VM ends and the matching exit codes.
//! - [`metrics`]: process-wide counters.
//!
//! Threads: the main (VMM) thread builds the VM, then serves the control socket and signals
//! and waits for the end; one thread per vCPU runs `KVM_RUN` and handles port/MMIO exits; one
//! I/O thread runs the virtio devices' event loop (queue ioeventfds, TAP, vsock sockets,
//! io_uring completions). Interrupts go to KVM through irqfds.

#![deny(missing_docs)]

pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod exit;
pub mod metrics;
pub mod seccomp;
pub mod vstate;
