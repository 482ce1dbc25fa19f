//! Guest memory filled with fuzz input holds a split virtqueue (descriptor table, available
//! ring) whose chains go through the virtio-blk request parser and the virtio-vsock packet
//! reader, as a hostile guest would feed them. Neither may panic, loop or touch memory outside
//! the guest's.

#![no_main]

use hearth_vmm::devices::virtio::{block::request, vsock::packet};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(&data[..data.len().min(MEM)], GuestAddress(0)).unwrap();
    // The used ring belongs to the device: start it clean.
    mem.write_slice(&[0u8; 4 + 8 * QUEUE_SIZE as usize], GuestAddress(USED)).unwrap();
    for parser in 0..2 {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        // At most one pass over the ring: a guest's avail index can claim any count.
        for _ in 0..QUEUE_SIZE {
            let Some(chain) = q.pop_descriptor_chain(&mem) else { break };
            let head = chain.head_index();
            if parser == 0 {
                let _ = request::parse(chain, &mem, 64, false);
            } else {
                let _ = packet::read_tx(chain, &mem);
            }
            let _ = q.add_used(&mem, head, 0);
        }
    }
    if let Some(h) = packet::Header::parse(data) {
        assert_eq!(packet::Header::parse(&h.to_bytes()), Some(h));
    }
});
