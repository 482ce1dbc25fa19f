//! COM1: vm-superio's 8250 UART at 0x3f8, IRQ 4 through an irqfd, its output to stdout, a file,
//! an in-memory ring (read through the control socket) or nowhere.

use std::{
    collections::VecDeque,
    fs::File,
    io::Write,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use serde::Serialize;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::{devices::bus::BusDevice, metrics::add};

/// Raises an interrupt by writing an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A bounded byte ring: the newest `capacity` bytes of serial output.
#[derive(Debug)]
pub struct Ring {
    buf: VecDeque<u8>,
    capacity: usize,
}

impl Ring {
    /// An empty ring keeping at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(capacity.min(64 << 10)),
            capacity,
        }
    }

    /// Appends, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.capacity);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }

    /// The ring's contents, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }
}

/// Where serial output goes.
#[derive(Debug)]
pub enum SerialSink {
    /// The VMM's stdout.
    Stdout,
    /// A file (created by the VMM).
    File(File),
    /// A ring the control socket reads.
    Ring(Arc<Mutex<Ring>>),
    /// Dropped.
    Null,
}

/// Serial counters.
#[derive(Debug, Default, Serialize)]
pub struct SerialMetrics {
    /// Bytes the guest wrote.
    pub tx_bytes: AtomicU64,
    /// Bytes that could not be written to the sink.
    pub lost_bytes: AtomicU64,
}

/// Line-buffers output: vm-superio flushes after every byte, which would cost one write(2) per
/// byte.
#[derive(Debug)]
pub struct SerialOut {
    sink: SerialSink,
    line: Vec<u8>,
    metrics: Arc<SerialMetrics>,
}

impl SerialOut {
    /// Output to `sink`.
    pub fn new(sink: SerialSink, metrics: Arc<SerialMetrics>) -> Self {
        Self {
            sink,
            line: Vec::with_capacity(256),
            metrics,
        }
    }

    /// Writes out the buffered partial line.
    pub fn flush_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let res = match &mut self.sink {
            SerialSink::Stdout => {
                // Rust's stdout buffers up to a newline; a partial last line must still go out.
                let mut out = std::io::stdout().lock();
                out.write_all(&self.line).and_then(|()| out.flush())
            }
            SerialSink::File(f) => f.write_all(&self.line),
            SerialSink::Ring(r) => {
                r.lock().unwrap_or_else(|e| e.into_inner()).push(&self.line);
                Ok(())
            }
            SerialSink::Null => Ok(()),
        };
        if res.is_err() {
            add(&self.metrics.lost_bytes, self.line.len() as u64);
        }
        self.line.clear();
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        add(&self.metrics.tx_bytes, buf.len() as u64);
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= 4096 {
            self.flush_line();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Deliberately lazy: see the type's doc.
        Ok(())
    }
}

/// The UART on the port bus.
pub struct SerialDevice(pub Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOut>);

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self(Serial::new(IrqTrigger(irq), out))
    }

    /// Redirects the output.
    pub fn set_sink(&mut self, sink: SerialSink) {
        let out = self.0.writer_mut();
        out.flush_line();
        out.sink = sink;
    }

    /// Flushes the partial line (at exit).
    pub fn flush(&mut self) {
        self.0.writer_mut().flush_line();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(first), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // An irqfd write cannot fail short of a kernel bug; output errors are counted.
            let _ = self.0.write(off, *first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut r = Ring::new(4);
        r.push(b"ab");
        r.push(b"cde");
        assert_eq!(r.contents(), b"bcde");
        r.push(b"0123456");
        assert_eq!(r.contents(), b"3456");
    }

    #[test]
    fn output_is_line_buffered_into_the_ring() {
        let ring = Arc::new(Mutex::new(Ring::new(1024)));
        let metrics = Arc::new(SerialMetrics::default());
        let irq = EventFd::new(0).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            SerialOut::new(SerialSink::Ring(ring.clone()), metrics.clone()),
        );
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert!(ring.lock().unwrap().contents().is_empty());
        dev.write(0, b"\n");
        assert_eq!(ring.lock().unwrap().contents(), b"hi\n");
        dev.write(0, b"x");
        dev.flush();
        assert_eq!(ring.lock().unwrap().contents(), b"hi\nx");
        assert_eq!(
            metrics.tx_bytes.load(std::sync::atomic::Ordering::Relaxed),
            4
        );
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
