//! virtio-vsock with Firecracker's hybrid host side: the guest's stream sockets are bridged to
//! Unix sockets. A host process connects to the device's socket and writes `CONNECT <port>\n`
//! to reach guest port `<port>` (answer `OK <host_port>\n`); a guest connection to host (CID 2)
//! port P becomes a connection to the Unix socket `<path>_P`.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod muxer;
pub mod packet;

pub use device::{Vsock, VsockError};
