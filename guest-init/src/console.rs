//! The console lines hearth-init prints on its stdout (the serial console in a microVM), listed
//! in `docs/hearth-init.md` so tests and people can look for them.

use std::io::Write as _;

/// Prints one line and flushes it.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    // The console may be gone (a closed pipe in a test); there is nowhere to report that.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// `hearth-init: <text>`.
pub fn say(text: &str) {
    line(&format!("hearth-init: {text}"));
}
