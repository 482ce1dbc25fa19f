//! virtio-blk: a disk image file as a block device, read-only or read-write, with flush and a
//! device id, executed by io_uring or synchronously.

pub mod device;
pub mod event_handler;
pub mod io;
pub mod metrics;
pub mod request;

pub use device::{Block, BlockError};
pub use io::EngineKind;
