//! The few `bpf(2)` and `statfs(2)` calls aya 0.14 does not expose: opening a pinned link as a
//! plain fd, reading a TCX link's interface, detaching a link at once (whoever else holds it),
//! checking that a directory is on bpffs and mounting one. All of this module's `unsafe` is here.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_LINK_TYPE_TCX`.
pub const LINK_TYPE_TCX: u32 = 11;
/// `BPF_TCX_INGRESS`.
pub const TCX_INGRESS: u32 = 46;
/// `BPF_TCX_EGRESS`.
pub const TCX_EGRESS: u32 = 47;
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// `struct bpf_link_info` up to the TCX member of its union (which starts at offset 16), with
/// room to spare: the kernel fills what it knows and needs the rest zeroed.
#[repr(C, align(8))]
struct LinkInfoBuf {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    tcx_ifindex: u32,
    tcx_attach_type: u32,
    _rest: [u64; 30],
}

/// What the kernel says about a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The link's id (stable for its lifetime, shown by `bpftool link`).
    pub id: u32,
    /// The attached program's id.
    pub prog_id: u32,
    /// For TCX links: the interface (0 once the interface is gone).
    pub ifindex: u32,
    /// For TCX links: [`TCX_INGRESS`] or [`TCX_EGRESS`].
    pub attach_type: u32,
}

/// # Safety
///
/// `attr` must point to `size` readable and writable bytes laid out as the `union bpf_attr`
/// member `cmd` expects, and any pointers inside it must be valid for the command.
unsafe fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees `attr` and `size` describe a valid attribute block.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attribute block; `pathname` points to a
    // NUL-terminated string that outlives the call.
    let fd = unsafe {
        bpf(
            BPF_OBJ_GET,
            (&raw mut attr).cast(),
            std::mem::size_of::<ObjAttr>(),
        )?
    };
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reads a link's info (`BPF_OBJ_GET_INFO_BY_FD`).
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut buf = LinkInfoBuf {
        link_type: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        tcx_ifindex: 0,
        tcx_attach_type: 0,
        _rest: [0; 30],
    };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoBuf>() as u32,
        info: (&raw mut buf) as u64,
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET_INFO_BY_FD block; `info` points to a zeroed buffer
    // of `info_len` bytes that outlives the call.
    unsafe {
        bpf(
            BPF_OBJ_GET_INFO_BY_FD,
            (&raw mut attr).cast(),
            std::mem::size_of::<InfoAttr>(),
        )?
    };
    Ok(LinkInfo {
        link_type: buf.link_type,
        id: buf.id,
        prog_id: buf.prog_id,
        ifindex: buf.tcx_ifindex,
        attach_type: buf.tcx_attach_type,
    })
}

/// Detaches a link from its hook now, even if other processes still hold it
/// (`BPF_LINK_DETACH`).
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: `attr` is a valid BPF_LINK_DETACH attribute block.
    unsafe {
        bpf(
            BPF_LINK_DETACH,
            (&raw mut attr).cast(),
            std::mem::size_of::<LinkDetachAttr>(),
        )?
    };
    Ok(())
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and `st` is a writable statfs buffer.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_type as libc::c_long == BPF_FS_MAGIC)
}

/// Mounts a bpffs instance on `path` (an existing directory).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: all strings are NUL-terminated; bpffs takes no mount data.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

/// Gives the calling thread the lowest CPU priority (nice 19), for background work such as
/// loading filters ahead of time.
pub fn lowest_thread_priority() -> io::Result<()> {
    // SAFETY: setpriority(2) on the calling thread (who = 0 with PRIO_PROCESS means the caller,
    // a thread on Linux); no memory is passed.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
