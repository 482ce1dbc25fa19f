//! The virtio-vsock device model: RX, TX and event queues, the guest CID in the config space,
//! packets handed to the [`Muxer`].

use std::{io::Write as _, os::unix::net::UnixListener, path::PathBuf, sync::Arc};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    metrics::VsockMetrics,
    muxer::{Muxer, Watch},
    packet::{self, HDR_LEN},
};
use crate::{
    devices::virtio::{
        ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, ids,
        read_config_bytes,
    },
    metrics::inc,
};

/// Queue size.
pub const QUEUE_SIZE: u16 = 256;

/// Why the vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// An eventfd.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The host-side socket.
    #[error("Cannot open the vsock socket")]
    Listen(#[source] crate::control::ControlError),
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    /// RX, TX and event queue notify ioeventfds.
    pub queue_evts: [EventFd; 3],
    /// Written when the driver activates the device.
    pub activate_evt: EventFd,
    active: Option<Active>,
    pub(super) muxer: Muxer,
    metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A device for guest `cid` with its host side at `uds_path`.
    pub fn new(
        cid: u32,
        uds_path: PathBuf,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Self {
            cid: u64::from(cid),
            queue_evts: [evt()?, evt()?, evt()?],
            activate_evt: evt()?,
            active: None,
            muxer: Muxer::new(u64::from(cid), uds_path, metrics.clone()),
            metrics,
        })
    }

    /// Clones of the queue events, for KVM's ioeventfds.
    pub fn queue_evts(&self) -> Result<Vec<EventFd>, VsockError> {
        self.queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(VsockError::EventFd))
            .collect()
    }

    /// Hands over the bound host-side listener.
    pub fn set_listener(&mut self, l: UnixListener) {
        self.muxer.set_listener(l);
    }

    /// Handles every packet the guest sent; returns new host streams to watch.
    pub fn process_tx(&mut self) -> Vec<Watch> {
        let mut watches = Vec::new();
        let Some(a) = self.active.as_mut() else {
            return watches;
        };
        let mut used = false;
        while let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            match packet::read_tx(chain, &a.mem) {
                Ok(pkt) => watches.extend(self.muxer.handle_tx(pkt)),
                Err(e) => {
                    tracing::debug!("bad vsock packet: {e}");
                    inc(&self.metrics.bad_packets);
                }
            }
            let _ = a.tx.add_used(&a.mem, head, 0);
            used = true;
        }
        if used {
            a.interrupt.signal_used_queue();
        }
        watches
    }

    /// Fills guest RX buffers with control packets and data while both are available.
    pub fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut w = match chain.writer(&a.mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    inc(&self.metrics.bad_packets);
                    let _ = a.rx.add_used(&a.mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let cap = w.available_bytes() - HDR_LEN;
            let Some((hdr, data)) = self.muxer.next_rx(cap) else {
                // Nothing after all: give the buffer back.
                a.rx.go_to_previous_position();
                break;
            };
            let ok = w.write_all(&hdr.to_bytes()).is_ok() && w.write_all(&data).is_ok();
            let len = if ok { (HDR_LEN + data.len()) as u32 } else { 0 };
            let _ = a.rx.add_used(&a.mem, head, len);
            used = true;
        }
        if used {
            a.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        ids::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data)
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let got = a.queues.len();
        let mut q = a.queues.into_iter();
        let (Some(rx), Some(tx), Some(_event), None) = (q.next(), q.next(), q.next(), q.next())
        else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
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
        true
    }
}
