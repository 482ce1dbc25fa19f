//! Assembling the instance's root filesystem and switching into it.
//!
//! The root is an overlay: the image (erofs or ext4, read-only) as the lower layer and a fresh
//! writable upper layer capped at the instance's disk size. In a microVM the image is a block
//! device (`/dev/vda`) and the upper layer a scratch block device (or a tmpfs); in the sandbox
//! the image file is attached to a loop device here and the upper layer is a size-capped tmpfs.
//! The mount points live on a small private tmpfs at [`STAGING`] in init's own mount namespace.
//!
//! The mounts are computed as a list of [`Step`]s by pure functions (unit-tested) and applied by
//! [`apply`]; [`switch_root`] then makes the overlay `/` (`pivot_root` in the sandbox, so the
//! host's root is detached; moving the overlay onto `/` and `chroot` in a microVM, where the
//! initramfs cannot be pivoted away).
//!
//! # Layout
//!
//! - [`mounts`]: mount option strings to flags, and the spec's extra mounts.

pub mod mounts;

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use nix::{
    mount::{MntFlags, MsFlags},
    sys::stat::{Mode as FileMode, SFlag},
};

use crate::bootstrap::Mode;

/// Where init mounts its staging tmpfs (inside its own mount namespace).
pub const STAGING: &str = "/run";

/// Why the root filesystem could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The image file could not be attached to a loop device.
    #[error("Cannot attach image {image} to a loop device")]
    Loop {
        /// The image file.
        image: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image or scratch device does not exist or is not usable.
    #[error("Cannot use {path}")]
    Source {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A mount failed.
    #[error("Cannot mount {what} on {target}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// The kernel's answer.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("Cannot {what} {path}")]
    Io {
        /// What init tried.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Switching into the new root failed.
    #[error("Cannot switch into the new root ({step})")]
    Switch {
        /// Which system call.
        step: &'static str,
        /// The kernel's answer.
        #[source]
        source: nix::Error,
    },
    /// A spec mount is malformed or failed.
    #[error("Mount {target}: {why}")]
    Extra {
        /// The target.
        target: String,
        /// What went wrong.
        why: String,
    },
}

/// The writable layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scratch {
    /// A tmpfs of this many bytes (sandbox; a microVM without a scratch disk).
    Tmpfs {
        /// Size cap in bytes.
        size: u64,
    },
    /// A block device holding an (empty) ext4 filesystem, created by the agent (microVM).
    Device {
        /// The device, e.g. `/dev/vdb`.
        path: PathBuf,
    },
}

/// Where the pieces are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The image, read-only.
    pub lower: PathBuf,
    /// The writable filesystem (holding `upper/` and `work/`).
    pub scratch: PathBuf,
    /// The overlay: the instance root before the switch.
    pub root: PathBuf,
}

impl Layout {
    /// The layout below `staging`.
    pub fn new(staging: &Path) -> Self {
        Self {
            lower: staging.join("lower"),
            scratch: staging.join("scratch"),
            root: staging.join("root"),
        }
    }
}

/// One step of assembling the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `mkdir -p` with the mode for the last component.
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// Make `path` an empty directory if it is missing or a symlink (image content must not
    /// redirect init's mounts).
    MountPoint {
        /// The directory.
        path: PathBuf,
    },
    /// `mount(2)`.
    Mount {
        /// Source (device, or a name for pseudo filesystems).
        source: String,
        /// Target directory.
        target: PathBuf,
        /// Filesystem type.
        fstype: String,
        /// Flags.
        flags: MsFlags,
        /// Filesystem options.
        data: String,
    },
    /// A character device node.
    CharDev {
        /// Path of the node.
        path: PathBuf,
        /// Major number.
        major: u64,
        /// Minor number.
        minor: u64,
        /// Mode.
        mode: u32,
    },
    /// Remove everything in the directory but `lost+found` (a reused scratch disk).
    Empty {
        /// The directory.
        path: PathBuf,
    },
    /// A symbolic link at `path` to `target`.
    Symlink {
        /// The link's path.
        path: PathBuf,
        /// What it points to.
        target: String,
    },
}

fn mount(source: &str, target: &Path, fstype: &str, flags: MsFlags, data: &str) -> Step {
    Step::Mount {
        source: source.into(),
        target: target.into(),
        fstype: fstype.into(),
        flags,
        data: data.into(),
    }
}

/// The staging tmpfs, the image, the writable layer and the overlay.
///
/// `image` is the block device holding the image (in the sandbox the loop device it was
/// attached to).
pub fn overlay_steps(
    staging: &Path,
    image: &Path,
    fstype: &str,
    scratch: &Scratch,
) -> (Layout, Vec<Step>) {
    let l = Layout::new(staging);
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mut steps = vec![
        Step::Mkdir {
            path: staging.into(),
            mode: 0o755,
        },
        mount(
            "hearth-staging",
            staging,
            "tmpfs",
            nosuid_nodev,
            "mode=0700,size=1m",
        ),
        Step::Mkdir {
            path: l.lower.clone(),
            mode: 0o755,
        },
        Step::Mkdir {
            path: l.scratch.clone(),
            mode: 0o755,
        },
        Step::Mkdir {
            path: l.root.clone(),
            mode: 0o755,
        },
        mount(
            &image.to_string_lossy(),
            &l.lower,
            fstype,
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
            "",
        ),
    ];
    match scratch {
        Scratch::Tmpfs { size } => steps.push(mount(
            "hearth-scratch",
            &l.scratch,
            "tmpfs",
            nosuid_nodev,
            &format!("mode=0755,size={size}"),
        )),
        Scratch::Device { path } => {
            steps.push(mount(
                &path.to_string_lossy(),
                &l.scratch,
                "ext4",
                MsFlags::MS_NODEV,
                "",
            ));
            steps.push(Step::Empty {
                path: l.scratch.clone(),
            });
        }
    }
    let upper = l.scratch.join("upper");
    let work = l.scratch.join("work");
    steps.push(Step::Mkdir {
        path: upper.clone(),
        mode: 0o755,
    });
    steps.push(Step::Mkdir {
        path: work.clone(),
        mode: 0o700,
    });
    steps.push(mount(
        "overlay",
        &l.root,
        "overlay",
        MsFlags::empty(),
        &format!(
            "lowerdir={},upperdir={},workdir={}",
            l.lower.display(),
            upper.display(),
            work.display()
        ),
    ));
    (l, steps)
}

/// /proc, /sys, /sys/fs/cgroup, /dev (+ pts, shm), /run and /tmp inside `root`.
///
/// In the sandbox `/dev` is a tmpfs with the standard nodes (a devtmpfs there would be the
/// host's, with every host device), `/sys` is read-only, and the cgroup2 mount shows init's
/// own cgroup namespace.
pub fn pseudo_steps(root: &Path, mode: Mode) -> Vec<Step> {
    let at = |p: &str| root.join(p);
    let none = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut steps = Vec::new();
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        steps.push(Step::MountPoint { path: at(dir) });
    }
    steps.push(mount("proc", &at("proc"), "proc", none, ""));
    let sys_flags = match mode {
        Mode::Vm => none,
        Mode::Sandbox => none | MsFlags::MS_RDONLY,
    };
    steps.push(mount("sysfs", &at("sys"), "sysfs", sys_flags, ""));
    steps.push(mount(
        "cgroup2",
        &at("sys/fs/cgroup"),
        "cgroup2",
        sys_flags,
        "",
    ));
    match mode {
        Mode::Vm => steps.push(mount(
            "devtmpfs",
            &at("dev"),
            "devtmpfs",
            MsFlags::MS_NOSUID,
            "mode=0755",
        )),
        Mode::Sandbox => {
            steps.push(mount(
                "tmpfs",
                &at("dev"),
                "tmpfs",
                MsFlags::MS_NOSUID,
                "mode=0755,size=65536k",
            ));
            for (name, major, minor) in [
                ("null", 1, 3),
                ("zero", 1, 5),
                ("full", 1, 7),
                ("random", 1, 8),
                ("urandom", 1, 9),
                ("tty", 5, 0),
            ] {
                steps.push(Step::CharDev {
                    path: at("dev").join(name),
                    major,
                    minor,
                    mode: 0o666,
                });
            }
            for (name, target) in [
                ("fd", "/proc/self/fd"),
                ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"),
                ("ptmx", "pts/ptmx"),
            ] {
                steps.push(Step::Symlink {
                    path: at("dev").join(name),
                    target: target.into(),
                });
            }
        }
    }
    steps.push(Step::Mkdir {
        path: at("dev/pts"),
        mode: 0o755,
    });
    steps.push(mount(
        "devpts",
        &at("dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    ));
    steps.push(Step::Mkdir {
        path: at("dev/shm"),
        mode: 0o1777,
    });
    steps.push(mount(
        "shm",
        &at("dev/shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777",
    ));
    steps.push(mount(
        "tmpfs",
        &at("run"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755",
    ));
    steps.push(mount(
        "tmpfs",
        &at("tmp"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777",
    ));
    steps
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// Applies `steps` in order; stops at the first failure.
pub fn apply(steps: &[Step]) -> Result<(), RootfsError> {
    for step in steps {
        tracing::debug!(?step, "rootfs");
        match step {
            Step::Mkdir { path, mode } => {
                if !path.is_dir() {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(*mode)
                        .create(path)
                        .map_err(io_err("create directory", path))?;
                }
                fs::set_permissions(path, fs::Permissions::from_mode(*mode))
                    .map_err(io_err("set the mode of", path))?;
            }
            Step::MountPoint { path } => {
                match fs::symlink_metadata(path) {
                    Ok(m) if m.is_dir() => continue,
                    Ok(m) if m.is_file() || m.file_type().is_symlink() => {
                        fs::remove_file(path).map_err(io_err("remove", path))?;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("inspect", path)(e)),
                }
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(path)
                    .map_err(io_err("create directory", path))?;
            }
            Step::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => {
                nix::mount::mount(
                    Some(source.as_str()),
                    target,
                    Some(fstype.as_str()),
                    *flags,
                    (!data.is_empty()).then_some(data.as_str()),
                )
                .map_err(|source_err| RootfsError::Mount {
                    what: format!("{fstype} {source}"),
                    target: target.clone(),
                    source: source_err,
                })?;
            }
            Step::CharDev {
                path,
                major,
                minor,
                mode,
            } => {
                nix::sys::stat::mknod(
                    path,
                    SFlag::S_IFCHR,
                    FileMode::from_bits_truncate(*mode),
                    nix::sys::stat::makedev(*major, *minor),
                )
                .map_err(|e| io_err("create device node", path)(e.into()))?;
                // mknod is subject to the umask.
                fs::set_permissions(path, fs::Permissions::from_mode(*mode))
                    .map_err(io_err("set the mode of", path))?;
            }
            Step::Empty { path } => empty_scratch(path)?,
            Step::Symlink { path, target } => {
                std::os::unix::fs::symlink(target, path).map_err(io_err("create symlink", path))?;
            }
        }
    }
    Ok(())
}

/// Makes the mount tree below `/` private, so nothing init mounts propagates to the host (and
/// `pivot_root` and `MS_MOVE` are allowed).
pub fn make_private() -> Result<(), RootfsError> {
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|source| RootfsError::Mount {
        what: "private propagation".into(),
        target: "/".into(),
        source,
    })
}

/// Removes whatever a reused scratch filesystem holds besides `lost+found`, so the writable
/// layer is empty at every start.
pub fn empty_scratch(scratch: &Path) -> Result<(), RootfsError> {
    let entries = fs::read_dir(scratch).map_err(io_err("list", scratch))?;
    for entry in entries {
        let entry = entry.map_err(io_err("list", scratch))?;
        if entry.file_name() == "lost+found" {
            continue;
        }
        let path = entry.path();
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(io_err("remove", &path))?;
    }
    Ok(())
}

/// Makes `root` the root of init's mount namespace and changes into it.
pub fn switch_root(root: &Path, mode: Mode) -> Result<(), RootfsError> {
    let step = |step: &'static str| move |source| RootfsError::Switch { step, source };
    nix::unistd::chdir(root).map_err(step("chdir"))?;
    match mode {
        Mode::Sandbox => {
            // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
            // no path back to the host's files.
            nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
            nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(step("umount old root"))?;
        }
        Mode::Vm => {
            // The initramfs (rootfs) cannot be pivoted away: move the new root over it.
            nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(step("move to /"))?;
            nix::unistd::chroot(".").map_err(step("chroot"))?;
        }
    }
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Writes a file inside the (already switched-to) root, creating its directory; a symlink in
/// the image resolves inside the instance, never to the host.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), RootfsError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
    }
    // Replace rather than write through: the image's file may be a symlink to elsewhere.
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::remove_file(path).map_err(io_err("remove", path))?;
        }
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("write", path))?;
    f.write_all(contents.as_bytes())
        .map_err(io_err("write", path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(steps: &[Step]) -> Vec<(String, String)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Mount { target, fstype, .. } => {
                    Some((target.display().to_string(), fstype.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn overlay_over_image_and_tmpfs() {
        let (layout, steps) = overlay_steps(
            Path::new("/run"),
            Path::new("/dev/loop3"),
            "erofs",
            &Scratch::Tmpfs { size: 1 << 20 },
        );
        assert_eq!(layout.root, Path::new("/run/root"));
        assert_eq!(
            mounts(&steps),
            vec![
                ("/run".into(), "tmpfs".into()),
                ("/run/lower".into(), "erofs".into()),
                ("/run/scratch".into(), "tmpfs".into()),
                ("/run/root".into(), "overlay".into()),
            ]
        );
        let Some(Step::Mount { data, .. }) = steps.iter().find(
            |s| matches!(s, Step::Mount { target, .. } if target == Path::new("/run/scratch")),
        ) else {
            panic!("no scratch tmpfs");
        };
        assert!(data.contains("size=1048576"), "{data}");
        let Some(Step::Mount { data, flags, .. }) = steps.last() else {
            panic!()
        };
        assert_eq!(
            data,
            "lowerdir=/run/lower,upperdir=/run/scratch/upper,workdir=/run/scratch/work"
        );
        assert!(flags.is_empty());
        let lower = &steps[5];
        assert!(
            matches!(lower, Step::Mount { flags, source, .. } if flags.contains(MsFlags::MS_RDONLY) && source == "/dev/loop3")
        );
    }

    #[test]
    fn scratch_device_in_a_vm() {
        let (_, steps) = overlay_steps(
            Path::new("/run"),
            Path::new("/dev/vda"),
            "erofs",
            &Scratch::Device {
                path: "/dev/vdb".into(),
            },
        );
        assert!(
            steps.iter().any(|s| matches!(s, Step::Mount { source, fstype, .. } if source == "/dev/vdb" && fstype == "ext4"))
        );
    }

    #[test]
    fn pseudo_filesystems_per_mode() {
        let root = Path::new("/run/root");
        let vm = mounts(&pseudo_steps(root, Mode::Vm));
        assert!(vm.contains(&("/run/root/dev".into(), "devtmpfs".into())));
        let sandbox_steps = pseudo_steps(root, Mode::Sandbox);
        let sandbox = mounts(&sandbox_steps);
        assert!(sandbox.contains(&("/run/root/dev".into(), "tmpfs".into())));
        assert!(!sandbox.iter().any(|(_, t)| t == "devtmpfs"));
        for target in [
            "/run/root/proc",
            "/run/root/sys",
            "/run/root/sys/fs/cgroup",
            "/run/root/dev/pts",
            "/run/root/dev/shm",
            "/run/root/run",
            "/run/root/tmp",
        ] {
            assert!(vm.iter().any(|(t, _)| t == target), "vm: {target}");
            assert!(
                sandbox.iter().any(|(t, _)| t == target),
                "sandbox: {target}"
            );
        }
        assert!(sandbox_steps.iter().any(
            |s| matches!(s, Step::CharDev { path, major: 1, minor: 3, .. } if path.ends_with("dev/null"))
        ));
        // Mount points come before the mounts on them.
        let first_mount = sandbox_steps
            .iter()
            .position(|s| matches!(s, Step::Mount { .. }))
            .unwrap();
        assert!(
            sandbox_steps[..first_mount]
                .iter()
                .all(|s| matches!(s, Step::MountPoint { .. }))
        );
    }

    #[test]
    fn apply_creates_files_and_links_in_a_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::os::unix::fs::symlink("/etc", d.join("proc")).unwrap();
        apply(&[
            Step::Mkdir {
                path: d.join("a/b"),
                mode: 0o750,
            },
            Step::MountPoint {
                path: d.join("proc"),
            },
            Step::Symlink {
                path: d.join("fd"),
                target: "/proc/self/fd".into(),
            },
        ])
        .unwrap();
        assert!(d.join("a/b").is_dir());
        // The image's symlink was replaced by a real directory.
        assert!(fs::symlink_metadata(d.join("proc")).unwrap().is_dir());
        assert_eq!(
            fs::read_link(d.join("fd")).unwrap(),
            Path::new("/proc/self/fd")
        );
        write_file(&d.join("etc/hosts"), "x\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(d.join("etc/hosts")).unwrap(), "x\n");
        fs::create_dir(d.join("scratch")).unwrap();
        fs::create_dir(d.join("scratch/lost+found")).unwrap();
        fs::create_dir_all(d.join("scratch/upper/x")).unwrap();
        fs::write(d.join("scratch/f"), "f").unwrap();
        empty_scratch(&d.join("scratch")).unwrap();
        let left: Vec<_> = fs::read_dir(d.join("scratch"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("lost+found")]);
    }
}
