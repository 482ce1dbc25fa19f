//! hearth-agent: the node daemon that runs container instances in microVMs (or the sandbox
//! runtime) for an upstream scheduler.
//!
//! # Layout
//!
//! - [`ebpf`]: the embedded eBPF object and its loader.

#![deny(missing_docs)]

pub mod ebpf;
