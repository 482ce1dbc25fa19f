//! virtio-blk on the I/O thread: activation, queue notifications, io_uring completions.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{device::Block, io::Engine};
use crate::devices::virtio::{watch_activation, watch_queues};

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_QUEUE: u32 = 1;
const TOKEN_COMPLETION: u32 = 2;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        watch_activation(ops, &self.activate_evt, TOKEN_ACTIVATE, "block");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.start_engine();
                watch_queues(ops, std::slice::from_ref(&self.queue_evt), TOKEN_QUEUE);
                if let Some(Engine::Uring(e)) = &self.engine {
                    let _ = ops.add(Events::with_data(e.event(), TOKEN_COMPLETION, EventSet::IN));
                }
                // Requests the driver queued before we watched the queue.
                self.process_queue();
            }
            TOKEN_QUEUE => {
                let _ = self.queue_evt.read();
                self.process_queue();
            }
            TOKEN_COMPLETION => self.process_completions(),
            _ => {}
        }
    }
}
