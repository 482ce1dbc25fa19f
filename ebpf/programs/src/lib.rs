//! Hearth's eBPF programs. The programs themselves are in the `hearth-ebpf` binary target
//! (`src/main.rs`), which aya-build compiles for `bpfel-unknown-none` from the agent's build.rs.
//!
//! # Layout
//!
//! - `src/main.rs`: the two tc classifiers (`hearth_egress`, `hearth_ingress`), their maps and
//!   the per-CPU counting.
//! - `src/parse.rs`: Ethernet, ARP, IPv4/IPv6 and transport header parsing (fail closed:
//!   truncated headers, fragments, IP options and extension headers are refused).
//! - `src/policy.rs`: the live config (double-buffered), the egress policy decision (deny,
//!   resolver, gateway, allow, internet) and the flow table, shared by both programs.
//! - `src/egress.rs`: what the instance sends: anti-spoofing, ARP/NDP for its own addresses,
//!   answers to the ingress proxy, then the egress policy.
//! - `src/ingress.rs`: what reaches the instance: HTTP from the proxy, replies and ICMP errors
//!   for flows it opened, ARP/NDP; nothing else.
//! - this library target exists so that workspace tools (`cargo clippy --workspace`) have
//!   something to check on the host.

#![no_std]
#![deny(missing_docs)]
