//! When a test may skip, and how it says so.
//!
//! Use with [`require!`](crate::require):
//!
//! ```no_run
//! # fn t() {
//! hearth_testkit::require!(hearth_testkit::skip::root());
//! # }
//! ```

use std::path::Path;

/// Environment variable that turns every skip into a failure.
pub const NO_SKIP_ENV: &str = "HEARTH_NO_SKIP";

/// `Some(reason)` unless the test runs as root.
pub fn root() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    (euid != 0).then(|| format!("needs root (running as uid {euid})"))
}

/// `Some(reason)` unless `/dev/kvm` can be opened read-write.
pub fn kvm() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("needs /dev/kvm ({e})")),
    }
}

/// `Some(reason)` unless `program` is on `PATH`.
pub fn program(program: &str) -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| Path::new(&dir).join(program).is_file());
    (!found).then(|| format!("needs `{program}` on PATH (cargo xtask setup installs it)"))
}

/// Reports a skip: prints why, or panics when [`NO_SKIP_ENV`] is set.
pub fn skipped(why: &str) {
    if std::env::var_os(NO_SKIP_ENV).is_some_and(|v| v == "1") {
        panic!("test would skip, but {NO_SKIP_ENV}=1 forbids skipping: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// Returns from the calling test, after reporting why, when the check gives a reason.
#[macro_export]
macro_rules! require {
    ($($check:expr),+ $(,)?) => {
        $(
            if let Some(why) = $check {
                $crate::skip::skipped(&why);
                return;
            }
        )+
    };
}
