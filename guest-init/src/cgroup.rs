//! Where the workload's resource usage is read, and how an out-of-memory kill is detected.
//!
//! - Sandbox: the agent puts init (and so the workload) in a cgroup it created and limited.
//!   init finds that cgroup from `/proc/self/cgroup` and `/proc/self/mountinfo` before it
//!   switches root, and keeps directory handles to it. Hosts may be pure cgroup v2 (`memory.*`,
//!   `cpu.stat`, `memory.events`) or hybrid with v1 controllers (`memory.usage_in_bytes`,
//!   `cpuacct.*`, `memory.oom_control`): each figure is read from whichever exists.
//! - microVM: init mounts cgroup2, creates a `workload` cgroup (with `memory.max` when the spec
//!   has a memory limit) and spawns the workload into it. Without cgroup support it falls back
//!   to the VM-wide figures of `/proc`.
//!
//! An OOM kill shows as a rise of the `oom_kill` counter (`memory.events` on v2,
//! `memory.oom_control` on v1, `/proc/vmstat` for the whole VM) over its value at start.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Read as _},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::{fcntl::OFlag, sys::stat::Mode as FileMode};

/// One line of `/proc/self/mountinfo` (the fields this module needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The root of the mount within its filesystem.
    pub root: String,
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type.
    pub fstype: String,
    /// Per-superblock options (for cgroup v1: the controllers).
    pub super_options: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 3 {
                return None;
            }
            Some(MountEntry {
                root: unescape(l[3]),
                mount_point: unescape(l[4]),
                fstype: r[0].to_owned(),
                super_options: r[2].split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// One line of `/proc/self/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupEntry {
    /// Hierarchy id (0 for the v2 hierarchy).
    pub hierarchy: u32,
    /// v1 controllers (empty for v2).
    pub controllers: Vec<String>,
    /// Path within the hierarchy.
    pub path: String,
}

/// Parses `/proc/self/cgroup`; malformed lines are skipped.
pub fn parse_proc_cgroup(text: &str) -> Vec<CgroupEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(3, ':');
            let hierarchy = f.next()?.parse().ok()?;
            let controllers = f
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            let path = f.next()?.to_owned();
            Some(CgroupEntry {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// The directories of this process's cgroups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Located {
    /// The v2 cgroup directory, if a cgroup2 hierarchy is mounted.
    pub v2: Option<PathBuf>,
    /// v1 controller name → cgroup directory.
    pub v1: BTreeMap<String, PathBuf>,
}

fn join_below(mount: &MountEntry, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path.strip_prefix('/')?
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest.trim_start_matches('/')
    };
    Some(Path::new(&mount.mount_point).join(rel))
}

/// Finds the directories of the cgroups in `cgroups` among `mounts`.
///
/// A process in a hierarchy's root cgroup has no cgroup of its own there (the root's figures
/// are the whole host's): such entries are left out.
pub fn locate(mounts: &[MountEntry], cgroups: &[CgroupEntry]) -> Located {
    let mut located = Located::default();
    for cg in cgroups.iter().filter(|c| c.path != "/") {
        if cg.hierarchy == 0 && cg.controllers.is_empty() {
            located.v2 = mounts
                .iter()
                .filter(|m| m.fstype == "cgroup2")
                .find_map(|m| join_below(m, &cg.path));
            continue;
        }
        for c in &cg.controllers {
            let dir = mounts
                .iter()
                .filter(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == c))
                .find_map(|m| join_below(m, &cg.path));
            if let Some(dir) = dir {
                located.v1.insert(c.clone(), dir);
            }
        }
    }
    located
}

/// Why the workload cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file or directory could not be read, created or written.
    #[error("Cannot {what} {path}")]
    Io {
        /// What init tried.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    V1,
    V2,
}

/// A cgroup directory kept open across the switch of root.
#[derive(Debug, Clone)]
struct Dir {
    fd: Arc<OwnedFd>,
    flavor: Flavor,
}

impl Dir {
    fn open(path: &Path, flavor: Flavor) -> io::Result<Self> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            FileMode::empty(),
        )?;
        Ok(Self {
            fd: Arc::new(fd),
            flavor,
        })
    }

    fn file(&self, name: &str, flags: OFlag) -> io::Result<File> {
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            name,
            flags | OFlag::O_CLOEXEC,
            FileMode::empty(),
        )?;
        Ok(File::from(fd))
    }

    fn read(&self, name: &str) -> io::Result<String> {
        let mut s = String::new();
        self.file(name, OFlag::O_RDONLY)?
            .take(1 << 20)
            .read_to_string(&mut s)?;
        Ok(s)
    }

    fn has(&self, name: &str) -> bool {
        self.file(name, OFlag::O_RDONLY).is_ok()
    }
}

/// The value of `key` in a flat keyed file (`key value` lines).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn single(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Resource usage at one moment (absent figures are 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time, microseconds.
    pub cpu_usage_micros: u64,
    /// User CPU time, microseconds.
    pub cpu_user_micros: u64,
    /// System CPU time, microseconds.
    pub cpu_system_micros: u64,
    /// Memory in use, bytes (including page cache).
    pub memory_used_bytes: u64,
    /// Page cache, bytes.
    pub memory_cache_bytes: u64,
    /// Memory limit, bytes (0 = none).
    pub memory_limit_bytes: u64,
    /// Processes.
    pub process_count: u32,
}

/// The cgroups the workload's usage is read from and its OOM kills counted in.
#[derive(Debug, Default)]
pub struct Cgroups {
    memory: Option<Dir>,
    cpu: Option<Dir>,
    pids: Option<Dir>,
    /// `cgroup.procs` files a spawned child writes itself into.
    join: Vec<Arc<OwnedFd>>,
    /// Fall back to VM-wide figures from /proc (microVM without usable cgroups).
    vm_wide: bool,
    oom_baseline: u64,
}

/// USER_HZ: the unit of `cpuacct.stat` and `/proc/stat`.
const USER_HZ: u64 = 100;

impl Cgroups {
    /// Sandbox: init's own cgroups, found before the switch of root.
    pub fn sandbox() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let located = locate(
            &parse_mountinfo(&read("/proc/self/mountinfo")),
            &parse_proc_cgroup(&read("/proc/self/cgroup")),
        );
        tracing::debug!(?located, "cgroups");
        let v2 = located
            .v2
            .as_deref()
            .and_then(|p| Dir::open(p, Flavor::V2).ok());
        let v1 = |c: &str| {
            located
                .v1
                .get(c)
                .and_then(|p| Dir::open(p, Flavor::V1).ok())
        };
        let pick = |v2_file: &str, v1_controller: &str| {
            v2.clone()
                .filter(|d| d.has(v2_file))
                .or_else(|| v1(v1_controller))
        };
        let mut cg = Self {
            memory: pick("memory.current", "memory"),
            cpu: pick("cpu.stat", "cpuacct"),
            pids: pick("pids.current", "pids"),
            join: Vec::new(),
            vm_wide: false,
            oom_baseline: 0,
        };
        cg.oom_baseline = cg.oom_kills_raw();
        cg
    }

    /// microVM: a `workload` cgroup under the cgroup2 root mounted at `/sys/fs/cgroup` (after
    /// the switch of root), limited to `memory_limit` bytes when not 0.
    pub fn vm(memory_limit: u64) -> Result<Self, CgroupError> {
        let root = Path::new("/sys/fs/cgroup");
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| CgroupError::Io { what, path, source }
        };
        let available = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(io("read", &root.join("cgroup.controllers")))?;
        for c in available.split_whitespace() {
            if matches!(c, "memory" | "cpu" | "pids") {
                std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}"))
                    .map_err(io("enable controllers in", root))?;
            }
        }
        let dir = root.join("workload");
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("create", &dir)(e)),
        }
        if memory_limit > 0 {
            std::fs::write(dir.join("memory.max"), memory_limit.to_string())
                .map_err(io("set memory.max of", &dir))?;
        }
        let d = Dir::open(&dir, Flavor::V2).map_err(io("open", &dir))?;
        let procs = d
            .file("cgroup.procs", OFlag::O_WRONLY)
            .map_err(io("open cgroup.procs of", &dir))?;
        let has = |f: &str| d.has(f).then(|| d.clone());
        let mut cg = Self {
            memory: has("memory.current"),
            cpu: has("cpu.stat"),
            pids: has("pids.current"),
            join: vec![Arc::new(OwnedFd::from(procs))],
            vm_wide: true,
            oom_baseline: 0,
        };
        cg.oom_baseline = cg.oom_kills_raw();
        Ok(cg)
    }

    /// microVM without cgroup support: VM-wide figures only.
    pub fn vm_wide() -> Self {
        let mut cg = Self {
            vm_wide: true,
            ..Self::default()
        };
        cg.oom_baseline = cg.oom_kills_raw();
        cg
    }

    /// The `cgroup.procs` files a spawned child joins.
    pub fn join_fds(&self) -> Vec<Arc<OwnedFd>> {
        self.join.clone()
    }

    fn oom_kills_raw(&self) -> u64 {
        let from_cgroup = self.memory.as_ref().and_then(|d| match d.flavor {
            Flavor::V2 => d
                .read("memory.events")
                .ok()
                .and_then(|t| keyed(&t, "oom_kill")),
            Flavor::V1 => d
                .read("memory.oom_control")
                .ok()
                .and_then(|t| keyed(&t, "oom_kill")),
        });
        let vm = || {
            std::fs::read_to_string("/proc/vmstat")
                .ok()
                .and_then(|t| keyed(&t, "oom_kill"))
        };
        match (from_cgroup, self.vm_wide) {
            // In a VM every OOM kill is the instance's.
            (Some(c), true) => c.max(vm().unwrap_or(0)),
            (Some(c), false) => c,
            (None, true) => vm().unwrap_or(0),
            (None, false) => 0,
        }
    }

    /// OOM kills since init started watching.
    pub fn oom_kills(&self) -> u64 {
        self.oom_kills_raw().saturating_sub(self.oom_baseline)
    }

    /// Current usage.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        match &self.memory {
            Some(d) if d.flavor == Flavor::V2 => {
                u.memory_used_bytes = d
                    .read("memory.current")
                    .ok()
                    .and_then(|t| single(&t))
                    .unwrap_or(0);
                u.memory_cache_bytes = d
                    .read("memory.stat")
                    .ok()
                    .and_then(|t| keyed(&t, "file"))
                    .unwrap_or(0);
                u.memory_limit_bytes = d
                    .read("memory.max")
                    .ok()
                    .and_then(|t| single(&t))
                    .unwrap_or(0);
            }
            Some(d) => {
                u.memory_used_bytes = d
                    .read("memory.usage_in_bytes")
                    .ok()
                    .and_then(|t| single(&t))
                    .unwrap_or(0);
                u.memory_cache_bytes = d
                    .read("memory.stat")
                    .ok()
                    .and_then(|t| keyed(&t, "total_cache").or_else(|| keyed(&t, "cache")))
                    .unwrap_or(0);
                // v1 reports "no limit" as a huge page-aligned number.
                u.memory_limit_bytes = d
                    .read("memory.limit_in_bytes")
                    .ok()
                    .and_then(|t| single(&t))
                    .filter(|l| *l < 1 << 60)
                    .unwrap_or(0);
            }
            None => {}
        }
        if self.vm_wide
            && let Ok(t) = std::fs::read_to_string("/proc/meminfo")
        {
            {
                let kib = |k: &str| {
                    t.lines()
                        .find_map(|l| {
                            let rest = l.strip_prefix(k)?.strip_prefix(':')?;
                            rest.split_whitespace().next()?.parse::<u64>().ok()
                        })
                        .unwrap_or(0)
                        * 1024
                };
                if self.memory.is_none() {
                    u.memory_used_bytes = kib("MemTotal").saturating_sub(kib("MemAvailable"));
                    u.memory_cache_bytes = kib("Cached");
                }
                if u.memory_limit_bytes == 0 {
                    u.memory_limit_bytes = kib("MemTotal");
                }
            }
        }
        match &self.cpu {
            Some(d) if d.flavor == Flavor::V2 => {
                if let Ok(t) = d.read("cpu.stat") {
                    u.cpu_usage_micros = keyed(&t, "usage_usec").unwrap_or(0);
                    u.cpu_user_micros = keyed(&t, "user_usec").unwrap_or(0);
                    u.cpu_system_micros = keyed(&t, "system_usec").unwrap_or(0);
                }
            }
            Some(d) => {
                u.cpu_usage_micros = d
                    .read("cpuacct.usage")
                    .ok()
                    .and_then(|t| single(&t))
                    .unwrap_or(0)
                    / 1000;
                if let Ok(t) = d.read("cpuacct.stat") {
                    let tick = 1_000_000 / USER_HZ;
                    u.cpu_user_micros = keyed(&t, "user").unwrap_or(0) * tick;
                    u.cpu_system_micros = keyed(&t, "system").unwrap_or(0) * tick;
                }
            }
            None if self.vm_wide => {
                if let Some((user, system)) = std::fs::read_to_string("/proc/stat")
                    .ok()
                    .and_then(|t| proc_stat_cpu(&t))
                {
                    let tick = 1_000_000 / USER_HZ;
                    u.cpu_user_micros = user * tick;
                    u.cpu_system_micros = system * tick;
                    u.cpu_usage_micros = u.cpu_user_micros + u.cpu_system_micros;
                }
            }
            None => {
                // No CPU cgroup of its own: what init's PID namespace used, from /proc.
                let (user, system) = pidns_cpu_ticks();
                let tick = 1_000_000 / USER_HZ;
                u.cpu_user_micros = user * tick;
                u.cpu_system_micros = system * tick;
                u.cpu_usage_micros = u.cpu_user_micros + u.cpu_system_micros;
            }
        }
        u.process_count = self
            .pids
            .as_ref()
            .and_then(|d| d.read("pids.current").ok())
            .and_then(|t| single(&t))
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_else(count_processes);
        u
    }
}

/// (user + nice, system + irq + softirq) ticks of the `cpu` line of `/proc/stat`.
fn proc_stat_cpu(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some((at(0) + at(1), at(2) + at(5) + at(6)))
}

/// CPU ticks (user, system) of every live process in `/proc` plus what init's reaped
/// descendants used (its `cutime`/`cstime`).
fn pidns_cpu_ticks() -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    let (mut user, mut system) = (0, 0);
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (u, s) = stat_cpu_ticks(&stat, pid == "1");
        user += u;
        system += s;
    }
    (user, system)
}

/// (utime [+ cutime], stime [+ cstime]) of one `/proc/PID/stat`.
fn stat_cpu_ticks(stat: &str, with_children: bool) -> (u64, u64) {
    // Fields after the command name (which may hold spaces and parentheses) start at `state`.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (0, 0);
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    if with_children {
        (at(11) + at(13), at(12) + at(14))
    } else {
        (at(11), at(12))
    }
}

/// Processes visible in `/proc` (init's PID namespace).
pub fn count_processes() -> u32 {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        })
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 25 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
36 25 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
37 25 0:33 /nested /sys/fs/cgroup/pids rw shared:17 - cgroup cgroup rw,pids
40 25 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw
garbage line
";

    const CGROUP: &str = "\
12:pids:/nested/agent/i1
4:memory:/process_api/abc/i1
2:cpu,cpuacct:/i1
0::/i1
junk
";

    #[test]
    fn mountinfo_and_cgroup_files() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[5].mount_point, "/mnt/with space");
        assert_eq!(mounts[2].super_options, vec!["rw", "memory"]);
        let cgroups = parse_proc_cgroup(CGROUP);
        assert_eq!(cgroups.len(), 4);
        assert_eq!(cgroups[2].controllers, vec!["cpu", "cpuacct"]);
        let located = locate(&mounts, &cgroups);
        assert_eq!(located.v2, Some(PathBuf::from("/sys/fs/cgroup/unified/i1")));
        assert_eq!(
            located.v1["memory"],
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/i1")
        );
        assert_eq!(
            located.v1["cpuacct"],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/i1")
        );
        // The pids hierarchy is mounted from /nested: the path is relative to that.
        assert_eq!(
            located.v1["pids"],
            PathBuf::from("/sys/fs/cgroup/pids/agent/i1")
        );
    }

    #[test]
    fn keyed_files() {
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(1));
        assert_eq!(keyed(events, "nope"), None);
        let control = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(keyed(control, "oom_kill"), Some(2));
        assert_eq!(
            proc_stat_cpu("cpu  10 1 5 100 0 2 3 0 0 0\ncpu0 1 1 1 1\n"),
            Some((11, 10))
        );
    }

    #[test]
    fn root_cgroups_are_not_the_instance_s() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let located = locate(&mounts, &parse_proc_cgroup("2:cpu,cpuacct:/\n0::/\n"));
        assert_eq!(located, Located::default());
    }

    #[test]
    fn stat_cpu_fields() {
        let stat = "1 (my (odd) init) S 0 1 1 0 -1 4194560 100 0 0 0 7 3 40 20 20 0 1 0 5";
        assert_eq!(stat_cpu_ticks(stat, false), (7, 3));
        assert_eq!(stat_cpu_ticks(stat, true), (47, 23));
        assert_eq!(stat_cpu_ticks("garbage", true), (0, 0));
    }

    #[test]
    fn this_process_cgroups_are_found() {
        // Whatever the host's layout, parsing the real files must work and find something.
        let cg = Cgroups::sandbox();
        let u = cg.usage();
        assert!(u.process_count > 0);
    }
}
