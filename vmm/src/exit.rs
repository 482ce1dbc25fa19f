//! How a VM ends, and the process exit code for each way (documented in `--help` and
//! `docs/vmm.md`).

use std::sync::OnceLock;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 command 0xfe, or KVM's reset system event): the normal
    /// end of a guest without ACPI (`reboot=k`).
    GuestReset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// Killed through the control socket or by SIGTERM/SIGINT/SIGHUP.
    Killed,
    /// The guest could not be run further (emulation failure, failed entry, halt without
    /// interrupts).
    GuestError(String),
    /// The VMM itself failed.
    VmmError(String),
}

/// Exit code: the guest reset (normal end).
pub const EXIT_GUEST_RESET: i32 = 0;
/// Exit code: the VMM failed (bad input at start, or an error while running).
pub const EXIT_VMM_ERROR: i32 = 1;
/// Exit code: the command line could not be parsed (clap's convention).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the guest triple-faulted.
pub const EXIT_TRIPLE_FAULT: i32 = 3;
/// Exit code: killed (control socket `kill`, SIGTERM, SIGINT).
pub const EXIT_KILLED: i32 = 4;
/// Exit code: the guest stopped in a way KVM cannot continue.
pub const EXIT_GUEST_ERROR: i32 = 5;
/// Exit code: a thread made a system call its seccomp filter forbids.
pub const EXIT_SECCOMP: i32 = 6;

/// The exit-code table as `--help` shows it.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  the guest reset the VM (i8042 reset, e.g. Linux `reboot` with reboot=k): the normal end
  1  VMM error: bad configuration or input (one line on stderr), or a failure while running
  2  command-line usage error
  3  the guest triple-faulted
  4  killed: control-socket `kill`, SIGTERM, SIGINT or SIGHUP
  5  guest error: KVM could not run the guest further (emulation failure, failed entry)
  6  a VMM thread made a system call its seccomp filter forbids";

impl ExitReason {
    /// The process exit code for this reason.
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::GuestReset => EXIT_GUEST_RESET,
            ExitReason::TripleFault => EXIT_TRIPLE_FAULT,
            ExitReason::Killed => EXIT_KILLED,
            ExitReason::GuestError(_) => EXIT_GUEST_ERROR,
            ExitReason::VmmError(_) => EXIT_VMM_ERROR,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => f.write_str("guest reset"),
            ExitReason::TripleFault => f.write_str("guest triple fault"),
            ExitReason::Killed => f.write_str("killed"),
            ExitReason::GuestError(e) => write!(f, "guest error: {e}"),
            ExitReason::VmmError(e) => write!(f, "VMM error: {e}"),
        }
    }
}

/// The first reason anyone reports wins; the main thread waits on the event.
#[derive(Debug)]
pub struct ExitSignal {
    evt: EventFd,
    reason: OnceLock<ExitReason>,
}

impl ExitSignal {
    /// A fresh, unset signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: OnceLock::new(),
        })
    }

    /// Records `reason` unless one was recorded before, and wakes the main thread.
    pub fn signal(&self, reason: ExitReason) {
        if self.reason.set(reason).is_ok() {
            // A full counter cannot happen: it is written at most once.
            let _ = self.evt.write(1);
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<&ExitReason> {
        self.reason.get()
    }

    /// The event the main thread polls.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(s.reason().is_none());
        s.signal(ExitReason::GuestReset);
        s.signal(ExitReason::Killed);
        assert_eq!(s.reason(), Some(&ExitReason::GuestReset));
        assert_eq!(s.event().read().unwrap(), 1);
        assert_eq!(ExitReason::Killed.code(), EXIT_KILLED);
    }
}
