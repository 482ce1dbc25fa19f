//! The spec's extra mounts: option words to flags; the mounts, made inside the new root before
//! the switch (while bind sources on the host are reachable) on targets that may not traverse
//! a symlink.

use std::{
    fs,
    path::{Component, Path, PathBuf},
};

use hearth_proto::init::Mount;
use nix::mount::MsFlags;

use super::RootfsError;

/// Mount option words split into flags and the filesystem's own data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `MS_*` flags.
    pub flags: MsFlags,
    /// Everything else, comma-joined, for the filesystem.
    pub data: String,
    /// A bind mount (`bind` or `rbind`).
    pub bind: bool,
}

/// Splits option words (each may itself be comma-separated) into flags and data.
pub fn parse_options(options: &[String], read_only: bool) -> Options {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut bind = false;
    for word in options.iter().flat_map(|o| o.split(',')) {
        match word.trim() {
            "" | "rw" | "defaults" | "suid" | "dev" | "exec" | "async" => {}
            "ro" => flags |= MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "bind" => {
                bind = true;
                flags |= MsFlags::MS_BIND;
            }
            "rbind" => {
                bind = true;
                flags |= MsFlags::MS_BIND | MsFlags::MS_REC;
            }
            other => data.push(other.to_owned()),
        }
    }
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    Options {
        flags,
        data: data.join(","),
        bind,
    }
}

fn extra(target: &str, why: impl Into<String>) -> RootfsError {
    RootfsError::Extra {
        target: target.into(),
        why: why.into(),
    }
}

/// `target` (absolute, inside the instance) below `root`, creating what is missing: directories,
/// and for `file` an empty file as the last component. A symlink on the way is refused: the
/// image must not be able to point init's mounts outside the instance.
pub fn safe_target(root: &Path, target: &str, file: bool) -> Result<PathBuf, RootfsError> {
    let parts: Vec<Component<'_>> = Path::new(target).components().collect();
    let mut path = root.to_path_buf();
    for (i, c) in parts.iter().enumerate() {
        let name = match c {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(n) => n,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(extra(target, "the target must not contain `..`"));
            }
        };
        path.push(name);
        let last = i + 1 == parts.len();
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(extra(target, "the target path contains a symlink"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let made = if last && file {
                    fs::write(&path, b"")
                } else {
                    fs::create_dir(&path)
                };
                made.map_err(|e| extra(target, format!("cannot create the target: {e}")))?;
            }
            Err(e) => return Err(extra(target, format!("cannot inspect the target: {e}"))),
        }
    }
    Ok(path)
}

/// Makes the spec's mounts inside `root` (the new root, before the switch, so bind sources
/// on the host are still reachable).
pub fn mount_all(mounts: &[Mount], root: &Path) -> Result<(), RootfsError> {
    for m in mounts {
        let options = parse_options(&m.options, m.read_only);
        let fail = |e: nix::Error| extra(&m.target, format!("mount failed: {e}"));
        if options.bind {
            let is_dir = fs::metadata(&m.source)
                .map_err(|e| extra(&m.target, format!("cannot use {}: {e}", m.source)))?
                .is_dir();
            let target = safe_target(root, &m.target, !is_dir)?;
            let bind = options.flags & (MsFlags::MS_BIND | MsFlags::MS_REC);
            nix::mount::mount(
                Some(m.source.as_str()),
                &target,
                None::<&str>,
                bind,
                None::<&str>,
            )
            .map_err(fail)?;
            // A bind mount takes other flags only on a remount.
            let rest = options.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
            if !rest.is_empty() {
                nix::mount::mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                    None::<&str>,
                )
                .map_err(fail)?;
            }
        } else {
            let target = safe_target(root, &m.target, false)?;
            let source = if m.source.is_empty() {
                m.fstype.as_str()
            } else {
                m.source.as_str()
            };
            nix::mount::mount(
                Some(source),
                &target,
                Some(m.fstype.as_str()),
                options.flags,
                (!options.data.is_empty()).then_some(options.data.as_str()),
            )
            .map_err(fail)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(
            &["nosuid,nodev".into(), "size=64m".into(), "mode=1777".into()],
            true,
        );
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data, "size=64m,mode=1777");
        assert!(!o.bind);
        let o = parse_options(&["rbind".into(), "ro".into()], false);
        assert!(o.bind);
        assert!(
            o.flags
                .contains(MsFlags::MS_REC | MsFlags::MS_BIND | MsFlags::MS_RDONLY)
        );
    }
}
