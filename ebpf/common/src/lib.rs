//! Types shared by Hearth's eBPF programs (`hearth-ebpf`) and the agent's loader.
//!
//! Everything here is `#[repr(C)]` plain data with a layout both sides agree on; the `user`
//! feature adds `aya::Pod` impls for the agent.
//!
//! # Layout
//!
//! - [`Verdict`]: why a packet passed or was dropped, the index into the counter map.
//! - [`Counter`]: one per-CPU counter slot.
//! - map and program names, so the loader and the programs cannot disagree on them.

#![no_std]
#![deny(missing_docs)]

/// Name of the classifier on the instance interface's tc ingress hook (packets the instance sends).
pub const PROG_EGRESS: &str = "hearth_egress";
/// Name of the classifier on the instance interface's tc egress hook (packets going to the instance).
pub const PROG_INGRESS: &str = "hearth_ingress";
/// Name of the per-CPU counter array, indexed by [`Verdict`].
pub const MAP_COUNTERS: &str = "COUNTERS";

/// What a program decided about a packet, and why. Used as the counter index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Sent by the instance and allowed.
    EgressAllowed = 0,
    /// Going to the instance and allowed.
    IngressAllowed = 1,
}

impl Verdict {
    /// Number of verdicts, the size of the counter map.
    pub const COUNT: u32 = 2;

    /// Every verdict, in index order.
    pub const ALL: [Verdict; Self::COUNT as usize] =
        [Verdict::EgressAllowed, Verdict::IngressAllowed];

    /// A stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::EgressAllowed => "egress_allowed",
            Verdict::IngressAllowed => "ingress_allowed",
        }
    }
}

/// Packets and bytes seen for one [`Verdict`] on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (whole frames, link-layer header included).
    pub bytes: u64,
}

// SAFETY: `Counter` is `#[repr(C)]`, made only of `u64`s (no padding), and valid for any bit
// pattern, which is what `aya::Pod` requires.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}
