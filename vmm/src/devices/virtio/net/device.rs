//! The virtio-net device model: an RX and a TX queue bridged to a TAP, MAC in the config space.
//! Frames cross without offloads: the 12-byte virtio-net header is stripped on TX and a zero
//! header is prepended on RX.

use std::{io::Write as _, sync::Arc};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{metrics::NetMetrics, tap::Tap};
use crate::{
    config::NetConfig,
    devices::virtio::{
        ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, ids,
        read_config_bytes,
    },
    metrics::{add, inc},
};

/// Feature: the device has a MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame (a 64 KiB packet plus the Ethernet header and a VLAN tag).
pub const MAX_FRAME: usize = 65_562;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Why the network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP.
    #[error(transparent)]
    Tap(#[from] super::tap::TapError),
    /// The MAC.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// An eventfd.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// The network device.
pub struct Net {
    pub(super) tap: Tap,
    mac: Option<[u8; 6]>,
    /// RX and TX notify ioeventfds.
    pub queue_evts: [EventFd; 2],
    /// Written when the driver activates the device.
    pub activate_evt: EventFd,
    active: Option<Active>,
    /// A frame read from the TAP that waits for a guest buffer.
    pending: Option<Vec<u8>>,
    /// The TAP may have frames (edge-triggered readiness seen, EAGAIN not yet).
    pub(super) tap_readable: bool,
    buf: Vec<u8>,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// Opens the TAP and sets up the device.
    pub fn new(cfg: &NetConfig, metrics: Arc<NetMetrics>) -> Result<Self, NetError> {
        let mac = cfg
            .mac
            .as_deref()
            .map(crate::config::parse_mac)
            .transpose()?;
        let tap = Tap::open(&cfg.tap)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            tap,
            mac,
            queue_evts: [evt()?, evt()?],
            activate_evt: evt()?,
            active: None,
            pending: None,
            tap_readable: false,
            buf: vec![0u8; MAX_FRAME],
            metrics,
        })
    }

    /// Clones of the queue events, for KVM's ioeventfds.
    pub fn queue_evts(&self) -> Result<Vec<EventFd>, NetError> {
        self.queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(NetError::EventFd))
            .collect()
    }

    /// Sends every frame the guest queued.
    pub fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let frame = match chain.reader(&a.mem) {
                Ok(mut r)
                    if r.available_bytes() > NET_HDR_LEN
                        && r.available_bytes() <= NET_HDR_LEN + MAX_FRAME =>
                {
                    let mut buf = vec![0u8; r.available_bytes()];
                    std::io::Read::read_exact(&mut r, &mut buf)
                        .ok()
                        .map(|()| buf)
                }
                _ => None,
            };
            match frame {
                Some(f) => match self.tap.write_frame(&f[NET_HDR_LEN..]) {
                    Ok(_) => {
                        inc(&self.metrics.tx_frames);
                        add(&self.metrics.tx_bytes, (f.len() - NET_HDR_LEN) as u64);
                    }
                    Err(_) => inc(&self.metrics.dropped),
                },
                None => inc(&self.metrics.dropped),
            }
            let _ = a.tx.add_used(&a.mem, head, 0);
            used = true;
        }
        if used {
            a.interrupt.signal_used_queue();
        }
    }

    /// Moves frames from the TAP into guest RX buffers while both are available.
    pub fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        loop {
            if self.pending.is_none() {
                if !self.tap_readable {
                    break;
                }
                match self.tap.read_frame(&mut self.buf) {
                    Ok(n) => self.pending = Some(self.buf[..n].to_vec()),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.tap_readable = false;
                        break;
                    }
                }
            }
            let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let frame = self.pending.take().unwrap_or_default();
            let head = chain.head_index();
            let mut written = 0u32;
            match chain.writer(&a.mem) {
                Ok(mut w) if w.available_bytes() >= NET_HDR_LEN + frame.len() => {
                    let mut hdr = [0u8; NET_HDR_LEN];
                    // num_buffers = 1.
                    hdr[10] = 1;
                    if w.write_all(&hdr).is_ok() && w.write_all(&frame).is_ok() {
                        written = (NET_HDR_LEN + frame.len()) as u32;
                        inc(&self.metrics.rx_frames);
                        add(&self.metrics.rx_bytes, frame.len() as u64);
                    } else {
                        inc(&self.metrics.dropped);
                    }
                }
                _ => inc(&self.metrics.dropped),
            }
            let _ = a.rx.add_used(&a.mem, head, written);
            used = true;
        }
        if used {
            a.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        ids::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | if self.mac.is_some() {
                VIRTIO_NET_F_MAC
            } else {
                0
            }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac.unwrap_or_default(), offset, data)
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let got = a.queues.len();
        if got != 2 {
            return Err(ActivateError::QueueCount { expected: 2, got });
        }
        let mut q = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (q.next(), q.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let _ = (RX, TX);
        self.active = Some(Active {
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
        });
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.pending = None;
        true
    }
}
