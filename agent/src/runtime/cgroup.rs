//! Instance cgroups, beneath the agent's own cgroup.
//!
//! Layout: `<agent's cgroup>/<parent>/<instance id>` in every hierarchy the agent uses. On a
//! pure cgroup v2 host that is one directory; on a hybrid host (v1 `memory`, `cpu`, `pids`
//! hierarchies, like the build machines) one per controller. The instance cgroups are siblings
//! of nothing the service manager kills when the agent stops (run the agent with
//! `KillMode=process` and `Delegate=yes` under systemd; see `docs/agent.md`), so instances
//! survive an agent restart, and the paths are derivable from the id, so a restarted agent finds
//! them again. An agent that starts in a leaf named [`AGENT_LEAF`] (systemd's
//! `DelegateSubgroup=agent`, see `docs/install.md`) takes the leaf's parent as its own cgroup:
//! that is the leaf it would have moved itself into.
//!
//! Everything works on paths under a root given to [`Layout::detect`], so the layout and limit
//! logic is unit-tested against a temp directory.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The agent's own cgroup could not be determined.
    #[error("Cannot find the agent's own cgroup for {0}")]
    Own(String),
    /// A cgroup file operation failed.
    #[error("Cgroup operation on {path} failed")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Which cgroup interface the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    /// v1 hierarchies per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// Resource limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// CPUs (quota of this many CPUs).
    pub vcpus: u32,
    /// Maximum number of tasks.
    pub pids: u64,
}

const CPU_PERIOD_US: u64 = 100_000;

/// The leaf of its own cgroup the agent runs in on cgroup v2 (the no-internal-processes rule
/// keeps processes out of a cgroup whose controllers are enabled for its children).
pub const AGENT_LEAF: &str = "agent";

/// The cgroup whose subtree the agent manages, from the one it runs in: the parent when it
/// already runs in its [`AGENT_LEAF`], so that a restarted agent (placed there by systemd's
/// `DelegateSubgroup=agent`) finds the same layout.
fn delegated_root(own: &str) -> &str {
    match own.strip_suffix(AGENT_LEAF) {
        Some(parent) if parent.ends_with('/') && parent.len() > 1 => &parent[..parent.len() - 1],
        _ => own,
    }
}

/// The node's cgroup layout: where instance cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The interface.
    pub version: Version,
    /// Per controller (`memory`, `cpu`, `pids`; one entry `""` on v2): the directory under
    /// which instance cgroups are created.
    pub parents: Vec<(String, PathBuf)>,
}

/// Parses `/proc/self/cgroup` text into (controllers, path) pairs.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            Some((
                ctrls
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path.to_owned(),
            ))
        })
        .collect()
}

impl Layout {
    /// Works out the layout from `/proc/self/cgroup` and the mounts under `root`
    /// (`/sys/fs/cgroup`).
    pub fn detect(root: &Path, proc_self_cgroup: &str, parent: &str) -> Result<Self, CgroupError> {
        let entries = parse_proc_cgroup(proc_self_cgroup);
        if root.join("cgroup.controllers").exists() {
            let own = entries
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.clone())
                .ok_or_else(|| CgroupError::Own("the unified hierarchy".into()))?;
            return Ok(Self {
                version: Version::V2,
                parents: vec![(
                    String::new(),
                    root.join(delegated_root(&own).trim_start_matches('/'))
                        .join(parent),
                )],
            });
        }
        let mut parents = Vec::new();
        for ctrl in ["memory", "cpu", "pids"] {
            let own = entries
                .iter()
                .find(|(c, _)| c.iter().any(|x| x == ctrl))
                .map(|(_, p)| p.clone())
                .ok_or_else(|| CgroupError::Own(ctrl.into()))?;
            parents.push((
                ctrl.to_owned(),
                root.join(ctrl)
                    .join(delegated_root(&own).trim_start_matches('/'))
                    .join(parent),
            ));
        }
        Ok(Self {
            version: Version::V1,
            parents,
        })
    }

    /// The host's layout.
    pub fn host(parent: &str) -> Result<Self, CgroupError> {
        let text = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io_err(Path::new("/proc/self/cgroup")))?;
        Self::detect(Path::new("/sys/fs/cgroup"), &text, parent)
    }

    /// The cgroup of instance `id` (not created yet).
    pub fn instance(&self, id: &str) -> InstanceCgroup {
        InstanceCgroup {
            version: self.version,
            dirs: self
                .parents
                .iter()
                .map(|(c, p)| (c.clone(), p.join(id)))
                .collect(),
        }
    }

    /// Creates the parents (and, on v2, enables the controllers for them).
    pub fn prepare(&self) -> Result<(), CgroupError> {
        for (_, p) in &self.parents {
            std::fs::create_dir_all(p).map_err(io_err(p))?;
            if self.version == Version::V2 {
                enable_v2_controllers(p)?;
            }
        }
        Ok(())
    }
}

/// On v2, controllers must be enabled in every ancestor's `cgroup.subtree_control` up to the
/// parent. The agent's own cgroup cannot hold processes and enable controllers at once, so the
/// agent moves itself into a leaf `<own>/agent` first (still inside its own subtree).
fn enable_v2_controllers(parent: &Path) -> Result<(), CgroupError> {
    let own = parent.parent().expect("parent has a parent");
    let leaf = own.join(AGENT_LEAF);
    let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
    if !procs.trim().is_empty() {
        std::fs::create_dir_all(&leaf).map_err(io_err(&leaf))?;
        for pid in procs.lines() {
            // Threads of other processes in our cgroup move too; a vanished pid is fine.
            let _ = std::fs::write(leaf.join("cgroup.procs"), pid);
        }
    }
    for dir in [own, parent] {
        let f = dir.join("cgroup.subtree_control");
        std::fs::write(&f, "+memory +cpu +pids").map_err(io_err(&f))?;
    }
    Ok(())
}

/// One instance's cgroup (a directory per hierarchy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceCgroup {
    /// The interface.
    pub version: Version,
    /// (controller, directory).
    pub dirs: Vec<(String, PathBuf)>,
}

fn write(path: &Path, value: impl AsRef<str>) -> Result<(), CgroupError> {
    std::fs::write(path, value.as_ref()).map_err(io_err(path))
}

fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn subdirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let p = e.path();
                subdirs(&p, out);
                out.push(p);
            }
        }
    }
}

impl InstanceCgroup {
    fn dir(&self, ctrl: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| c == ctrl || c.is_empty())
            .map(|(_, p)| p.as_path())
    }

    /// Creates the directories and writes the limits.
    pub fn create(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (_, d) in &self.dirs {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let quota = u64::from(limits.vcpus) * CPU_PERIOD_US;
        match self.version {
            Version::V1 => {
                let mem = self.dir("memory").expect("v1 layout has memory");
                write(
                    &mem.join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, limits.memory_bytes.to_string())?;
                }
                let cpu = self.dir("cpu").expect("v1 layout has cpu");
                write(&cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
                let pids = self.dir("pids").expect("v1 layout has pids");
                write(&pids.join("pids.max"), limits.pids.to_string())?;
            }
            Version::V2 => {
                let d = self.dir("").expect("v2 layout has one dir");
                write(&d.join("memory.max"), limits.memory_bytes.to_string())?;
                let swap = d.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&d.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
                write(&d.join("pids.max"), limits.pids.to_string())?;
            }
        }
        Ok(())
    }

    /// Moves `pid` into the cgroup (every hierarchy).
    pub fn add(&self, pid: i32) -> io::Result<()> {
        for (_, d) in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Whether the cgroup directories exist.
    pub fn exists(&self) -> bool {
        self.dirs.iter().all(|(_, d)| d.is_dir())
    }

    /// OOM kills in the cgroup and its descendants.
    pub fn oom_kills(&self) -> u64 {
        let (dir, file) = match self.version {
            Version::V1 => (self.dir("memory"), "memory.oom_control"),
            Version::V2 => (self.dir(""), "memory.events"),
        };
        let Some(dir) = dir else { return 0 };
        let mut all = vec![dir.to_owned()];
        subdirs(dir, &mut all);
        all.iter()
            .filter_map(|d| read_key(&d.join(file), "oom_kill"))
            .sum()
    }

    /// Memory charged to the cgroup, in bytes.
    pub fn memory_usage(&self) -> u64 {
        let path = match self.version {
            Version::V1 => self.dir("memory").map(|d| d.join("memory.usage_in_bytes")),
            Version::V2 => self.dir("").map(|d| d.join("memory.current")),
        };
        path.and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Every pid in the cgroup and its descendants.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for (_, d) in &self.dirs {
            let mut all = vec![d.clone()];
            subdirs(d, &mut all);
            for dir in all {
                if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process in the cgroup (repeatedly, for processes forked meanwhile).
    pub fn kill_all(&self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Kills every process in it and removes it, when it exists.
    pub fn reap(&self) -> Result<(), CgroupError> {
        if !self.exists() {
            return Ok(());
        }
        self.kill_all();
        self.remove()
    }

    /// Removes the directories (descendants first). Fails while processes remain.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for (_, d) in &self.dirs {
            if !d.exists() {
                continue;
            }
            let mut all = Vec::new();
            subdirs(d, &mut all);
            all.push(d.clone());
            for dir in all {
                // Freshly killed tasks take a moment to leave the cgroup.
                let mut tries = 0;
                loop {
                    match std::fs::remove_dir(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                        Err(e) if tries < 100 => {
                            let _ = e;
                            tries += 1;
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        Err(e) => return Err(io_err(&dir)(e)),
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn hybrid_layout_uses_each_controllers_own_path() {
        let root = tempfile::tempdir().unwrap();
        let l = Layout::detect(root.path(), HYBRID, "hearth").unwrap();
        assert_eq!(l.version, Version::V1);
        let want: Vec<(String, PathBuf)> = vec![
            (
                "memory".into(),
                root.path().join("memory/process_api/abc/hearth"),
            ),
            ("cpu".into(), root.path().join("cpu/hearth")),
            ("pids".into(), root.path().join("pids/hearth")),
        ];
        assert_eq!(l.parents, want);
        let i = l.instance("web-1");
        assert_eq!(
            i.dirs[0].1,
            root.path().join("memory/process_api/abc/hearth/web-1")
        );
    }

    #[test]
    fn v2_layout_is_one_directory() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "memory cpu pids").unwrap();
        let l = Layout::detect(root.path(), "0::/system.slice/hearth.service\n", "hearth").unwrap();
        assert_eq!(l.version, Version::V2);
        assert_eq!(
            l.parents,
            vec![(
                String::new(),
                root.path().join("system.slice/hearth.service/hearth")
            )]
        );
    }

    #[test]
    fn an_agent_started_in_its_leaf_manages_the_parent() {
        // systemd >= 254 with DelegateSubgroup=agent starts the agent where it would have
        // moved itself: the layout is the same as for an agent started in the unit's cgroup.
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "memory cpu pids").unwrap();
        let unit = Layout::detect(root.path(), "0::/system.slice/h.service\n", "hearth").unwrap();
        let leaf =
            Layout::detect(root.path(), "0::/system.slice/h.service/agent\n", "hearth").unwrap();
        assert_eq!(unit, leaf);
        assert_eq!(delegated_root("/agent"), "/agent");
        assert_eq!(delegated_root("/x/myagent"), "/x/myagent");
        assert_eq!(delegated_root("/x/agent"), "/x");
    }

    #[test]
    fn limits_are_written_to_the_v1_files() {
        let root = tempfile::tempdir().unwrap();
        let l = Layout::detect(root.path(), HYBRID, "hearth").unwrap();
        let i = l.instance("a");
        i.create(&Limits {
            memory_bytes: 64 << 20,
            vcpus: 2,
            pids: 512,
        })
        .unwrap();
        let read = |c: &str, f: &str| std::fs::read_to_string(i.dir(c).unwrap().join(f)).unwrap();
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "200000");
        assert_eq!(read("pids", "pids.max"), "512");
        std::fs::write(
            i.dir("memory").unwrap().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(i.oom_kills(), 2);
    }

    #[test]
    fn real_cgroup_on_this_host() {
        hearth_testkit::require!(hearth_testkit::skip::root());
        let parent = format!("hearth-cgtest-{}", std::process::id());
        let l = Layout::host(&parent).unwrap();
        l.prepare().unwrap();
        let i = l.instance("x");
        i.create(&Limits {
            memory_bytes: 32 << 20,
            vcpus: 1,
            pids: 64,
        })
        .unwrap();
        assert!(i.exists());
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        i.add(child.id() as i32).unwrap();
        assert_eq!(i.pids(), vec![child.id() as i32]);
        i.kill_all();
        child.wait().unwrap();
        i.remove().unwrap();
        for (_, p) in &l.parents {
            std::fs::remove_dir(p).unwrap();
        }
    }
}
