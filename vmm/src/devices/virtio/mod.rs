//! virtio-mmio devices: the transport ([`mmio`]) and one folder per device, each with the same
//! files: `mod.rs` (constants, re-exports), `device.rs` (the device model), `event_handler.rs`
//! (its I/O-thread event handling), `metrics.rs` (its counters).

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::{epoll::EventSet, eventfd::EventFd};

/// `VIRTIO_F_VERSION_1`: the modern interface, which the MMIO transport v2 requires.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// Device type ids.
pub mod ids {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// The device's interrupt line: the MMIO interrupt-status register plus an irqfd.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl Interrupt {
    /// An interrupt writing `evt` (an irqfd) and recording its cause in `status`.
    pub fn new(status: Arc<AtomicU32>, evt: Arc<EventFd>) -> Self {
        Self { status, evt }
    }

    /// Tells the guest a used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        // Only fails when the counter would overflow, and KVM drains it.
        let _ = self.evt.write(1);
    }

    /// The pending interrupt causes.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up the wrong number of queues.
    #[error("Device expects {expected} queues, driver set up {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the driver configured.
        got: usize,
    },
    /// The activation event could not be written.
    #[error("Cannot signal device activation")]
    Event(#[source] std::io::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, configured and ready.
    pub queues: Vec<Queue>,
    /// The interrupt line.
    pub interrupt: Interrupt,
    /// Features the driver acknowledged.
    pub acked_features: u64,
}

impl Activation {
    /// The queues as exactly `N` (the device's queue count), or the error saying how many the
    /// driver set up.
    pub fn queues<const N: usize>(queues: Vec<Queue>) -> Result<[Queue; N], ActivateError> {
        let got = queues.len();
        queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: N, got })
    }
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (its length is the queue count).
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn avail_features(&self) -> u64;
    /// Reads from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space (ignored by default: our config is read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving the queues. Returns false when the device
    /// cannot be reset (it then stays active and the transport reports a failure).
    fn reset(&mut self) -> bool;
}

/// Copies `data.len()` bytes of `config` starting at `offset`; reads past the end give zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Clones of a device's queue notify events, for KVM's ioeventfds.
pub fn clone_events(evts: &[EventFd]) -> std::io::Result<Vec<EventFd>> {
    evts.iter().map(EventFd::try_clone).collect()
}

/// Watches a device's activation event on the I/O thread (`what` names the device in the log).
pub fn watch_activation(ops: &mut EventOps, evt: &EventFd, token: u32, what: &str) {
    if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
        tracing::error!("Cannot watch the {what} activation event: {e:?}");
    }
}

/// Watches a device's queue notify events on the I/O thread: queue `i` gets token `first + i`.
pub fn watch_queues(ops: &mut EventOps, evts: &[EventFd], first: u32) {
    for (token, evt) in (first..).zip(evts) {
        // A driver that activates again after a reset finds them watched already (EEXIST).
        let _ = ops.add(Events::with_data(evt, token, EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT as _;

    use super::*;

    #[test]
    fn activation_takes_exactly_the_device_queue_count() {
        let make = |n| (0..n).map(|_| Queue::new(16).unwrap()).collect::<Vec<_>>();
        assert!(Activation::queues::<2>(make(2)).is_ok());
        for got in [0, 1, 3] {
            match Activation::queues::<2>(make(got)) {
                Err(ActivateError::QueueCount {
                    expected: 2,
                    got: g,
                }) => assert_eq!(g, got),
                other => panic!("{got} queues: {:?}", other.map(|_| ())),
            }
        }
    }
}
