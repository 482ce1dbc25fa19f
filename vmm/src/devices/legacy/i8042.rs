//! The i8042 keyboard controller: enough of it for Linux's i8042 + atkbd drivers to probe a
//! keyboard, a CPU reset through command 0xfe (how a guest without ACPI ends: `reboot=k`), and
//! Ctrl-Alt-Del injection for a graceful shutdown request.
//!
//! vm-superio's i8042 only models the reset; the keyboard half is written here.

use std::{collections::VecDeque, sync::Arc};

use vmm_sys_util::eventfd::EventFd;

use crate::{
    devices::bus::BusDevice,
    exit::{ExitReason, ExitSignal},
};

/// Offset of the data port (0x60) relative to the device base.
pub const OFFSET_DATA: u64 = 0;
/// Offset of the status/command port (0x64) relative to the device base.
pub const OFFSET_COMMAND: u64 = 4;

const SB_OUT_FULL: u8 = 0x01;
const SB_SYS_FLAG: u8 = 0x04;
const SB_LAST_WAS_CMD: u8 = 0x08;

const CB_KBD_INT: u8 = 0x01;
const CB_SYS_FLAG: u8 = 0x04;
const CB_TRANSLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT: u8 = 0xc0;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;

/// Ctrl, Alt and Delete make codes in scancode set 2 (no translation) …
const CAD_SET2: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
/// … and in set 1, what the controller delivers when translation is on.
const CAD_SET1: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];

/// Longest output queue (a real controller has one byte; a short queue keeps injected key
/// sequences intact while the driver drains them).
const QUEUE_MAX: usize = 16;

/// The controller on ports 0x60–0x64.
pub struct I8042 {
    exit: Arc<ExitSignal>,
    kbd_irq: EventFd,
    control: u8,
    last_was_cmd: bool,
    /// Controller command waiting for its data byte.
    pending_cmd: Option<u8>,
    /// Keyboard command waiting for its argument byte.
    pending_kbd: Option<u8>,
    out: VecDeque<u8>,
}

impl I8042 {
    /// A controller that reports resets to `exit` and raises `kbd_irq` (IRQ 1).
    pub fn new(exit: Arc<ExitSignal>, kbd_irq: EventFd) -> Self {
        Self {
            exit,
            kbd_irq,
            control: CB_KBD_INT | CB_SYS_FLAG | CB_TRANSLATE,
            last_was_cmd: false,
            pending_cmd: None,
            pending_kbd: None,
            out: VecDeque::new(),
        }
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() < QUEUE_MAX {
            self.out.push_back(byte);
        }
        if self.control & CB_KBD_INT != 0 {
            // An irqfd write only fails if the counter overflows.
            let _ = self.kbd_irq.write(1);
        }
    }

    /// Queues Ctrl-Alt-Del, as the keyboard would send it (a graceful shutdown request to
    /// Linux's atkbd). False when the queue has no room.
    pub fn ctrl_alt_del(&mut self) -> bool {
        if self.out.len() + CAD_SET2.len() > QUEUE_MAX {
            return false;
        }
        let codes = if self.control & CB_TRANSLATE != 0 {
            CAD_SET1
        } else {
            CAD_SET2
        };
        for c in codes {
            self.push(c);
        }
        true
    }

    fn status(&self) -> u8 {
        let mut s = 0;
        if !self.out.is_empty() {
            s |= SB_OUT_FULL;
        }
        if self.control & CB_SYS_FLAG != 0 {
            s |= SB_SYS_FLAG;
        }
        if self.last_was_cmd {
            s |= SB_LAST_WAS_CMD;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_cmd = true;
        self.pending_cmd = None;
        match cmd {
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT | CMD_WRITE_KBD_OUT | CMD_WRITE_AUX_OUT
            | CMD_WRITE_AUX => self.pending_cmd = Some(cmd),
            CMD_AUX_DISABLE => self.control |= 0x20,
            CMD_AUX_ENABLE => self.control &= !0x20,
            // No mouse: the aux interface test reports a clock line stuck low.
            CMD_AUX_TEST => self.push(0x01),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.control |= 0x10,
            CMD_KBD_ENABLE => self.control &= !0x10,
            CMD_READ_INPUT => self.push(0x00),
            // A20 on, reset line high.
            CMD_READ_OUTPUT => self.push(0x03),
            CMD_RESET_CPU => self.exit.signal(ExitReason::GuestReset),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.last_was_cmd = false;
        if let Some(cmd) = self.pending_cmd.take() {
            match cmd {
                CMD_WRITE_CTR => self.control = byte,
                // Output port bit 0 is the CPU reset line (active low).
                CMD_WRITE_OUTPUT if byte & 1 == 0 => self.exit.signal(ExitReason::GuestReset),
                CMD_WRITE_KBD_OUT => self.push(byte),
                // No aux device: nothing answers.
                _ => {}
            }
            return;
        }
        if let Some(cmd) = self.pending_kbd.take() {
            self.push(KBD_ACK);
            // "Get scancode set" answers with the set in use.
            if cmd == 0xf0 && byte == 0 {
                self.push(if self.control & CB_TRANSLATE != 0 {
                    0x41
                } else {
                    0x02
                });
            }
            return;
        }
        match byte {
            // Reset: ACK then self-test passed.
            0xff => {
                self.push(KBD_ACK);
                self.push(KBD_RESET_OK);
            }
            // Identify: an MF2 keyboard.
            0xf2 => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            0xee => self.push(KBD_ECHO),
            // Commands that take an argument: LEDs, scancode set, typematic rate.
            0xed | 0xf0 | 0xf3 => {
                self.pending_kbd = Some(byte);
                self.push(KBD_ACK);
            }
            _ => self.push(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            OFFSET_DATA => {
                let v = self.out.pop_front().unwrap_or(0);
                if !self.out.is_empty() && self.control & CB_KBD_INT != 0 {
                    let _ = self.kbd_irq.write(1);
                }
                v
            }
            OFFSET_COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            OFFSET_DATA => self.data(byte),
            OFFSET_COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (I8042::new(exit.clone(), EventFd::new(0).unwrap()), exit)
    }

    fn read(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_ends_the_vm() {
        let (mut d, exit) = dev();
        d.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut d, OFFSET_COMMAND) & SB_OUT_FULL, SB_OUT_FULL);
        assert_eq!(read(&mut d, OFFSET_DATA), 0x55);
        assert!(exit.reason().is_none());
        d.write(OFFSET_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(&ExitReason::GuestReset));
    }

    #[test]
    fn control_byte_round_trips_and_selects_scancodes() {
        let (mut d, _) = dev();
        d.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        d.write(OFFSET_DATA, &[0x05]);
        d.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, OFFSET_DATA), 0x05);
        assert!(d.ctrl_alt_del());
        let got: Vec<u8> = (0..4).map(|_| read(&mut d, OFFSET_DATA)).collect();
        assert_eq!(got, CAD_SET2);
        assert_eq!(read(&mut d, OFFSET_COMMAND) & SB_OUT_FULL, 0);
        d.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        d.write(OFFSET_DATA, &[CB_TRANSLATE]);
        assert!(d.ctrl_alt_del());
        let got: Vec<u8> = (0..4).map(|_| read(&mut d, OFFSET_DATA)).collect();
        assert_eq!(got, CAD_SET1);
    }

    #[test]
    fn keyboard_answers_reset_and_identify() {
        let (mut d, _) = dev();
        d.write(OFFSET_DATA, &[0xff]);
        assert_eq!(read(&mut d, OFFSET_DATA), KBD_ACK);
        assert_eq!(read(&mut d, OFFSET_DATA), KBD_RESET_OK);
        d.write(OFFSET_DATA, &[0xf2]);
        let got: Vec<u8> = (0..3).map(|_| read(&mut d, OFFSET_DATA)).collect();
        assert_eq!(got, [KBD_ACK, 0xab, 0x83]);
        d.write(OFFSET_DATA, &[0xed]);
        d.write(OFFSET_DATA, &[0x00]);
        assert_eq!(
            (read(&mut d, OFFSET_DATA), read(&mut d, OFFSET_DATA)),
            (KBD_ACK, KBD_ACK)
        );
    }

    #[test]
    fn output_port_reset_line() {
        let (mut d, exit) = dev();
        d.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT]);
        d.write(OFFSET_DATA, &[0x02]);
        assert_eq!(exit.reason(), Some(&ExitReason::GuestReset));
    }
}
