//! virtio-vsock on the I/O thread: activation, queue notifications, the host-side listener and
//! its connections.

use std::os::fd::AsRawFd as _;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{device::Vsock, muxer::Watch};
use crate::devices::virtio::{watch_activation, watch_queues};

const TOKEN_ACTIVATE: u32 = 0;
// Queue tokens follow the queue order (`watch_queues`).
const TOKEN_RX: u32 = 1;
const TOKEN_TX: u32 = 2;
const TOKEN_EVQ: u32 = 3;
const TOKEN_LISTENER: u32 = 4;
/// Connection tokens start here.
const TOKEN_CONN_BASE: u32 = 16;

fn watch(ops: &mut EventOps, (fd, token): Watch) {
    let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
    if let Err(e) = ops.add(Events::with_data_raw(
        fd,
        TOKEN_CONN_BASE.wrapping_add(token),
        set,
    )) {
        tracing::warn!("Cannot watch a vsock connection: {e:?}");
    }
}

impl Vsock {
    fn settle(&mut self, ops: &mut EventOps) {
        self.process_rx();
        for stream in self.muxer.take_closed() {
            let _ = ops.remove(Events::empty_raw(stream.as_raw_fd()));
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        watch_activation(ops, &self.activate_evt, TOKEN_ACTIVATE, "vsock");
        if let Some(fd) = self.muxer.listener_fd() {
            let _ = ops.add(Events::with_data_raw(fd, TOKEN_LISTENER, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                watch_queues(ops, &self.queue_evts, TOKEN_RX);
                for w in self.process_tx() {
                    watch(ops, w);
                }
            }
            TOKEN_RX => {
                let _ = self.queue_evts[0].read();
            }
            TOKEN_TX => {
                let _ = self.queue_evts[1].read();
                for w in self.process_tx() {
                    watch(ops, w);
                }
            }
            TOKEN_EVQ => {
                let _ = self.queue_evts[2].read();
            }
            TOKEN_LISTENER => {
                for w in self.muxer.accept() {
                    watch(ops, w);
                }
            }
            t if t >= TOKEN_CONN_BASE => {
                let readable = set.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                );
                self.muxer
                    .conn_event(t - TOKEN_CONN_BASE, readable, set.contains(EventSet::OUT));
            }
            _ => {}
        }
        self.settle(ops);
    }
}
