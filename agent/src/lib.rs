//! hearth-agent: the node daemon that runs container instances in microVMs (or the sandbox
//! runtime) for an upstream scheduler.
//!
//! # Layout
//!
//! - [`config`]: the TOML config and its defaults (one place).
//! - [`model`]: instance ids, specs, states; the generated `hearth.v1` types ([`model::pb`]).
//! - [`store`]: the durable store (redb) of instances and events.
//! - [`events`]: the event log: commit + broadcast, resumable watches.
//! - [`logs`]: per-instance rotated log files and log streams.
//! - [`instance`]: the lifecycle: create/start/stop/destroy, the per-boot supervisor, timers.
//! - [`runtime`]: the runtimes behind one trait: `sandbox` and `microvm`; cgroups; processes.
//! - [`images`]: the image cache as the agent sees it (over `hearth-images`).
//! - [`api`]: the gRPC API (tonic), its listeners, and the error → status mapping.
//! - [`metrics`]: the Prometheus text endpoint.
//! - [`daemon`]: assembles the agent from a config and runs it until shutdown.
//! - [`ctl`]: hearthctl's client and output formatting.
//! - [`clock`]: the wall clock the lifecycle uses (follows tokio time).
//! - [`ebpf`]: the embedded eBPF object and its loader.
//! - [`net`]: node networking (bridge, addresses, veth/TAP, NAT).
//! - [`ingress`]: the HTTP ingress proxy.
//! - [`doctor`]: `hearth-agent doctor`, the preflight check of a host.
//! - [`pool`]: warm pools: instances booted ahead of demand, claimed by starts.

#![deny(missing_docs)]

pub mod api;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod doctor;
pub mod ebpf;
pub mod events;
pub mod images;
pub mod ingress;
pub mod instance;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pool;
pub mod runtime;
pub mod store;
