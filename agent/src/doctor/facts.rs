//! What the doctor learns from the host: plain data, gathered once by [`gather`], so that
//! [`super::checks`] can judge it as a pure function (and be tested with made-up hosts).

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::sys;
use crate::config::Config;

/// Everything the checks look at.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Facts {
    /// The doctor runs as root (euid 0).
    pub root: bool,
    /// `uname -r`.
    pub kernel_release: String,
    /// The CPU flags that mean hardware virtualization (`vmx`, `svm`) seen in `/proc/cpuinfo`.
    pub cpu_virt_flags: Vec<String>,
    /// KVM modules loaded (`/sys/module/<name>`): of `kvm`, `kvm_intel`, `kvm_amd`, `kvm_pvm`.
    pub kvm_modules: Vec<String>,
    /// `/dev/kvm`.
    pub kvm: DeviceFacts,
    /// `KVM_GET_API_VERSION` when `/dev/kvm` opened.
    pub kvm_api_version: Option<i32>,
    /// `/sys/kernel/btf/vmlinux` is readable.
    pub btf: bool,
    /// The TCX probe (load the embedded programs, attach one with TCX to `lo` of a throwaway
    /// network namespace): `None` when it was not run (not root), else its outcome.
    pub tcx: Option<Result<(), String>>,
    /// The cgroup hierarchies.
    pub cgroups: CgroupFacts,
    /// `/dev/net/tun`.
    pub tun: DeviceFacts,
    /// `/dev/loop-control` (the sandbox's image mounts).
    pub loop_control: DeviceFacts,
    /// The directory that holds `bpf_root` (or `bpf_root` itself when it exists) is on bpffs.
    pub bpffs: Option<bool>,
    /// The directory checked for bpffs.
    pub bpffs_path: PathBuf,
    /// Free space where the image cache lives.
    pub disk: Option<DiskFacts>,
    /// Files the config names, with what is there.
    pub files: Vec<FileFacts>,
    /// `/proc/sys/kernel/io_uring_disabled` (0 = enabled).
    pub io_uring_disabled: Option<u8>,
    /// `nft` is on PATH (the NAT rules).
    pub nft: bool,
    /// systemd is the running service manager (`/run/systemd/system`), and its version.
    pub systemd: Option<Option<u32>>,
    /// The id of the group `api.socket_group` names, if it is set and the group exists.
    pub socket_gid: Option<u32>,
}

/// A device node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceFacts {
    /// It exists and is a character device.
    pub present: bool,
    /// Opening it read-write failed with this (when present).
    pub open_error: Option<String>,
}

/// The cgroup setup.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CgroupFacts {
    /// `/sys/fs/cgroup` itself is cgroup2 (a pure v2 host).
    pub pure_v2: bool,
    /// Controllers available in the v2 hierarchy (its root `cgroup.controllers`).
    pub v2_controllers: Vec<String>,
    /// v1 controllers that have a mounted hierarchy.
    pub v1_controllers: Vec<String>,
}

/// Free disk space.
#[derive(Debug, Clone, Serialize)]
pub struct DiskFacts {
    /// The directory measured (the image cache, or its nearest existing parent).
    pub path: PathBuf,
    /// Bytes available to unprivileged writers (`f_bavail`).
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
}

/// A file the config points at.
#[derive(Debug, Clone, Serialize)]
pub struct FileFacts {
    /// The config key.
    pub key: &'static str,
    /// The path.
    pub path: PathBuf,
    /// A regular file is there.
    pub exists: bool,
    /// It has an execute bit.
    pub executable: bool,
    /// It must be executable (a program, not data).
    pub program: bool,
}

/// One mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type.
    pub fstype: String,
    /// Super block options (for cgroup v1: the controllers).
    pub super_options: Vec<String>,
}

/// Parses `/proc/self/mountinfo` (see proc(5)): the mount point is field 5, then optional
/// fields up to `-`, then the type, the source and the super options.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let mut rest = fields.skip_while(|f| *f != "-");
            rest.next()?;
            let fstype = rest.next()?;
            let _source = rest.next()?;
            let super_options = rest.next().unwrap_or("");
            Some(Mount {
                mount_point: unescape_octal(mount_point),
                fstype: fstype.to_owned(),
                super_options: super_options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The v1 controllers the agent may use, found in cgroup (v1) mounts.
pub fn v1_controllers(mounts: &[Mount]) -> Vec<String> {
    const KNOWN: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "cpuset"];
    let mut found: Vec<String> = mounts
        .iter()
        .filter(|m| m.fstype == "cgroup")
        .flat_map(|m| m.super_options.iter())
        .filter(|o| KNOWN.contains(&o.as_str()))
        .cloned()
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The `vmx`/`svm` flags in `/proc/cpuinfo` text.
pub fn cpu_virt_flags(cpuinfo: &str) -> Vec<String> {
    let mut found: Vec<String> = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .filter(|f| *f == "vmx" || *f == "svm")
        .map(str::to_owned)
        .collect();
    found.sort();
    found.dedup();
    found
}

fn device(path: &str) -> DeviceFacts {
    let present = std::fs::metadata(path)
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false);
    let open_error = present
        .then(|| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .err()
                .map(|e| e.to_string())
        })
        .flatten();
    DeviceFacts {
        present,
        open_error,
    }
}

/// The nearest existing ancestor of `path` (itself included).
fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

fn file(key: &'static str, path: &Path, program: bool) -> FileFacts {
    let meta = std::fs::metadata(path).ok().filter(|m| m.is_file());
    FileFacts {
        key,
        path: path.to_owned(),
        exists: meta.is_some(),
        executable: meta.is_some_and(|m| m.permissions().mode() & 0o111 != 0),
        program,
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(program).is_file()))
}

/// `systemctl --version`'s first line is `systemd NNN (...)`.
pub fn parse_systemd_version(text: &str) -> Option<u32> {
    text.lines()
        .next()?
        .strip_prefix("systemd ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn systemd() -> Option<Option<u32>> {
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    let version = std::process::Command::new("systemctl")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| parse_systemd_version(&String::from_utf8_lossy(&o.stdout)));
    Some(version)
}

/// Reads the host. Probes that need root (TCX) are skipped without it.
pub fn gather(cfg: &Config) -> Facts {
    let root = nix::unistd::geteuid().is_root();
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_modules = ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .map(str::to_owned)
        .collect();
    let kvm = device("/dev/kvm");
    let kvm_api_version = (kvm.present && kvm.open_error.is_none())
        .then(|| sys::kvm_api_version(Path::new("/dev/kvm")).ok())
        .flatten();
    let btf = std::fs::File::open("/sys/kernel/btf/vmlinux").is_ok();
    let tcx = root.then(sys::probe_tcx);

    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    let pure_v2 = mounts
        .iter()
        .any(|m| m.mount_point == "/sys/fs/cgroup" && m.fstype == "cgroup2");
    let v2_root = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| PathBuf::from(&m.mount_point));
    let v2_controllers = v2_root
        .and_then(|r| std::fs::read_to_string(r.join("cgroup.controllers")).ok())
        .map(|t| t.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let cgroups = CgroupFacts {
        pure_v2,
        v2_controllers,
        v1_controllers: v1_controllers(&mounts),
    };

    let bpffs_path = if cfg.bpf_root.exists() {
        cfg.bpf_root.clone()
    } else {
        cfg.bpf_root
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| cfg.bpf_root.clone())
    };
    let bpffs = nix::sys::statfs::statfs(&bpffs_path)
        .ok()
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);

    let images = cfg.images_dir();
    let disk = existing_ancestor(&images).and_then(|p| {
        let s = nix::sys::statvfs::statvfs(p).ok()?;
        let frag = s.fragment_size() as u64;
        Some(DiskFacts {
            path: p.to_owned(),
            free_bytes: s.blocks_available() as u64 * frag,
            total_bytes: s.blocks() as u64 * frag,
        })
    });

    let mut files = vec![file("sandbox.init_path", &cfg.sandbox.init_path, true)];
    files.push(file("microvm.vmm_path", &cfg.microvm.vmm_path, true));
    files.push(file("microvm.kernel", &cfg.microvm.kernel, false));
    if !cfg.microvm.initrd.as_os_str().is_empty() {
        files.push(file("microvm.initrd", &cfg.microvm.initrd, false));
    }

    let io_uring_disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let group = &cfg.api.socket_group;
    let socket_gid = (!group.is_empty())
        .then(|| nix::unistd::Group::from_name(group).ok().flatten())
        .flatten()
        .map(|g| g.gid.as_raw());

    Facts {
        root,
        kernel_release,
        cpu_virt_flags: cpu_virt_flags(&cpuinfo),
        kvm_modules,
        kvm,
        kvm_api_version,
        btf,
        tcx,
        cgroups,
        tun: device("/dev/net/tun"),
        loop_control: device("/dev/loop-control"),
        bpffs,
        bpffs_path,
        disk,
        files,
        io_uring_disabled,
        nft: on_path("nft"),
        systemd: systemd(),
        socket_gid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_of_a_hybrid_host() {
        let text = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 31 0:30 / /sys/fs/cgroup/memory rw shared:13 - cgroup cgroup rw,memory
36 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw shared:14 - cgroup cgroup rw,cpu,cpuacct
37 31 0:32 / /sys/fs/cgroup/pids rw shared:15 - cgroup cgroup rw,pids
40 25 0:35 / /sys/fs/bpf rw shared:16 - bpf bpf rw,mode=700
41 30 0:36 / /mnt/with\\040space rw - ext4 /dev/sda1 rw
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 8);
        assert_eq!(mounts[2].fstype, "cgroup2");
        assert_eq!(mounts[2].mount_point, "/sys/fs/cgroup/unified");
        assert_eq!(mounts[7].mount_point, "/mnt/with space");
        assert_eq!(
            v1_controllers(&mounts),
            ["cpu", "cpuacct", "memory", "pids"]
        );
    }

    #[test]
    fn mountinfo_with_optional_fields_and_garbage() {
        let text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\nnonsense\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_point, "/mnt2");
        assert_eq!(mounts[0].fstype, "ext3");
    }

    #[test]
    fn cpu_flags() {
        let info = "processor: 0\nflags\t\t: fpu vme sse2 vmx ept\nprocessor: 1\nflags: fpu vmx\n";
        assert_eq!(cpu_virt_flags(info), ["vmx"]);
        assert!(cpu_virt_flags("flags: fpu sse2 hypervisor\n").is_empty());
        assert_eq!(cpu_virt_flags("flags: svm npt\n"), ["svm"]);
    }

    #[test]
    fn systemd_version() {
        assert_eq!(
            parse_systemd_version("systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT\n"),
            Some(252)
        );
        assert_eq!(parse_systemd_version("systemd 257 (257.4-1)\n"), Some(257));
        assert_eq!(parse_systemd_version("not systemd\n"), None);
        assert_eq!(parse_systemd_version(""), None);
    }
}
