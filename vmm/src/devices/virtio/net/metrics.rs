//! virtio-net counters.

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// Network device counters.
#[derive(Debug, Default, Serialize)]
pub struct NetMetrics {
    /// Frames from the guest written to the TAP.
    pub tx_frames: AtomicU64,
    /// Their bytes.
    pub tx_bytes: AtomicU64,
    /// Frames from the TAP delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Their bytes.
    pub rx_bytes: AtomicU64,
    /// Frames dropped (malformed chains, TAP full, guest buffers too small).
    pub dropped: AtomicU64,
}
