//! virtio-blk counters.

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// Per-disk counters.
#[derive(Debug, Default, Serialize)]
pub struct BlockMetrics {
    /// Read requests completed.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Write requests completed.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flushes completed.
    pub flush_ops: AtomicU64,
    /// Requests answered with an error status (malformed, out of range, I/O error).
    pub errors: AtomicU64,
    /// Requests answered "unsupported".
    pub unsupported: AtomicU64,
}
