//! Process-wide counters the control socket's `metrics` command reports. Device counters are
//! declared next to each device (`devices/*/metrics.rs`) and registered here by name.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use serde::Serialize;

/// vCPU exits by reason, summed over all vCPUs.
#[derive(Debug, Default, Serialize)]
pub struct VcpuExits {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// HLT exits.
    pub hlt: AtomicU64,
    /// Triple faults.
    pub shutdown: AtomicU64,
    /// System events (reset, shutdown).
    pub system_event: AtomicU64,
    /// Interrupted runs (signals).
    pub intr: AtomicU64,
    /// KVM internal errors and failed entries.
    pub error: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
    /// Accesses to ports or addresses no device claims.
    pub unhandled: AtomicU64,
}

/// A device's counters, serialised under its name.
pub trait DeviceMetrics: Send + Sync {
    /// The counters as JSON.
    fn to_json(&self) -> serde_json::Value;
}

impl<T: Serialize + Send + Sync> DeviceMetrics for T {
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// All counters of the process.
#[derive(Default)]
pub struct Metrics {
    /// vCPU exits.
    pub vcpu_exits: VcpuExits,
    /// Microseconds from process start to the guest's first boot-timer write (0 = not yet).
    pub boot_time_us: AtomicU64,
    devices: Mutex<Vec<(String, Arc<dyn DeviceMetrics>)>>,
}

impl Metrics {
    /// Registers a device's counters under `name`.
    pub fn register(&self, name: impl Into<String>, m: Arc<dyn DeviceMetrics>) {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.into(), m));
    }

    /// Everything as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let mut devices = serde_json::Map::new();
        for (name, m) in self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            devices.insert(name.clone(), m.to_json());
        }
        serde_json::json!({
            "vcpu_exits": serde_json::to_value(&self.vcpu_exits).unwrap_or_default(),
            "boot_time_us": self.boot_time_us.load(Ordering::Relaxed),
            "devices": devices,
        })
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// When the process started, for the boot timer.
pub fn process_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

/// Rate limit for log lines a guest can trigger: true at most once per second per `slot`
/// (`slot` holds the last time, in ms since process start, that was allowed).
pub fn log_allowed(slot: &AtomicU64) -> bool {
    let now = process_start().elapsed().as_millis() as u64 + 1000;
    let last = slot.load(Ordering::Relaxed);
    now >= last + 1000
        && slot
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_triggered_logs_are_rate_limited() {
        let slot = AtomicU64::new(0);
        assert!(log_allowed(&slot));
        assert!(!log_allowed(&slot));
        assert!(!log_allowed(&slot));
    }
}
