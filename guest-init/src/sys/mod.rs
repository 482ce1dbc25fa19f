//! The few places hearth-init needs `unsafe`: raw ioctls, `/dev/mem`, and the code that runs
//! in the child between `fork` and `exec`. Everything else goes through nix's safe wrappers.
//!
//! # Layout
//!
//! - [`loopdev`]: attach an image file read-only to a free loop device (sandbox root).
//! - [`devmem`]: write one byte at a physical address (the VMM's boot timer).
//! - [`child`]: what the workload's child process does before `exec` (session, cgroup, rlimits,
//!   OOM score, user and groups), async-signal-safe.

pub mod child;
pub mod devmem;
pub mod loopdev;
