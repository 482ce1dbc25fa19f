//! Hearth's eBPF programs. The programs themselves are in the `hearth-ebpf` binary target
//! (`src/main.rs`), which aya-build compiles for `bpfel-unknown-none` from the agent's build.rs.
//!
//! # Layout
//!
//! - `src/main.rs`: the tc classifiers and their maps.
//! - this library target exists so that workspace tools (`cargo clippy --workspace`) have
//!   something to check on the host.

#![no_std]
#![deny(missing_docs)]
