//! virtio-net on a TAP device given by name (the agent creates the TAP; the VMM only opens it).

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod tap;

pub use device::{Net, NetError};
