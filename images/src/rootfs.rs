//! Building a read-only block image from an unpacked root: `mkfs.erofs DIR` or
//! `mkfs.ext4 -d DIR`.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::config::RootfsFormat;

/// Why a rootfs image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The mkfs program could not be started (not installed?).
    #[error("Cannot run {program} (install {package})")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The Debian package that has it.
        package: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// mkfs failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// A file operation failed.
    #[error("Cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Builds `out` (which must not exist) from the tree at `dir`; returns the image's size.
pub fn build(dir: &Path, out: &Path, format: RootfsFormat) -> Result<u64, RootfsError> {
    let io_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| RootfsError::Io { what, path, source }
    };
    let (program, package, mut cmd) = match format {
        RootfsFormat::Erofs => {
            let mut cmd = Command::new("mkfs.erofs");
            cmd.arg("--quiet").arg(out).arg(dir);
            ("mkfs.erofs", "erofs-utils", cmd)
        }
        RootfsFormat::Ext4 => {
            let (bytes, inodes) = tree_usage(dir).map_err(io_err("measure", dir))?;
            // Room for metadata and block rounding; mkfs.ext4 -d fails rather than grow.
            let size = (bytes + bytes / 4 + inodes * 512 + (32 << 20)).next_multiple_of(4096);
            let f = fs::File::create(out).map_err(io_err("create", out))?;
            f.set_len(size).map_err(io_err("size", out))?;
            let mut cmd = Command::new("mkfs.ext4");
            cmd.args(["-q", "-F", "-b", "4096", "-m", "0", "-O", "^has_journal"])
                .arg("-N")
                .arg((inodes + 1024).to_string())
                .arg("-d")
                .arg(dir)
                .arg(out);
            ("mkfs.ext4", "e2fsprogs", cmd)
        }
    };
    let output = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| RootfsError::Spawn {
            program,
            package,
            source,
        })?;
    if !output.status.success() {
        let _ = fs::remove_file(out);
        return Err(RootfsError::Failed {
            program,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let f = fs::File::open(out).map_err(io_err("open", out))?;
    f.sync_all().map_err(io_err("fsync", out))?;
    Ok(f.metadata().map_err(io_err("inspect", out))?.len())
}

/// Bytes (rounded up to 4 KiB blocks) and inodes a tree needs.
fn tree_usage(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (0u64, 1u64);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let m = entry.metadata()?;
            inodes += 1;
            bytes += m.size().next_multiple_of(4096);
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}
