//! Legacy devices: the 8250 serial port, the i8042 controller, the boot timer.

pub mod boot_timer;
pub mod i8042;
pub mod serial;
