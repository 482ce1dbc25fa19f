//! Check results on COM1, in the lines the host-side tests look for: `<guest>: ok <check>` or
//! `<guest>: FAIL <check>[: <detail>]` per check, then `<guest>: done failures=<n>`.

use crate::println;

/// Counts and prints a guest's checks.
pub struct Checks {
    guest: &'static str,
    failures: u32,
}

impl Checks {
    /// Checks of the guest `guest` (the prefix of every line).
    pub const fn new(guest: &'static str) -> Self {
        Self { guest, failures: 0 }
    }

    /// Reports one check; returns `ok`.
    pub fn check(&mut self, name: &str, ok: bool) -> bool {
        if ok {
            println!("{}: ok {name}", self.guest);
        } else {
            self.failures += 1;
            println!("{}: FAIL {name}", self.guest);
        }
        ok
    }

    /// Reports one check, with what was found when it fails; returns `ok`.
    pub fn check_with(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments) -> bool {
        if ok {
            println!("{}: ok {name}", self.guest);
        } else {
            self.failures += 1;
            println!("{}: FAIL {name}: {detail}", self.guest);
        }
        ok
    }

    /// Prints the closing `done` line.
    pub fn done(&self) {
        println!("{}: done failures={}", self.guest, self.failures);
    }
}
