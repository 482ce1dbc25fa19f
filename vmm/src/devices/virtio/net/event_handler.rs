//! virtio-net on the I/O thread: activation, queue notifications, TAP readiness.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Net;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX: u32 = 1;
const TOKEN_TX: u32 = 2;
const TOKEN_TAP: u32 = 3;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!("Cannot watch the net activation event: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                let _ = ops.add(Events::with_data(
                    &self.queue_evts[0],
                    TOKEN_RX,
                    EventSet::IN,
                ));
                let _ = ops.add(Events::with_data(
                    &self.queue_evts[1],
                    TOKEN_TX,
                    EventSet::IN,
                ));
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
