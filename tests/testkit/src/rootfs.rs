//! Busybox root filesystems for tests: a directory tree, and an erofs or ext4 image of it.
//!
//! The tree holds Debian's static busybox (`busybox-static`) at `/bin/busybox` with a symlink
//! per applet in `/bin`, `/etc/passwd` and `/etc/group` (root, nobody, and whatever users and
//! groups the test adds), the usual empty directories, and any extra files.
//!
//! ```no_run
//! use hearth_testkit::rootfs::{ImageFormat, Rootfs};
//! # fn t(tmp: &std::path::Path) -> std::io::Result<()> {
//! let image = tmp.join("rootfs.erofs");
//! Rootfs::busybox()
//!     .user("app", 1000, 1000, "/home/app")
//!     .group("app", 1000, &[])
//!     .file("/etc/motd", "hello\n", 0o644)
//!     .write_image(&tmp.join("tree"), &image, ImageFormat::Erofs)?;
//! # Ok(())
//! # }
//! ```
//!
//! Building an image runs `mkfs.erofs` or `mkfs.ext4 -d` (erofs-utils, e2fsprogs; installed by
//! `cargo xtask setup`) and takes well under a second. Paths given to the builder are absolute
//! paths inside the root.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Component, Path, PathBuf},
    process::Command,
};

/// Where Debian's `busybox-static` installs the static busybox.
pub const BUSYBOX: &str = "/bin/busybox";

/// The filesystem of a root image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// erofs (read-only, compact): what the image cache builds by default.
    Erofs,
    /// ext4 of the given size in MiB.
    Ext4 {
        /// Image size in MiB (must fit the tree; 64 is plenty for busybox).
        size_mib: u64,
    },
}

impl ImageFormat {
    /// The `fstype` to mount the image with.
    pub fn fstype(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Ext4 { .. } => "ext4",
        }
    }
}

#[derive(Debug, Clone)]
enum Entry {
    File {
        path: String,
        contents: Vec<u8>,
        mode: u32,
    },
    Dir {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
}

#[derive(Debug, Clone)]
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug, Clone)]
struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A root filesystem to build: busybox plus what the test adds.
#[derive(Debug, Clone)]
pub struct Rootfs {
    busybox: PathBuf,
    entries: Vec<Entry>,
    users: Vec<User>,
    groups: Vec<Group>,
}

impl Rootfs {
    /// A busybox root with `root` (0) and `nobody` (65534) users and groups.
    pub fn busybox() -> Self {
        Self {
            busybox: PathBuf::from(BUSYBOX),
            entries: Vec::new(),
            users: vec![
                User {
                    name: "root".into(),
                    uid: 0,
                    gid: 0,
                    home: "/root".into(),
                },
                User {
                    name: "nobody".into(),
                    uid: 65534,
                    gid: 65534,
                    home: "/nonexistent".into(),
                },
            ],
            groups: vec![
                Group {
                    name: "root".into(),
                    gid: 0,
                    members: Vec::new(),
                },
                Group {
                    name: "nogroup".into(),
                    gid: 65534,
                    members: Vec::new(),
                },
            ],
        }
    }

    /// Adds a user (an `/etc/passwd` line with shell `/bin/sh`).
    pub fn user(mut self, name: &str, uid: u32, gid: u32, home: &str) -> Self {
        self.users.push(User {
            name: name.into(),
            uid,
            gid,
            home: home.into(),
        });
        self
    }

    /// Adds a group with supplementary `members` (an `/etc/group` line).
    pub fn group(mut self, name: &str, gid: u32, members: &[&str]) -> Self {
        self.groups.push(Group {
            name: name.into(),
            gid,
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        });
        self
    }

    /// Adds a regular file (parent directories are created).
    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.entries.push(Entry::File {
            path: path.into(),
            contents: contents.into(),
            mode,
        });
        self
    }

    /// Adds a directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.entries.push(Entry::Dir {
            path: path.into(),
            mode,
        });
        self
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push(Entry::Symlink {
            path: path.into(),
            target: target.into(),
        });
        self
    }

    /// Writes the tree into `dir`, which must not exist or be empty.
    pub fn write_dir(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        if fs::read_dir(dir)?.next().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is not empty", dir.display()),
            ));
        }
        for (d, mode) in [
            ("bin", 0o755),
            ("sbin", 0o755),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("usr/sbin", 0o755),
            ("etc", 0o755),
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("tmp", 0o1777),
            ("var", 0o755),
            ("var/tmp", 0o1777),
            ("root", 0o700),
            ("home", 0o755),
        ] {
            let p = dir.join(d);
            fs::create_dir(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        }
        fs::copy(&self.busybox, dir.join("bin/busybox")).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "Cannot copy {} (install busybox-static): {e}",
                    self.busybox.display()
                ),
            )
        })?;
        for applet in applets(&self.busybox)? {
            if applet == "busybox" {
                continue;
            }
            symlink("busybox", dir.join("bin").join(&applet))?;
        }
        let mut passwd = String::new();
        for u in &self.users {
            passwd.push_str(&format!(
                "{}:x:{}:{}:{}:{}:/bin/sh\n",
                u.name, u.uid, u.gid, u.name, u.home
            ));
        }
        write(dir, "/etc/passwd", passwd.as_bytes(), 0o644)?;
        let mut group = String::new();
        for g in &self.groups {
            group.push_str(&format!("{}:x:{}:{}\n", g.name, g.gid, g.members.join(",")));
        }
        write(dir, "/etc/group", group.as_bytes(), 0o644)?;
        for entry in &self.entries {
            match entry {
                Entry::File {
                    path,
                    contents,
                    mode,
                } => write(dir, path, contents, *mode)?,
                Entry::Dir { path, mode } => {
                    let p = inside(dir, path)?;
                    fs::create_dir_all(&p)?;
                    fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
                }
                Entry::Symlink { path, target } => {
                    let p = inside(dir, path)?;
                    if let Some(parent) = p.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    symlink(target, p)?;
                }
            }
        }
        Ok(())
    }

    /// Writes the tree into `tree` (see [`write_dir`](Self::write_dir)) and builds `image` of it.
    pub fn write_image(&self, tree: &Path, image: &Path, format: ImageFormat) -> io::Result<()> {
        self.write_dir(tree)?;
        make_image(tree, image, format)
    }
}

/// Builds a filesystem image of the directory `tree` at `image` (replacing it).
pub fn make_image(tree: &Path, image: &Path, format: ImageFormat) -> io::Result<()> {
    match fs::remove_file(image) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut cmd = match format {
        ImageFormat::Erofs => {
            let mut cmd = Command::new("mkfs.erofs");
            cmd.arg("--quiet").arg(image).arg(tree);
            cmd
        }
        ImageFormat::Ext4 { size_mib } => {
            let file = fs::File::create(image)?;
            file.set_len(size_mib * 1024 * 1024)?;
            drop(file);
            let mut cmd = Command::new("mkfs.ext4");
            cmd.args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
                .arg(tree)
                .arg(image);
            cmd
        }
    };
    let out = cmd.output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("Cannot run {cmd:?} (install erofs-utils / e2fsprogs): {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The applet names the busybox at `busybox` provides.
pub fn applets(busybox: &Path) -> io::Result<Vec<String>> {
    let out = Command::new(busybox).arg("--list").output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{} --list failed ({})",
            busybox.display(),
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('/'))
        .map(str::to_owned)
        .collect())
}

/// `path` (absolute, inside the root) below `root`, refusing `..`.
fn inside(root: &Path, path: &str) -> io::Result<PathBuf> {
    let rel = Path::new(path);
    if !rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path:?} is not an absolute path without `..`"),
        ));
    }
    Ok(root.join(rel.strip_prefix("/").unwrap_or(rel)))
}

fn write(root: &Path, path: &str, contents: &[u8], mode: u32) -> io::Result<()> {
    let p = inside(root, path)?;
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut f = fs::File::create(&p)?;
    f.write_all(contents)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(())
}
