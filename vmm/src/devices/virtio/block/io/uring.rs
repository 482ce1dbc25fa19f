//! The io_uring engine: vectored reads and writes and fdatasync submitted to the kernel,
//! completions signalled on an eventfd the I/O thread polls.

use std::{collections::HashMap, fs::File, os::fd::AsRawFd as _};

use io_uring::{IoUring, opcode, squeue, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Done, Op, OpKind};

/// Ring size: at least a full virtio queue of requests in flight.
pub const RING_ENTRIES: u32 = 256;

/// io_uring on the disk file.
pub struct UringEngine {
    ring: IoUring,
    file: File,
    evt: EventFd,
    pending: HashMap<u64, Op>,
    next_id: u64,
}

impl UringEngine {
    /// Sets up a ring for `file` with its completion eventfd.
    pub fn new(file: &File) -> std::io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let evt = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        Ok(Self {
            ring,
            file: file.try_clone()?,
            evt,
            pending: HashMap::new(),
            next_id: 0,
        })
    }

    /// The completion eventfd.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }

    /// Submits `op`; returns a failed completion at once if the ring refuses it.
    pub fn submit(&mut self, op: Op) -> Option<Done> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match op.kind {
            OpKind::Read => opcode::Readv::new(fd, op.iovecs.0.as_ptr(), op.iovecs.0.len() as u32)
                .offset(op.offset)
                .build(),
            OpKind::Write => {
                opcode::Writev::new(fd, op.iovecs.0.as_ptr(), op.iovecs.0.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            // A flush covers every write submitted before it.
            OpKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(id);
        // SAFETY: the iovec array lives in `op`, kept in `pending` until the completion is
        // reaped, and the buffers it points to are guest memory mapped for the life of the
        // process.
        let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed || self.ring.submit().is_err() {
            return Some(fail(op, libc::EAGAIN));
        }
        self.pending.insert(id, op);
        None
    }

    /// Collects finished transfers (call when the eventfd is readable).
    pub fn reap(&mut self) -> Vec<Done> {
        let _ = self.evt.read();
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let Some(op) = self.pending.remove(&cqe.user_data()) else {
                continue;
            };
            let res = cqe.result();
            done.push(Done {
                head: op.head,
                status: op.status,
                result: if res < 0 { Err(-res) } else { Ok(res as u64) },
                expected: op.expected,
                kind: op.kind,
            });
        }
        done
    }

    /// Transfers in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

fn fail(op: Op, errno: i32) -> Done {
    Done {
        head: op.head,
        status: op.status,
        result: Err(errno),
        expected: op.expected,
        kind: op.kind,
    }
}
