//! virtio-vsock counters.

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// vsock counters.
#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    /// Connections the host opened to the guest (`CONNECT`).
    pub host_connects: AtomicU64,
    /// Connections the guest opened to the host.
    pub guest_connects: AtomicU64,
    /// Guest connections refused (no listener at `<path>_P`).
    pub guest_connects_refused: AtomicU64,
    /// Payload bytes guest → host.
    pub tx_bytes: AtomicU64,
    /// Payload bytes host → guest.
    pub rx_bytes: AtomicU64,
    /// Resets sent to the guest.
    pub rst_sent: AtomicU64,
    /// Malformed or misaddressed packets from the guest.
    pub bad_packets: AtomicU64,
}
