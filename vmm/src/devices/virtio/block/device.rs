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
                // The guest can repeat activation (reset, then DRIVER_OK): rate-limited.
                static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                if crate::metrics::log_allowed(&LAST) {
                    tracing::warn!("io_uring unavailable ({e}); this disk uses the sync engine");
                }
                Engine::new(EngineKind::Sync, &self.file).ok()
            }
            Err(e) => {
                static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                if crate::metrics::log_allowed(&LAST) {
                    tracing::error!("Cannot start the block I/O engine: {e}");
                }
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
        let [queue] = Activation::queues(a.queues)?;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::{
        desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::block::request::{T_FLUSH, T_GET_ID, T_IN, T_OUT};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x12_0000;

    struct Fixture {
        mem: GuestMemoryMmap,
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    fn fixture() -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut content = vec![0u8; 8 * 512];
        content[..8].copy_from_slice(b"SECTOR00");
        content[512..520].copy_from_slice(b"SECTOR01");
        std::fs::write(&path, content).unwrap();
        Fixture {
            mem,
            _dir: dir,
            path,
        }
    }

    /// Runs `chains` (each a list of (addr, len, flags)) through a device with `engine`;
    /// returns the used ring's (id, len) entries and the device.
    fn run(
        f: &Fixture,
        engine: EngineKind,
        read_only: bool,
        chains: &[Vec<(u64, u32, u16)>],
    ) -> Vec<(u32, u32)> {
        run_with(f, engine, read_only, chains, None)
    }

    fn run_with(
        f: &Fixture,
        engine: EngineKind,
        read_only: bool,
        chains: &[Vec<(u64, u32, u16)>],
        shrink_to: Option<u64>,
    ) -> Vec<(u32, u32)> {
        let q = MockSplitQueue::new(&f.mem, 64);
        let mut at = 0u16;
        for c in chains {
            let raw: Vec<RawDescriptor> = c
                .iter()
                .enumerate()
                .map(|(i, (a, l, fl))| {
                    let next = if i + 1 < c.len() {
                        at + i as u16 + 1
                    } else {
                        0
                    };
                    let flags = if i + 1 < c.len() { fl | 1 } else { *fl };
                    RawDescriptor::from(SplitDescriptor::new(*a, *l, flags, next))
                })
                .collect();
            q.add_desc_chains(&raw, at).unwrap();
            at += c.len() as u16;
        }
        let queue: Queue = q.create_queue().unwrap();
        let mut dev =
            Block::new(&f.path, read_only, Some("disk-id"), engine, Arc::default()).unwrap();
        if let Some(len) = shrink_to {
            // The image shrinks under the running VM: reads past the new end come up short.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&f.path)
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        let interrupt = Interrupt::new(
            Arc::new(AtomicU32::new(0)),
            Arc::new(EventFd::new(0).unwrap()),
        );
        dev.activate(Activation {
            mem: f.mem.clone(),
            queues: vec![queue],
            interrupt: interrupt.clone(),
            acked_features: 0,
        })
        .unwrap();
        dev.start_engine();
        dev.process_queue();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while q.used().idx().load() < chains.len() as u16 {
            assert!(
                std::time::Instant::now() < deadline,
                "requests never completed"
            );
            dev.process_completions();
        }
        assert_ne!(interrupt.status(), 0, "the guest is interrupted");
        (0..chains.len())
            .map(|i| {
                let e = q.used().ring().ref_at(i).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    fn header(f: &Fixture, at: u64, kind: u32, sector: u64) {
        f.mem.write_obj(kind, GuestAddress(at)).unwrap();
        f.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(f: &Fixture, at: u64) -> u8 {
        f.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn engines() -> [EngineKind; 2] {
        [EngineKind::Sync, EngineKind::IoUring]
    }

    #[test]
    fn reads_writes_flushes_and_identifies() {
        for engine in engines() {
            let f = fixture();
            header(&f, HDR, T_IN, 1);
            header(&f, HDR + 0x100, T_OUT, 2);
            header(&f, HDR + 0x200, T_FLUSH, 0);
            header(&f, HDR + 0x300, T_GET_ID, 0);
            f.mem
                .write_slice(&[0xab; 512], GuestAddress(DATA + 0x1000))
                .unwrap();
            let used = run(
                &f,
                engine,
                false,
                &[
                    vec![(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
                    vec![
                        (HDR + 0x100, 16, 0),
                        (DATA + 0x1000, 512, 0),
                        (STATUS + 1, 1, W),
                    ],
                    vec![(HDR + 0x200, 16, 0), (STATUS + 2, 1, W)],
                    vec![
                        (HDR + 0x300, 16, 0),
                        (DATA + 0x2000, 20, W),
                        (STATUS + 3, 1, W),
                    ],
                ],
            );
            let mut sector = [0u8; 8];
            f.mem.read_slice(&mut sector, GuestAddress(DATA)).unwrap();
            assert_eq!(&sector, b"SECTOR01", "{engine:?}");
            assert_eq!(
                (0..4).map(|i| status(&f, STATUS + i)).collect::<Vec<_>>(),
                [S_OK; 4]
            );
            let disk = std::fs::read(&f.path).unwrap();
            assert!(disk[1024..1536].iter().all(|b| *b == 0xab));
            let mut id = [0u8; 7];
            f.mem
                .read_slice(&mut id, GuestAddress(DATA + 0x2000))
                .unwrap();
            assert_eq!(&id, b"disk-id");
            // Used lengths: data + status for the read, status only for the write and flush.
            let mut lens: Vec<u32> = used.iter().map(|(_, l)| *l).collect();
            lens.sort_unstable();
            assert_eq!(lens, [1, 1, 21, 513]);
        }
    }

    #[test]
    fn malformed_chains_get_an_error_status() {
        for engine in engines() {
            let f = fixture();
            header(&f, HDR, T_IN, 7);
            header(&f, HDR + 0x100, T_IN, 0);
            header(&f, HDR + 0x200, T_OUT, 0);
            header(&f, HDR + 0x300, 99, 0);
            let used = run(
                &f,
                engine,
                true,
                &[
                    // Beyond the end of the 8-sector disk.
                    vec![(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)],
                    // Data buffer outside guest memory.
                    vec![
                        (HDR + 0x100, 16, 0),
                        (0x7fff_0000, 512, W),
                        (STATUS + 1, 1, W),
                    ],
                    // Write to a read-only disk.
                    vec![(HDR + 0x200, 16, 0), (DATA, 512, 0), (STATUS + 2, 1, W)],
                    // Unknown request type.
                    vec![(HDR + 0x300, 16, 0), (STATUS + 3, 1, W)],
                    // Status outside guest memory: returned with nothing written.
                    vec![(HDR, 16, 0), (DATA, 512, W), (0xffff_f000, 1, W)],
                    // Header outside guest memory.
                    vec![(0x9000_0000, 16, 0), (STATUS + 5, 1, W)],
                ],
            );
            assert_eq!(status(&f, STATUS), S_IOERR, "{engine:?}");
            assert_eq!(status(&f, STATUS + 1), S_IOERR);
            assert_eq!(status(&f, STATUS + 2), S_IOERR);
            assert_eq!(status(&f, STATUS + 3), S_UNSUPP);
            assert_eq!(status(&f, STATUS + 5), S_IOERR);
            assert_eq!(used.len(), 6);
            assert_eq!(used[4].1, 0, "no status byte could be written");
            assert_eq!(&std::fs::read(&f.path).unwrap()[..8], b"SECTOR00");
        }
    }

    #[test]
    fn short_reads_get_an_error_status() {
        for engine in engines() {
            let f = fixture();
            header(&f, HDR, T_IN, 0);
            header(&f, HDR + 0x100, T_IN, 2);
            run_with(
                &f,
                engine,
                false,
                &[
                    vec![(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)],
                    vec![
                        (HDR + 0x100, 16, 0),
                        (DATA + 0x1000, 512, W),
                        (STATUS + 1, 1, W),
                    ],
                ],
                Some(512),
            );
            assert_eq!(
                status(&f, STATUS),
                S_IOERR,
                "{engine:?}: half of the data is missing"
            );
            assert_eq!(
                status(&f, STATUS + 1),
                S_IOERR,
                "{engine:?}: all of it is missing"
            );
        }
    }
}
