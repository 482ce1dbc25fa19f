//! What install and uninstall do to the running system besides files: the `hearth` group,
//! systemd, and finding instance processes that still run from an install.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::util;

/// systemd is the running service manager (sd_booted(3): `/run/systemd/system` exists).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The installed systemd's version (`systemctl --version`: `systemd NNN (...)`), running or
/// not: it decides which unit keys are understood.
pub fn systemd_version() -> Option<u32> {
    let out = Command::new("systemctl").arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .strip_prefix("systemd ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether the unit is active.
pub fn unit_active() -> bool {
    Command::new("systemctl")
        .args(["is-active", "--quiet", super::UNIT])
        .status()
        .is_ok_and(|s| s.success())
}

fn group_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["group", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Creates the system group `name` unless it exists; true when it was created.
pub fn ensure_group(name: &str) -> anyhow::Result<bool> {
    if group_exists(name) {
        println!("  unchanged group {name}");
        return Ok(false);
    }
    util::run(Command::new("groupadd").args(["--system", name]))
        .with_context(|| format!("Cannot create the group {name}"))?;
    println!("  created   group {name} (its members may use the control socket)");
    Ok(true)
}

/// Removes the group `name` if it exists; true when it was removed.
pub fn remove_group(name: &str) -> anyhow::Result<bool> {
    if !group_exists(name) {
        return Ok(false);
    }
    util::run(Command::new("groupdel").arg(name))
        .with_context(|| format!("Cannot remove the group {name}"))?;
    Ok(true)
}

/// The pids of processes whose executable is one of `programs` (also when the file was
/// replaced or removed since they started).
pub fn processes_of(programs: &[PathBuf]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            let exe = exe.to_string_lossy();
            let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
            programs.iter().any(|p| Path::new(exe) == p).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The agent's directories as the config file at `path` sets them (absent keys: not listed).
pub fn configured_dirs(path: &Path) -> Vec<(&'static str, PathBuf)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(value) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let get = |table: Option<&toml::Table>, key: &str| {
        table?
            .get(key)?
            .as_str()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    let images = value.get("images").and_then(|v| v.as_table());
    [
        ("state_dir", get(Some(&value), "state_dir")),
        ("run_dir", get(Some(&value), "run_dir")),
        ("images.dir", get(images, "dir")),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k, v?)))
    .collect()
}
