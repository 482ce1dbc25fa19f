//! Opening an existing TAP device by name (never creating one: a TAP that does not exist in
//! the VMM's network namespace is an error).

use std::{
    ffi::CString,
    fs::File,
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd, RawFd},
};

/// Why the TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No interface of that name.
    #[error("TAP device {0} does not exist")]
    Missing(String),
    /// /dev/net/tun could not be opened.
    #[error("Cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// TUNSETIFF refused (not a TAP, busy, or no permission).
    #[error("Cannot attach to TAP device {0}")]
    Attach(String, #[source] std::io::Error),
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// An open TAP queue (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing TAP `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let cname = CString::new(name).map_err(|_| TapError::Missing(name.to_owned()))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.to_owned()));
        }
        // SAFETY: open(2) of a constant path; the fd is owned by the File below.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        // struct ifreq: 16 bytes of name, then the flags (a short) in the union.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads (and may write) a struct ifreq, which `ifr` is large enough
        // to hold.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
            return Err(TapError::Attach(
                name.to_owned(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (WouldBlock when none is queued).
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tap_is_an_error() {
        let e = Tap::open("hrthnotap0").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)));
        assert_eq!(e.to_string(), "TAP device hrthnotap0 does not exist");
    }
}
