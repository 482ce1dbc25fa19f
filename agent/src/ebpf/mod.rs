//! The eBPF programs (`ebpf/programs`), embedded in the agent binary at build time, and the
//! loader that enforces each instance's network policy on its host-side interface (the TAP of
//! a microVM, the host end of a sandbox's veth).
//!
//! # What is enforced
//!
//! Two tc classifiers per instance, attached with TCX: on the interface's **ingress** hook
//! (packets the instance sends) the egress policy, anti-spoofing and ARP/NDP checks; on its
//! **egress** hook (packets going to the instance) HTTP-only ingress from the proxy plus
//! replies to flows the instance opened. See [`Policy`] for the rules and
//! [`DropReason`] for every way a packet is dropped. Each instance has its own maps
//! (configuration, CIDR tries, flow table, per-CPU counters), so instances never share state.
//!
//! # Using it from the agent
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use hearth_agent::ebpf::{Direction, DropReason, Filter, LoadOptions, NodeAddr, PinRoot, Policy};
//!
//! # fn main() -> Result<(), hearth_agent::ebpf::FilterError> {
//! let root = PinRoot::new(PinRoot::DEFAULT)?;          // must be on bpffs
//!
//! // Create an instance: build its policy, load, attach to its host-side interface.
//! let mut policy = Policy::new([0x02, 0x48, 0x54, 0, 0, 2]);
//! policy.instance_ipv4 = Some(Ipv4Addr::new(10, 77, 0, 2));
//! policy.gateway = NodeAddr::v4(Ipv4Addr::new(10, 77, 0, 1));
//! policy.dns = NodeAddr::v4(Ipv4Addr::new(10, 77, 0, 1));
//! policy.ingress_proxy = NodeAddr::v4(Ipv4Addr::new(10, 77, 0, 1));
//! policy.http_ports = vec![8080];
//! policy.internet = true;
//! policy.deny.push("169.254.169.254/32".parse()?);
//! policy.allow.push("10.20.0.0/16 tcp 5432".parse()?);
//! let mut filter =
//!     Filter::load_and_attach(&root, "inst-42", "hth42", &policy, &LoadOptions::default())?;
//!
//! // Change the policy live (no detach, no gap).
//! policy.internet = false;
//! filter.update_policy(&policy)?;
//!
//! // Metrics: packets/bytes per direction and verdict, summed over CPUs.
//! let counters = filter.counters()?;
//! let denied = counters.dropped_for(Direction::Egress, DropReason::Denied);
//! for (direction, verdict, c) in counters.iter() { /* export c.packets, c.bytes */ }
//!
//! // After an agent restart: adopt what is pinned, remove what should no longer exist.
//! for instance in root.instances()? {
//!     match Filter::adopt(&root, &instance) {
//!         Ok(filter) => { /* keep it with the instance */ }
//!         Err(e) => { root.remove(&instance)?; }
//!     }
//! }
//!
//! // Destroy the instance: links detached, links and maps unpinned.
//! filter.remove()?;
//! # Ok(()) }
//! ```
//!
//! Rules of the road:
//! - Needs Linux 6.6 or later (TCX links), CAP_BPF + CAP_NET_ADMIN, and bpffs
//!   ([`PinRoot::mounting`] mounts it when the host has not).
//! - Attach in the network namespace of the interface (the calling thread's).
//! - `Filter` is `Send`; an update takes `&mut self`, so one owner at a time per instance.
//! - Attach before the instance starts sending: until then nothing filters its interface.
//!   The agent should create the interface, attach, then start the VM or sandbox.
//! - [`Filter::load`] costs about 0.2 s of CPU (object parsing, map creation, the verifier;
//!   measured in a release build). Call it on a blocking thread, and ahead of time where start
//!   latency matters: a filter can be loaded for a warm-pool member with a placeholder policy,
//!   then given the real one with [`Filter::update_policy`] and attached when assigned. Policy
//!   updates take well under a millisecond.
//! - Dropping a [`Filter`] does not detach: enforcement survives the agent process.
//! - Keep the interface's GSO/GRO limits at the default 64 KiB: BIG TCP packets (IPv4 total
//!   length 0, IPv6 jumbo headers) are dropped as malformed / IP options.
//! - Pinned state of another [`LAYOUT_VERSION`](hearth_ebpf_common::LAYOUT_VERSION) cannot
//!   be adopted (an agent upgrade that changes the map layouts has to remove and re-attach).
//!
//! # Layout
//!
//! - [`policy`]: [`Policy`], [`Rule`], [`Cidr`] — the agent's view, validated.
//! - [`compile`]: policy → map contents (pure, unit- and property-tested).
//! - [`filter`]: [`Filter`] and [`PinRoot`] — load, attach, adopt, update, count, remove.
//! - [`counters`]: [`Counters`], a summed snapshot.
//! - [`stash`]: filters loaded ahead of time, so a start does not wait for the verifier.
//! - `sys`: the raw `bpf(2)` calls aya 0.14 lacks (the module's only `unsafe`).

pub mod compile;
pub mod counters;
pub mod filter;
pub mod policy;
pub mod stash;
mod sys;

use aya::Ebpf;
pub use compile::{NON_INTERNET_V4, NON_INTERNET_V6};
pub use counters::Counters;
pub use filter::{Attachment, Filter, FilterError, LoadOptions, PinRoot};
pub use hearth_ebpf_common::{Counter, Direction, DropReason, PassReason, Verdict};
use hearth_ebpf_common::{PROG_EGRESS, PROG_INGRESS};
pub use policy::{
    Cidr, FlowTimeouts, NodeAddr, Policy, PolicyError, PortRange, Protocol, Rule, eui64_link_local,
};

/// The compiled eBPF object (an ELF for `bpfel-unknown-none`), built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hearth-ebpf"));

/// Why the eBPF object could not be loaded by [`load`].
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The embedded object could not be parsed or loaded into the kernel.
    #[error("Loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    /// The object lacks a program the agent needs.
    #[error("The eBPF object has no program named {0}")]
    MissingProgram(&'static str),
}

/// Parses the embedded object and creates its maps (needs CAP_BPF); a self-check for
/// `hearth-agent ebpf-check`. Instances use [`Filter`].
pub fn load() -> Result<Ebpf, EbpfError> {
    let ebpf = Ebpf::load(OBJECT)?;
    for name in [PROG_EGRESS, PROG_INGRESS] {
        if ebpf.program(name).is_none() {
            return Err(EbpfError::MissingProgram(name));
        }
    }
    Ok(ebpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_is_embedded_and_has_both_programs() {
        assert!(
            OBJECT.starts_with(b"\x7fELF"),
            "embedded object is not an ELF file"
        );
        for name in [PROG_EGRESS, PROG_INGRESS] {
            assert!(
                OBJECT.windows(name.len()).any(|w| w == name.as_bytes()),
                "object has no symbol {name}"
            );
        }
    }

    #[test]
    fn filter_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Filter>();
        send::<PinRoot>();
    }

    #[test]
    fn object_loads_into_the_kernel() {
        hearth_testkit::require!(hearth_testkit::skip::root());
        let ebpf = load().unwrap();
        assert!(ebpf.map(hearth_ebpf_common::MAP_COUNTERS).is_some());
    }

    #[test]
    fn programs_pass_the_verifier() {
        hearth_testkit::require!(hearth_testkit::skip::root());
        let mut policy = Policy::new([0x02, 0, 0, 0, 0, 1]);
        policy.instance_ipv4 = Some(std::net::Ipv4Addr::new(10, 0, 0, 2));
        let filter = Filter::load(&policy, &LoadOptions::default()).unwrap();
        assert_eq!(filter.policy_version(), 1);
        assert!(filter.counters().unwrap().nonzero().is_empty());
    }
}
