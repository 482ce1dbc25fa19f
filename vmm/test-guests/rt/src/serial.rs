//! A polling writer for the 8250 UART at 0x3f8.

use crate::io::outb;

/// The first serial port (COM1).
pub struct Serial {
    base: u16,
}

impl Serial {
    /// COM1 at I/O port 0x3f8.
    pub const fn com1() -> Self {
        Self { base: 0x3f8 }
    }

    /// Writes bytes to the transmit register. The VMM's UART never holds the line busy, so there
    /// is no need to poll the line-status register (and each poll costs an exit).
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            outb(self.base, b);
        }
    }
}

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial::com1(), $($arg)*);
    }};
}
