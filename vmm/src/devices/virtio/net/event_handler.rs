//! virtio-net on the I/O thread: activation, queue notifications, TAP readiness.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Net;
use crate::devices::virtio::{watch_activation, watch_queues};

const TOKEN_ACTIVATE: u32 = 0;
// Queue tokens follow the queue order (`watch_queues`).
const TOKEN_RX: u32 = 1;
const TOKEN_TX: u32 = 2;
const TOKEN_TAP: u32 = 3;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        watch_activation(ops, &self.activate_evt, TOKEN_ACTIVATE, "net");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                watch_queues(ops, &self.queue_evts, TOKEN_RX);
                // Edge-triggered: `tap_readable` remembers readiness until a read says EAGAIN.
                let _ = ops.add(Events::with_data(
                    &self.tap,
                    TOKEN_TAP,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                ));
                self.tap_readable = true;
                self.process_tx();
                self.process_rx();
            }
            TOKEN_RX => {
                let _ = self.queue_evts[0].read();
                self.process_rx();
            }
            TOKEN_TX => {
                let _ = self.queue_evts[1].read();
                self.process_tx();
            }
            TOKEN_TAP => {
                self.tap_readable = true;
                self.process_rx();
            }
            _ => {}
        }
    }
}
