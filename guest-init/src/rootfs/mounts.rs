//! The spec's extra mounts: option words to flags, bind sources opened before the switch, the
//! mounts made inside the instance root after it.

use std::{
    fs,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use hearth_proto::init::Mount;
use nix::{fcntl::OFlag, mount::MsFlags, sys::stat::Mode as FileMode};

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

/// An extra mount, its bind source (if any) already opened.
#[derive(Debug)]
pub struct Prepared {
    spec: Mount,
    options: Options,
    source_fd: Option<OwnedFd>,
    source_is_dir: bool,
}

fn extra(target: &str, why: impl Into<String>) -> RootfsError {
    RootfsError::Extra {
        target: target.into(),
        why: why.into(),
    }
}

/// Opens the bind sources (they are paths outside the instance, gone after the switch).
pub fn prepare(mounts: &[Mount]) -> Result<Vec<Prepared>, RootfsError> {
    mounts
        .iter()
        .map(|m| {
            let options = parse_options(&m.options, m.read_only);
            let (source_fd, source_is_dir) = if options.bind {
                let fd = nix::fcntl::open(
                    Path::new(&m.source),
                    OFlag::O_PATH | OFlag::O_CLOEXEC,
                    FileMode::empty(),
                )
                .map_err(|e| extra(&m.target, format!("cannot open {}: {e}", m.source)))?;
                let is_dir = fs::metadata(&m.source).is_ok_and(|md| md.is_dir());
                (Some(fd), is_dir)
            } else {
                (None, true)
            };
            Ok(Prepared {
                spec: m.clone(),
                options,
                source_fd,
                source_is_dir,
            })
        })
        .collect()
}

/// Makes the mounts; runs after the switch, so targets resolve inside the instance.
pub fn mount_all(prepared: Vec<Prepared>) -> Result<(), RootfsError> {
    for p in prepared {
        let target = PathBuf::from(&p.spec.target);
        if p.source_is_dir {
            fs::create_dir_all(&target)
                .map_err(|e| extra(&p.spec.target, format!("cannot create the target: {e}")))?;
        } else if !target.exists() {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| extra(&p.spec.target, format!("cannot create the target: {e}")))?;
            }
            fs::write(&target, b"")
                .map_err(|e| extra(&p.spec.target, format!("cannot create the target: {e}")))?;
        }
        let fail = |e: nix::Error| extra(&p.spec.target, format!("mount failed: {e}"));
        match &p.source_fd {
            Some(fd) => {
                // The opened source, reached through /proc of the instance.
                let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
                let bind = p.options.flags & (MsFlags::MS_BIND | MsFlags::MS_REC);
                nix::mount::mount(
                    Some(source.as_str()),
                    &target,
                    None::<&str>,
                    bind,
                    None::<&str>,
                )
                .map_err(fail)?;
                // Bind mounts take other flags only on a remount.
                let rest = p.options.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
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
            }
            None => {
                let source = if p.spec.source.is_empty() {
                    p.spec.fstype.as_str()
                } else {
                    p.spec.source.as_str()
                };
                nix::mount::mount(
                    Some(source),
                    &target,
                    Some(p.spec.fstype.as_str()),
                    p.options.flags,
                    (!p.options.data.is_empty()).then_some(p.options.data.as_str()),
                )
                .map_err(fail)?;
            }
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
