//! The few OS calls std does not wrap: the only `unsafe` in this crate.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Sets an extended attribute on `path` itself (never following a symlink).
pub fn lsetxattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let p = cstr(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; `value` is a valid slice
    // whose pointer and length are passed together.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates a FIFO.
pub fn mkfifo(path: &Path, mode: u32) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is NUL-terminated and outlives the call.
    let rc = unsafe { libc::mkfifo(p.as_ptr(), mode as libc::mode_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets access and modification time of `path` itself (never following a symlink).
pub fn lset_mtime(path: &Path, secs: i64) -> io::Result<()> {
    let p = cstr(path)?;
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: `p` is NUL-terminated, `times` is an array of two timespecs as utimensat expects,
    // both outlive the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes an exclusive, non-blocking `flock` on `file`: one process owns a cache directory.
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: the descriptor is valid for the duration of the call (borrowed from `file`).
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `path` is on a tmpfs, and the bytes free there for an unprivileged writer.
pub fn tmpfs_space(path: &Path) -> io::Result<(bool, u64)> {
    let p = cstr(path)?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is NUL-terminated and `st` is a valid, writable statfs; both outlive the call.
    let rc = unsafe { libc::statfs(p.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let tmpfs = st.f_type == libc::TMPFS_MAGIC;
    Ok((tmpfs, st.f_bavail as u64 * st.f_bsize as u64))
}

/// The names of the extended attributes of `path` itself (never following a symlink).
pub fn llistxattr(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = cstr(path)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `p` is NUL-terminated; `buf` is writable for `buf.len()` bytes; both outlive
        // the call.
        let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

/// The value of extended attribute `name` of `path` itself (never following a symlink).
pub fn lgetxattr(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let p = cstr(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: both strings are NUL-terminated; `buf` is writable for `buf.len()` bytes;
        // all outlive the call.
        let len =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if len >= 0 {
            buf.truncate(len as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}
