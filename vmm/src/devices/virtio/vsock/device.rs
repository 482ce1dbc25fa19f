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
        ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, clone_events, ids,
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
        clone_events(&self.queue_evts).map_err(VsockError::EventFd)
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
        let [rx, tx, _event] = Activation::queues(a.queues)?;
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

#[cfg(test)]
mod tests {
    use std::{
        os::unix::net::UnixListener,
        sync::atomic::{AtomicU32, Ordering},
    };

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::{
        desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::vsock::packet::{HOST_CID, Header, TYPE_STREAM, op};

    const W: u16 = VRING_DESC_F_WRITE as u16;

    #[test]
    fn request_to_a_host_listener_is_answered_through_the_rx_queue() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let _host = UnixListener::bind(format!("{}_1024", uds.display())).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let evq = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 16);

        // TX: a good REQUEST, then a chain pointing outside guest memory.
        let req = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 777,
            dst_port: 1024,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            buf_alloc: 4096,
            ..Default::default()
        };
        mem.write_slice(&req.to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        let tx = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x7fff_0000, 44, 0, 0)),
        ];
        txq.add_desc_chains(&tx, 0).unwrap();
        // RX: one buffer for the answer.
        let rx = [RawDescriptor::from(SplitDescriptor::new(
            0x20_0000, 4096, W, 0,
        ))];
        rxq.add_desc_chains(&rx, 0).unwrap();

        let metrics = Arc::new(VsockMetrics::default());
        let mut dev = Vsock::new(3, uds.clone(), metrics.clone()).unwrap();
        let status = Arc::new(AtomicU32::new(0));
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![
                rxq.create_queue().unwrap(),
                txq.create_queue().unwrap(),
                evq.create_queue().unwrap(),
            ],
            interrupt: Interrupt::new(status.clone(), Arc::new(EventFd::new(0).unwrap())),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        let watches = dev.process_tx();
        assert_eq!(watches.len(), 1, "one host stream to watch");
        assert_eq!(txq.used().idx().load(), 2, "both TX chains are returned");
        assert_eq!(metrics.bad_packets.load(Ordering::Relaxed), 1);
        dev.process_rx();
        assert_eq!(rxq.used().idx().load(), 1);
        let mut raw = [0u8; 44];
        mem.read_slice(&mut raw, GuestAddress(0x20_0000)).unwrap();
        let resp = Header::parse(&raw).unwrap();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (op::RESPONSE, 1024, 777, 3)
        );
        assert_ne!(
            status.load(Ordering::Relaxed),
            0,
            "the guest is interrupted"
        );
        let mut cid = [0u8; 8];
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 3);
    }
}
