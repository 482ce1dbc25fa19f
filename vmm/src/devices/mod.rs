//! Emulated devices: the buses vCPU exits are dispatched on, the legacy devices (serial,
//! i8042, boot timer) and the virtio-mmio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;
