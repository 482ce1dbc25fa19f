//! Wire protocols shared by Hearth's parts.
//!
//! The agent and hearth-init speak one versioned protocol: prost messages from
//! `hearth/init/v1/init.proto`, each carried in one length-prefixed frame ([`frame`]). Both sides
//! use this crate, so the encoding can only change in one place.
//!
//! # Layout
//!
//! - `hearth/init/v1/init.proto`: the agent <-> init messages ([`init`]).
//! - [`frame`]: the length-prefixed framing, as plain functions (for fuzzing and blocking
//!   callers) and as a `tokio_util` codec.
//! - [`channel`]: async channels over one connection, for both ends: the `Hello`/`Welcome`
//!   handshake with the version check, typed send/receive, split halves for separate tasks.
//! - `fuzz/`: cargo-fuzz targets for the frame decoder.

#![deny(missing_docs)]

pub mod channel;
pub mod frame;

/// The agent <-> hearth-init control protocol (package `hearth.init.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod init {
    include!(concat!(env!("OUT_DIR"), "/hearth.init.v1.rs"));
}

/// The scheduler API of hearth-agent (package `hearth.v1`), with tonic client and server code.
#[cfg(feature = "grpc")]
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("hearth.v1");
}

/// The protocol version this build speaks, sent in `Hello` and `Welcome`.
///
/// Bump it when a change needs both sides to understand it; adding an optional field does not.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest protocol version this build still accepts from a peer.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The vsock port hearth-init dials on the host (CID 2) in a microVM.
pub const INIT_VSOCK_PORT: u32 = 1024;
