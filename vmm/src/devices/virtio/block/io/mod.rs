//! The block I/O engines: io_uring (asynchronous, completions on an eventfd) and a synchronous
//! fallback (preadv/pwritev/fdatasync on the I/O thread). Both take buffers that point straight
//! into guest memory; this module is the only place those host pointers are made.

pub mod sync;
pub mod uring;

use std::fs::File;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Which engine a disk uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// io_uring (the default).
    #[default]
    IoUring,
    /// Blocking system calls on the I/O thread.
    Sync,
}

/// A transfer for an engine.
#[derive(Debug)]
pub struct Op {
    /// What to do.
    pub kind: OpKind,
    /// Byte offset in the disk file.
    pub offset: u64,
    /// Buffers in guest memory (host addresses).
    pub iovecs: IoVecs,
    /// Bytes the transfer must move.
    pub expected: u64,
    /// The descriptor chain's head.
    pub head: u16,
    /// Where the status goes.
    pub status: GuestAddress,
}

/// The transfer direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Disk to guest.
    Read,
    /// Guest to disk.
    Write,
    /// Durability barrier.
    Flush,
}

/// A finished transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The descriptor chain's head.
    pub head: u16,
    /// Where the status goes.
    pub status: GuestAddress,
    /// Bytes actually moved (or an error).
    pub result: Result<u64, i32>,
    /// Bytes the transfer had to move.
    pub expected: u64,
    /// Read or write.
    pub kind: OpKind,
}

/// Host iovecs pointing into guest memory.
#[derive(Debug)]
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the pointers address guest memory, which is mapped for the life of the process and
// shared by design between the vCPU threads and the I/O thread; an `IoVecs` is only used by
// the thread that owns it.
unsafe impl Send for IoVecs {}

/// Host iovecs for guest buffers; None if a buffer is not inside one memory region.
pub fn iovecs(mem: &GuestMemoryMmap, data: &[(GuestAddress, u32)]) -> Option<IoVecs> {
    data.iter()
        .map(|(addr, len)| {
            let slice = mem.get_slice(*addr, *len as usize).ok()?;
            Some(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: *len as usize,
            })
        })
        .collect::<Option<Vec<_>>>()
        .map(IoVecs)
}

/// An engine over one disk file.
pub enum Engine {
    /// Blocking calls.
    Sync(sync::SyncEngine),
    /// io_uring.
    Uring(Box<uring::UringEngine>),
}

impl Engine {
    /// Creates the engine of `kind` for `file`.
    pub fn new(kind: EngineKind, file: &File) -> std::io::Result<Self> {
        Ok(match kind {
            EngineKind::Sync => Engine::Sync(sync::SyncEngine::new(file)?),
            EngineKind::IoUring => Engine::Uring(Box::new(uring::UringEngine::new(file)?)),
        })
    }

    /// Starts `op`; a synchronous engine returns its completion at once.
    pub fn submit(&mut self, op: Op) -> Option<Done> {
        match self {
            Engine::Sync(e) => Some(e.run(op)),
            Engine::Uring(e) => e.submit(op),
        }
    }
}
