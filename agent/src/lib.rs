//! hearth-agent: the node daemon that runs container instances in microVMs (or the sandbox
//! runtime) for an upstream scheduler.
//!
//! # Layout
//!
//! - [`ebpf`]: the embedded eBPF object and its loader.
//! - [`net`]: node networking (bridge, addresses, veth/TAP, NAT).
//! - [`ingress`]: the HTTP ingress proxy.

#![deny(missing_docs)]

pub mod ebpf;
pub mod ingress;
pub mod net;
