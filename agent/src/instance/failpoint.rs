//! Test-only crash points. With `HEARTH_TEST_FAILPOINTS=name[,name...]` in its environment the
//! agent SIGKILLs itself when a start reaches one of the named points, so a test can show that
//! a crash exactly there loses no instance (`agent/tests/pool_crash.rs`). Production agents do
//! not set the variable; then a point costs one cached lookup.
//!
//! The points, in the order a start passes them:
//! - `warm-handed-over`: a warm-pool member was claimed and its interface handed to the
//!   instance; nothing is committed yet.
//! - `warm-committed`: the warm boot (the member's runtime and boot id) is committed; hearth-init
//!   has not been sent the spec.
//! - `cold-launched`: a cold boot's runtime runs (hearth-init or hearth-vmm started in the
//!   instance's cgroup); its state is not committed yet.
//! - `cold-committed`: a cold boot's runtime is committed; hearth-init has not been welcomed.

use std::sync::OnceLock;

/// The environment variable naming the points.
pub const ENV: &str = "HEARTH_TEST_FAILPOINTS";

/// The points this process crashes at (from [`ENV`], read once).
fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| parse(&std::env::var(ENV).unwrap_or_default()))
}

fn parse(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Crashes the agent (SIGKILL to itself, like `kill -9`) when `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        tracing::error!(
            failpoint = name,
            "test failpoint reached: killing the agent"
        );
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_comma_separated() {
        assert_eq!(
            super::parse(" warm-committed,,cold-committed "),
            ["warm-committed", "cold-committed"]
        );
        assert!(super::parse("").is_empty());
    }
}
