//! hearth-init: the PID 1 of every Hearth instance, in a microVM or in the sandbox runtime.
//!
//! It reads its bootstrap options, reaches the agent (AF_VSOCK or a Unix socket) and gets the
//! instance spec, assembles the root filesystem (image as overlay lower, fresh writable upper),
//! configures the network over netlink, runs the workload as its user with its limits, reports
//! `Started`/`Ready`, streams its output and metrics, obeys signals, stops and exec requests,
//! reaps every zombie, and reports how the workload ended before it reboots the VM or exits.
//! `docs/hearth-init.md` describes the options, the standalone spec and the console lines.
//!
//! # Layout
//!
//! - [`bootstrap`]: the `hearth.*` options (kernel command line, or argv in the sandbox).
//! - [`spec`]: the instance spec's defaults, validation, and standalone JSON form.
//! - [`supervisor`]: the life of an instance, from connection to exit report.
//! - [`instance`]: preparing the instance from the spec.
//! - [`rootfs`]: the overlay root, pseudo filesystems, the switch into the root.
//! - [`net`]: loopback, addresses, MTU and routes over rtnetlink.
//! - [`cgroup`]: where usage is read and OOM kills are counted.
//! - [`workload`]: spawning the workload and exec'd commands; user, rlimits, output pumps.
//! - [`reaper`]: reaping every child, handing statuses to waiters.
//! - [`readiness`]: waiting for the readiness ports.
//! - [`metrics`]: the periodic `Metrics` sample.
//! - [`logs`]: line splitting and the bounded, acknowledged log buffer.
//! - [`outbox`]: what is queued for the agent.
//! - [`link`]: the connection to the agent, reconnects, the standalone console sink.
//! - [`console`], [`diag`]: console lines and init's own diagnostics.
//! - [`sys`]: the few `unsafe` system interfaces (loop devices, `/dev/mem`, pre-exec setup).
//! - `tests/`: the real static binary as PID 1 under `unshare` with a test agent; `fuzz/`:
//!   a cargo-fuzz target for what init parses from the image (`/etc/passwd`, `/etc/group`).

#![deny(missing_docs)]

pub mod bootstrap;
pub mod cgroup;
pub mod console;
pub mod diag;
pub mod instance;
pub mod link;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod outbox;
pub mod readiness;
pub mod reaper;
pub mod rootfs;
pub mod spec;
pub mod supervisor;
pub mod sys;
pub mod workload;
