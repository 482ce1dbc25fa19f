//! The boot timer: the guest writes [`BOOT_TIMER_MAGIC`] to the first byte of its page and the
//! VMM prints the time since its own process start. The line is an interface (the agent parses
//! it): `hearth-vmm boot-timer: guest_boot_us=<microseconds>` on stderr.

use std::sync::atomic::Ordering;

use crate::{
    arch::x86_64::layout::BOOT_TIMER_MAGIC,
    devices::bus::BusDevice,
    metrics::{metrics, process_start},
};

/// The prefix of the line the boot timer prints.
pub const BOOT_TIMER_LINE_PREFIX: &str = "hearth-vmm boot-timer: guest_boot_us=";

/// The boot-timer page.
#[derive(Debug, Default)]
pub struct BootTimer;

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let us = process_start().elapsed().as_micros() as u64;
        // Only the first write counts as the boot time; later ones are still printed.
        let _ = metrics().boot_time_us.compare_exchange(
            0,
            us.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        // One write, so the line never interleaves with other stderr output.
        let line = format!("{BOOT_TIMER_LINE_PREFIX}{us}\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
}
