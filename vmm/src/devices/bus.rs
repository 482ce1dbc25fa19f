//! Address-range dispatch of vCPU exits: one bus for port I/O, one for MMIO.

use std::sync::{Arc, Mutex};

/// A device on a bus; offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a bus.
#[derive(Debug, thiserror::Error)]
#[error("Bus range {base:#x}+{len:#x} overlaps another device")]
pub struct BusError {
    base: u64,
    len: u64,
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping address ranges, each owned by a device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `dev` at `base..base + len`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).ok_or(BusError { base, len })?;
        if len == 0 || self.ranges.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(BusError { base, len });
        }
        let at = self.ranges.partition_point(|(b, _, _)| *b < base);
        self.ranges.insert(at, (base, len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let i = self.ranges.partition_point(|(b, _, _)| *b <= addr);
        let (base, len, dev) = self.ranges.get(i.checked_sub(1)?)?;
        (addr < base + len).then_some((addr - base, dev))
    }

    /// Dispatches a read; false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x10, 8, a.clone()).unwrap();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        assert!(bus.insert(0x14, 8, a.clone()).is_err());
        assert!(bus.insert(0x8, 9, a.clone()).is_err());
        assert!(bus.insert(0, 0, a.clone()).is_err());
        let mut d = [0u8; 1];
        assert!(bus.read(0x13, &mut d));
        assert_eq!(d[0], 3);
        assert!(!bus.read(0x18, &mut d));
        assert!(!bus.read(0x0f, &mut d));
        assert!(bus.write(0x10f, &[9]));
        assert!(bus.write(0x10, &[1]));
        assert_eq!(a.lock().unwrap().0, vec![(0, 1)]);
    }
}
