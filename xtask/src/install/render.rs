//! What install writes, as bytes: the agent's config (its own defaults with the install's
//! values set), the systemd unit, the init initramfs; and the checks of the inputs (a kernel
//! image, a static hearth-init).

use std::path::Path;

use anyhow::{Context as _, bail};

use super::Paths;
use crate::e2e::cpio;

/// The unit template (placeholders `@NAME@`).
pub const UNIT_TEMPLATE: &str = include_str!("../../assets/hearth-agent.service");
/// The first systemd with `DelegateSubgroup=`.
pub const SYSTEMD_DELEGATE_SUBGROUP: u32 = 254;

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Sets `key` in `[section]` (`""` = the top level) of TOML text that has one `key = value`
/// line for it, keeping every comment and every other line as it is.
fn set_key(text: &str, section: &str, key: &str, value: &str) -> anyhow::Result<String> {
    let mut current = String::new();
    let mut found = false;
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            current = t.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
        }
        let is_key = !t.starts_with('#')
            && t.split_once('=')
                .is_some_and(|(k, _)| k.trim() == key && current == section);
        if is_key && !found {
            out.push_str(&format!("{key} = {value}"));
            found = true;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !found {
        bail!(
            "The agent's defaults have no `{key}` in [{section}]: xtask/src/install does not \
             match this hearth-agent"
        );
    }
    Ok(out)
}

/// The config install writes: `defaults` (what `hearth-agent print-defaults` printed) with the
/// runtime, the paths of this install and the socket group set.
pub fn config(defaults: &str, paths: &Paths, runtime: &str) -> anyhow::Result<String> {
    let path = |p: &Path| toml_str(&p.to_string_lossy());
    let mut text = format!(
        "# Written by `cargo xtask install` (docs/install.md): the agent's defaults, with the\n\
         # runtime, the installed paths and the socket group set. Later installs never\n\
         # overwrite this file; they show how it differs from what they would write.\n{defaults}"
    );
    for (section, key, value) in [
        ("", "runtime", toml_str(runtime)),
        ("api", "socket_group", toml_str(super::GROUP)),
        ("sandbox", "init_path", path(&paths.init())),
        ("microvm", "vmm_path", path(&paths.vmm())),
        ("microvm", "kernel", path(&paths.kernel())),
        ("microvm", "initrd", path(&paths.initrd())),
    ] {
        text = set_key(&text, section, key, &value)?;
    }
    Ok(text)
}

/// The systemd unit for this install. `systemd` is the host's systemd version, if known:
/// from 254 on the agent starts in its `agent` leaf (`DelegateSubgroup=`).
pub fn unit(paths: &Paths, systemd: Option<u32>) -> String {
    let subgroup = match systemd {
        Some(v) if v >= SYSTEMD_DELEGATE_SUBGROUP => "DelegateSubgroup=agent".to_owned(),
        Some(v) => format!(
            "# (DelegateSubgroup=agent left out: systemd {v} predates it; see docs/install.md)"
        ),
        None => "# (DelegateSubgroup=agent left out: no systemd found at install time)".to_owned(),
    };
    UNIT_TEMPLATE
        .replace("@BINDIR@", &paths.bin_dir().to_string_lossy())
        .replace("@CONFIG@", &paths.config().to_string_lossy())
        .replace("@STATE_DIR@", &paths.state_dir().to_string_lossy())
        .replace("@DELEGATE_SUBGROUP@", &subgroup)
}

/// The initramfs of every microVM: hearth-init as `/init`, the mount points it uses, and
/// `/dev/console`. The same bytes for the same hearth-init.
pub fn initramfs(init: &[u8]) -> Vec<u8> {
    let mut a = cpio::Archive::new();
    for d in ["dev", "proc", "sys", "run", "tmp", "mnt"] {
        a.dir(d, 0o755);
    }
    a.char_dev("dev/console", 0o600, 5, 1)
        .file("init", 0o755, init);
    a.finish()
}

const ELF_MAGIC: &[u8] = b"\x7fELF";
const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A 64-bit little-endian x86-64 ELF.
fn is_x86_64_elf(b: &[u8]) -> bool {
    b.starts_with(ELF_MAGIC)
        && b.get(4) == Some(&2)
        && b.get(5) == Some(&1)
        && u16_at(b, 18) == Some(EM_X86_64)
}

/// Checks that `bytes` is a kernel hearth-vmm loads: an x86-64 ELF (`vmlinux`) or a bzImage.
pub fn check_kernel(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let bz = bytes.get(0x202..0x206) == Some(b"HdrS");
    if !is_x86_64_elf(bytes) && !bz {
        bail!(
            "{} is not a guest kernel: neither an x86-64 ELF (vmlinux) nor a bzImage",
            path.display()
        );
    }
    Ok(())
}

/// Checks that `bytes` is a static x86-64 executable (no program interpreter), as the
/// initramfs's `/init` and the sandbox's PID 1 must be.
pub fn check_static(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if !is_x86_64_elf(bytes) {
        bail!("{} is not an x86-64 ELF executable", path.display());
    }
    let parse = || -> Option<bool> {
        let phoff = usize::try_from(u64_at(bytes, 0x20)?).ok()?;
        let phentsize = usize::from(u16_at(bytes, 0x36)?);
        let phnum = usize::from(u16_at(bytes, 0x38)?);
        let mut interp = false;
        for i in 0..phnum {
            interp |= u32_at(bytes, phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP;
        }
        Some(interp)
    };
    match parse() {
        None => bail!("{} has a truncated ELF header", path.display()),
        Some(true) => bail!(
            "{} is dynamically linked; hearth-init must be the static musl build (cargo build \
             -p hearth-init --release --target x86_64-unknown-linux-musl)",
            path.display()
        ),
        Some(false) => Ok(()),
    }
}

/// Reads a file the install needs.
pub fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("Cannot read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const DEFAULTS: &str = "# top\nruntime = \"microvm\"\n\n[api]\n# socket_group = \"x\"\nsocket_group = \"\"\n\n[sandbox]\ninit_path = \"/usr/libexec/hearth/hearth-init\"\n\n[microvm]\nvmm_path = \"a\"\nkernel = \"b\"\ninitrd = \"\"\nkernel_cmdline = \"\"\n";

    #[test]
    fn config_sets_only_the_install_keys() {
        let paths = Paths::new(PathBuf::from("/opt/h"));
        let c = config(DEFAULTS, &paths, "sandbox").unwrap();
        assert!(c.contains("\nruntime = \"sandbox\"\n"));
        assert!(c.contains("# socket_group = \"x\"\nsocket_group = \"hearth\"\n"));
        assert!(c.contains("init_path = \"/opt/h/libexec/hearth/hearth-init\"\n"));
        assert!(c.contains("vmm_path = \"/opt/h/libexec/hearth/hearth-vmm\"\n"));
        assert!(c.contains("kernel = \"/var/lib/hearth/guest/vmlinux\"\n"));
        assert!(c.contains("initrd = \"/var/lib/hearth/guest/initramfs.cpio\"\n"));
        assert!(c.contains("kernel_cmdline = \"\"\n"));
        assert!(c.contains("# top\n"));
        let err = config("runtime = \"microvm\"\n", &paths, "sandbox").unwrap_err();
        assert!(err.to_string().contains("socket_group"), "{err}");
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn unit_placeholders_are_all_filled() {
        let paths = Paths::new(PathBuf::from("/usr/local"));
        for v in [None, Some(252), Some(257)] {
            let u = unit(&paths, v);
            assert!(!u.contains('@'), "{u}");
            assert!(u.contains(
                "ExecStart=/usr/local/bin/hearth-agent --config /etc/hearth/agent.toml\n"
            ));
            assert_eq!(u.contains("\nDelegateSubgroup=agent\n"), v == Some(257));
        }
    }

    #[test]
    fn kernel_and_static_checks() {
        let p = Path::new("k");
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        check_kernel(p, &elf).unwrap();
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        check_kernel(p, &bz).unwrap();
        assert!(check_kernel(p, b"#!/bin/sh\n").is_err());
        // An ELF with no program headers is static; /bin/true is not.
        check_static(p, &elf).unwrap();
        let dynamic = std::fs::read("/bin/true").unwrap();
        let err = check_static(p, &dynamic).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        let mut truncated = elf.clone();
        truncated[0x38] = 3;
        truncated[0x20] = 0xff;
        assert!(check_static(p, &truncated).is_err());
    }
}
