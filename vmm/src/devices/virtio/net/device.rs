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
        ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, clone_events, ids,
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
        clone_events(&self.queue_evts).map_err(NetError::EventFd)
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
        let [rx, tx] = Activation::queues(a.queues)?;
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

#[cfg(test)]
mod tests {
    use std::{
        os::fd::AsRawFd,
        process::Command,
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::{
        desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    /// TX and RX through a real TAP in a network namespace private to the test thread.
    #[test]
    fn frames_cross_a_tap_through_mock_queues() {
        hearth_testkit::require!(
            hearth_testkit::skip::root(),
            hearth_testkit::skip::program("ip")
        );
        std::thread::spawn(|| {
            // SAFETY: moves only this thread into a fresh network namespace; it never returns
            // to the test harness's pool.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // No IPv6 chatter (router solicitations, MLD) on the TAP: only our frames cross it.
            for conf in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")
                    .unwrap();
            }
            // Children of this thread start in its namespace.
            for args in [
                &["tuntap", "add", "dev", "hvmut0", "mode", "tap"][..],
                &["link", "set", "hvmut0", "up"],
            ] {
                assert!(Command::new("ip").args(args).status().unwrap().success());
            }
            // Generous: only a lost frame should end the wait.
            let sock =
                hearth_testkit::netns::packet_socket("hvmut0", 0x88b5, Duration::from_secs(60))
                    .unwrap();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
            let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
            let cfg = NetConfig {
                tap: "hvmut0".into(),
                mac: Some("06:00:00:00:00:07".into()),
            };
            let metrics = Arc::new(NetMetrics::default());
            let mut net = Net::new(&cfg, metrics.clone()).unwrap();
            let mut mac = [0u8; 6];
            net.read_config(0, &mut mac);
            assert_eq!(mac, [6, 0, 0, 0, 0, 7]);

            // TX: header and frame in separate descriptors, plus a chain outside memory.
            let mut frame = [0u8; 60];
            frame[..6].fill(0xff);
            frame[6..12].copy_from_slice(&mac);
            frame[12..14].copy_from_slice(&[0x88, 0xb5]);
            frame[14..21].copy_from_slice(b"unit-tx");
            mem.write_slice(&frame, GuestAddress(0x10_1000)).unwrap();
            let tx = [
                RawDescriptor::from(SplitDescriptor::new(0x10_0000, NET_HDR_LEN as u32, 1, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x10_1000, 60, 0, 0)),
                RawDescriptor::from(SplitDescriptor::new(0x7fff_0000, 100, 0, 0)),
            ];
            txq.add_desc_chains(&tx, 0).unwrap();
            let rx = [RawDescriptor::from(SplitDescriptor::new(
                0x20_0000, 2048, W, 0,
            ))];
            rxq.add_desc_chains(&rx, 0).unwrap();
            net.activate(Activation {
                mem: mem.clone(),
                queues: vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()],
                interrupt: Interrupt::new(
                    Arc::new(AtomicU32::new(0)),
                    Arc::new(EventFd::new(0).unwrap()),
                ),
                acked_features: VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC,
            })
            .unwrap();
            net.process_tx();
            assert_eq!(txq.used().idx().load(), 2);
            assert_eq!(metrics.tx_frames.load(Ordering::Relaxed), 1);
            assert_eq!(metrics.dropped.load(Ordering::Relaxed), 1);
            let mut buf = [0u8; 2048];
            let got = loop {
                // SAFETY: receives into our buffer.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                assert!(
                    n > 0,
                    "no frame on the TAP: {}",
                    std::io::Error::last_os_error()
                );
                if buf[12..14] == [0x88, 0xb5] {
                    break buf[..n as usize].to_vec();
                }
            };
            assert_eq!(&got[14..21], b"unit-tx");

            // RX: a frame sent on the TAP's interface lands in the guest buffer after a header.
            let mut reply = [0u8; 60];
            reply[..6].copy_from_slice(&mac);
            reply[12..14].copy_from_slice(&[0x88, 0xb5]);
            reply[14..21].copy_from_slice(b"unit-rx");
            // Until the kernel has activated the TAP's queue discipline (link events are handled
            // asynchronously after the carrier comes up), frames sent to it are dropped: resend.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                // SAFETY: sends our buffer.
                let n =
                    unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
                assert_eq!(n, 60);
                let mut pfd = libc::pollfd {
                    fd: net.tap.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polls one descriptor we own.
                if unsafe { libc::poll(&mut pfd, 1, 200) } == 1 {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "the TAP got no frame");
            }
            net.tap_readable = true;
            net.process_rx();
            let used = rxq.used().idx().load();
            assert!(
                used >= 1,
                "dropped {}",
                metrics.dropped.load(Ordering::Relaxed)
            );
            let found = (0..used).any(|i| {
                let e = rxq.used().ring().ref_at(i as usize).unwrap().load();
                let base = 0x20_0000 + u64::from(e.id()) * 0x1000 + NET_HDR_LEN as u64;
                let mut got = [0u8; 7];
                mem.read_slice(&mut got, GuestAddress(base + 14)).unwrap();
                e.len() as usize == NET_HDR_LEN + 60 && &got == b"unit-rx"
            });
            assert!(found, "the host's frame is not in the guest's buffers");
        })
        .join()
        .unwrap();
    }
}
