//! The synchronous engine: positional vectored reads and writes, fdatasync.

use std::{fs::File, os::fd::AsRawFd as _};

use super::{Done, Op, OpKind};

/// Blocking I/O on the disk file.
#[derive(Debug)]
pub struct SyncEngine {
    file: File,
}

impl SyncEngine {
    /// An engine on a duplicate of `file`.
    pub fn new(file: &File) -> std::io::Result<Self> {
        Ok(Self {
            file: file.try_clone()?,
        })
    }

    /// Runs `op` to completion.
    pub fn run(&mut self, mut op: Op) -> Done {
        let fd = self.file.as_raw_fd();
        let result = match op.kind {
            OpKind::Flush => {
                // SAFETY: fdatasync on a descriptor we own has no memory effects.
                if unsafe { libc::fdatasync(fd) } == 0 {
                    Ok(0)
                } else {
                    Err(std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO))
                }
            }
            OpKind::Read | OpKind::Write => transfer(fd, &mut op),
        };
        Done {
            head: op.head,
            status: op.status,
            result,
            expected: op.expected,
            kind: op.kind,
        }
    }
}

/// Moves all bytes of `op`, resuming after partial transfers; stops at end of file.
fn transfer(fd: i32, op: &mut Op) -> Result<u64, i32> {
    let mut done = 0u64;
    let mut iov: &mut [libc::iovec] = &mut op.iovecs.0;
    while !iov.is_empty() {
        let offset = (op.offset + done) as libc::off_t;
        let n = match op.kind {
            // SAFETY: every iovec points into guest memory that stays mapped for the life of the
            // process (`io::iovecs` checked each lies inside one region); the kernel writes at
            // most `iov_len` bytes to each.
            OpKind::Read => unsafe { libc::preadv(fd, iov.as_ptr(), iov.len() as i32, offset) },
            // SAFETY: as above; the kernel only reads the buffers.
            _ => unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, offset) },
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err.raw_os_error().unwrap_or(libc::EIO));
        }
        if n == 0 {
            // End of file: a short read the caller reports as an error.
            break;
        }
        let mut n = n as usize;
        done += n as u64;
        while let Some(first) = iov.first_mut() {
            if n >= first.iov_len {
                n -= first.iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: advancing within the same buffer, by less than its length.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
                first.iov_len -= n;
                break;
            }
        }
    }
    Ok(done)
}
