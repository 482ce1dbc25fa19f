//! The virtio-mmio transport (version 2 register layout): feature negotiation, queue setup,
//! status, interrupt acknowledgement, configuration space. Queue notifications never reach
//! this code: each queue's notify write is an ioeventfd handled by the device's event handler.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU32, Ordering},
};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;

/// "virt".
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The register layout version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("HRTH").
pub const VENDOR_ID: u32 = 0x4854_5248;
/// Offset of the queue-notify register (the ioeventfd address).
pub const QUEUE_NOTIFY: u64 = 0x50;
/// Start of the configuration space.
pub const CONFIG_SPACE: u64 = 0x100;

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// The device needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// The transport of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt_status: Arc<AtomicU32>,
    irq: Arc<EventFd>,
    queues: Vec<Queue>,
    queue_select: u32,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The queues' notify events, written here for notifications that reach the transport
    /// (before KVM's ioeventfds are registered, and for any the ioeventfds do not match).
    queue_evts: Vec<EventFd>,
}

impl MmioTransport {
    /// A transport for `device`, raising `irq` (an irqfd); `queue_evts` are the device's
    /// queue-notify events, in queue order.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irq: Arc<EventFd>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let sizes: Vec<u16> = lock(&device).queue_max_sizes().to_vec();
        let queues = sizes
            .iter()
            // A max size that is not a power of two is a bug in the device, caught by tests.
            .map(|s| Queue::new(*s).expect("queue max size is a power of two"))
            .collect();
        Self {
            device,
            mem,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            irq,
            queues,
            queue_select: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            queue_evts,
        }
    }

    /// The device's status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn with_queue<T: Default>(&self, f: impl FnOnce(&Queue) -> T) -> T {
        self.queues
            .get(self.queue_select as usize)
            .map(f)
            .unwrap_or_default()
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue registers are frozen once the driver is running.
        if self.status & status::DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self.queue() {
            f(q);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits only accumulate until a reset.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let avail = lock(&self.device).avail_features();
            if self.acked_features & !avail != 0 {
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ready = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        if !ready || self.status & status::FEATURES_OK == 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues: self
                .queues
                .iter()
                .filter_map(|q| Queue::try_from(q.state()).ok())
                .collect(),
            interrupt: Interrupt::new(self.interrupt_status.clone(), self.irq.clone()),
            acked_features: self.acked_features,
        };
        match lock(&self.device).activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                if crate::metrics::log_allowed(&LAST) {
                    tracing::warn!("virtio device activation failed: {e:#}");
                }
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated && !lock(&self.device).reset() {
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn read32(&self, offset: u64) -> u32 {
        match offset {
            0x00 => MMIO_MAGIC,
            0x04 => MMIO_VERSION,
            0x08 => lock(&self.device).device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = lock(&self.device).avail_features();
                match self.features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.with_queue(|q| u32::from(q.max_size())),
            0x44 => self.with_queue(|q| u32::from(q.ready())),
            0x60 => self.interrupt_status.load(Ordering::SeqCst),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write32(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.features_select = v,
            // Features are frozen once FEATURES_OK is set.
            0x20 if self.status & status::FEATURES_OK == 0 => match self.acked_features_select {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.acked_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => self.update_queue(|q| q.set_size(v as u16)),
            0x44 => self.update_queue(|q| q.set_ready(v == 1)),
            0x50 => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    // Only fails if the counter would overflow; the device drains it.
                    let _ = evt.write(1);
                }
            }
            0x64 => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.set_status(v),
            0x80 => self.update_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.update_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.update_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.update_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.update_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.update_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read32(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data)
            && offset.is_multiple_of(4)
        {
            self.write32(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, VIRTIO_F_VERSION_1, read_config_bytes};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        activated: Option<usize>,
        resets: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data)
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.activated = Some(a.queues.len());
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            true
        }
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let t = MmioTransport::new(
            dev.clone(),
            mem,
            Arc::new(EventFd::new(0).unwrap()),
            vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ],
        );
        (t, dev)
    }

    fn drive_to_ok(t: &mut MmioTransport) {
        w(t, 0x70, status::ACKNOWLEDGE);
        w(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1);
        w(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for q in 0..2u32 {
            w(t, 0x30, q);
            w(t, 0x38, 16);
            let base = 0x1000 * (q + 1);
            w(t, 0x80, base);
            w(t, 0x90, base + 0x100);
            w(t, 0xa0, base + 0x200);
            w(t, 0x44, 1);
        }
        w(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn identifies_and_negotiates() {
        let (mut t, dev) = setup();
        assert_eq!(r(&mut t, 0), MMIO_MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 2);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1);
        assert_eq!(r(&mut t, 0x34), 16);
        drive_to_ok(&mut t);
        assert_eq!(dev.lock().unwrap().activated, Some(2));
        assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_SPACE + 2, &mut cfg);
        assert_eq!(cfg, [3, 4]);
        w(&mut t, 0x70, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn refuses_unoffered_features_and_unready_queues() {
        let (mut t, dev) = setup();
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0x8000_0000);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
        // A fresh device whose queues were never made ready.
        let (mut t, _) = setup();
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(dev.lock().unwrap().activated, None);
    }

    #[test]
    fn notifications_reach_the_queue_events() {
        let (mut t, _) = setup();
        w(&mut t, QUEUE_NOTIFY, 1);
        w(&mut t, QUEUE_NOTIFY, 7);
        assert_eq!(t.queue_evts[1].read().unwrap(), 1);
        assert!(t.queue_evts[0].read().is_err(), "queue 0 was not notified");
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut t, _) = setup();
        let mut b = [0u8; 2];
        t.read(0x02, &mut b);
        t.write(0x03, &[1, 2]);
        w(&mut t, 0x30, 99);
        assert_eq!(r(&mut t, 0x34), 0);
        w(&mut t, 0x38, 8);
        w(&mut t, 0x64, 1);
    }
}
