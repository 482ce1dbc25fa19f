//! The virtio-blk device model: one request queue, capacity in the config space, read-only,
//! flush and device-id support, requests executed by an I/O engine.

use std::{fs::File, sync::Arc};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    io::{Done, Engine, EngineKind, Op, OpKind},
    metrics::BlockMetrics,
    request::{self, ID_BYTES, RequestType, S_IOERR, S_OK, S_UNSUPP, SECTOR_SIZE},
};
use crate::{
    devices::virtio::{
        ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, ids,
        read_config_bytes,
    },
    metrics::{add, inc},
};

/// Feature: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: flush is supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file could not be opened.
    #[error("Cannot open disk image {0}")]
    Open(String, #[source] std::io::Error),
    /// Its size is not a whole number of sectors.
    #[error("Disk image {0} is {1} bytes, not a multiple of 512")]
    Size(String, u64),
    /// The device id is longer than 20 bytes.
    #[error("Disk id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

/// One disk.
pub struct Block {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    engine_kind: EngineKind,
    pub(super) engine: Option<Engine>,
    /// The queue's notify ioeventfd.
    pub queue_evt: EventFd,
    /// Written when the driver activates the device.
    pub activate_evt: EventFd,
    active: Option<Active>,
    metrics: Arc<BlockMetrics>,
}

impl Block {
    /// Opens `path` (read-only when `read_only`) as a disk with device id `id`.
    pub fn new(
        path: &std::path::Path,
        read_only: bool,
        id: Option<&str>,
        engine_kind: EngineKind,
        metrics: Arc<BlockMetrics>,
    ) -> Result<Self, BlockError> {
        let shown = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(shown.clone(), e))?;
        let size = file
            .metadata()
            .map_err(|e| BlockError::Open(shown.clone(), e))?
            .len();
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Size(shown, size));
        }
        let mut id_bytes = [0u8; ID_BYTES];
        if let Some(id) = id {
            if id.len() > ID_BYTES {
                return Err(BlockError::IdTooLong(id.to_owned()));
            }
            id_bytes[..id.len()].copy_from_slice(id.as_bytes());
        }
        Ok(Self {
            file,
            read_only,
            capacity: size / SECTOR_SIZE,
            id: id_bytes,
            engine_kind,
            engine: None,
            queue_evt: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            active: None,
            metrics,
        })
    }

    /// Disk size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Creates the I/O engine (on the I/O thread, at activation). io_uring falls back to the
    /// synchronous engine, with a warning, where the kernel refuses it.
    pub fn start_engine(&mut self) {
        if self.engine.is_some() {
            return;
        }
        self.engine = match Engine::new(self.engine_kind, &self.file) {
            Ok(e) => Some(e),
            Err(e) if self.engine_kind == EngineKind::IoUring => {
                tracing::warn!("io_uring unavailable ({e}); this disk uses the sync engine");
                Engine::new(EngineKind::Sync, &self.file).ok()
            }
            Err(e) => {
                tracing::error!("Cannot start the block I/O engine: {e}");
                None
            }
        };
    }

    /// True once the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Serves every available request.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut completed = false;
        let mut done_now = Vec::new();
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            match request::parse(chain, &active.mem, self.capacity, self.read_only) {
                Err((e, status)) => {
                    tracing::debug!("bad block request: {e}");
                    inc(&self.metrics.errors);
                    finish(active, head, status, S_IOERR, 0);
                    completed = true;
                }
                Ok(req) => match req.kind {
                    RequestType::Unsupported(_) => {
                        inc(&self.metrics.unsupported);
                        finish(active, head, Some(req.status), S_UNSUPP, 0);
                        completed = true;
                    }
                    RequestType::GetId => {
                        let mut left = self.id.as_slice();
                        let mut written = 0;
                        for (addr, len) in &req.data {
                            let n = left.len().min(*len as usize);
                            if active.mem.write_slice(&left[..n], *addr).is_err() {
                                break;
                            }
                            left = &left[n..];
                            written += n as u32;
                        }
                        finish(active, head, Some(req.status), S_OK, written);
                        completed = true;
                    }
                    RequestType::In | RequestType::Out | RequestType::Flush => {
                        let kind = match req.kind {
                            RequestType::In => OpKind::Read,
                            RequestType::Out => OpKind::Write,
                            _ => OpKind::Flush,
                        };
                        let Some(iovecs) = super::io::iovecs(&active.mem, &req.data) else {
                            inc(&self.metrics.errors);
                            finish(active, head, Some(req.status), S_IOERR, 0);
                            completed = true;
                            continue;
                        };
                        let op = Op {
                            kind,
                            offset: req.sector * SECTOR_SIZE,
                            iovecs,
                            expected: if kind == OpKind::Flush {
                                0
                            } else {
                                req.data_len
                            },
                            head,
                            status: req.status,
                        };
                        match self.engine.as_mut() {
                            Some(engine) => {
                                if let Some(done) = engine.submit(op) {
                                    done_now.push(done);
                                }
                            }
                            None => {
                                inc(&self.metrics.errors);
                                finish(active, head, Some(req.status), S_IOERR, 0);
                                completed = true;
                            }
                        }
                    }
                },
            }
        }
        for done in done_now {
            self.complete(done);
            completed = true;
        }
        if completed && let Some(active) = self.active.as_ref() {
            active.interrupt.signal_used_queue();
        }
    }

    /// Reaps io_uring completions.
    pub fn process_completions(&mut self) {
        let done = match self.engine.as_mut() {
            Some(Engine::Uring(e)) => e.reap(),
            _ => return,
        };
        if done.is_empty() {
            return;
        }
        for d in done {
            self.complete(d);
        }
        if let Some(active) = self.active.as_ref() {
            active.interrupt.signal_used_queue();
        }
    }

    fn complete(&mut self, d: Done) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let ok = d.result == Ok(d.expected);
        let m = &self.metrics;
        match (ok, d.kind) {
            (false, _) => inc(&m.errors),
            (true, OpKind::Read) => {
                inc(&m.read_ops);
                add(&m.read_bytes, d.expected);
            }
            (true, OpKind::Write) => {
                inc(&m.write_ops);
                add(&m.write_bytes, d.expected);
            }
            (true, OpKind::Flush) => inc(&m.flush_ops),
        }
        let data_written = if ok && d.kind == OpKind::Read {
            d.expected as u32
        } else {
            0
        };
        finish(
            active,
            d.head,
            Some(d.status),
            if ok { S_OK } else { S_IOERR },
            data_written,
        );
    }
}

/// Writes the status byte (when there is a usable status descriptor) and returns the chain.
fn finish(
    active: &mut Active,
    head: u16,
    status: Option<GuestAddress>,
    value: u8,
    data_written: u32,
) {
    let mut used = data_written;
    if let Some(addr) = status
        && active.mem.write_obj(value, addr).is_ok()
    {
        used += 1;
    }
    if let Err(e) = active.queue.add_used(&active.mem, head, used) {
        tracing::debug!("cannot return a block request: {e}");
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        ids::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.capacity.to_le_bytes(), offset, data)
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let got = a.queues.len();
        let Some(queue) = a.queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.active = Some(Active {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
        });
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    fn reset(&mut self) -> bool {
        // Requests in flight on io_uring write into guest memory later: only reset when idle.
        if matches!(&self.engine, Some(Engine::Uring(e)) if e.in_flight() > 0) {
            return false;
        }
        self.active = None;
        true
    }
}
