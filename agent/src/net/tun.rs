//! Creating persistent TAP devices through `/dev/net/tun` (rtnetlink cannot create tun/tap
//! devices: the kernel's `tun` link ops refuse `RTM_NEWLINK`). This is the module's only
//! `unsafe` code.
//!
//! The device is created with `IFF_TAP | IFF_NO_PI`, single queue, and made persistent, so it
//! outlives this call and an agent restart. hearth-vmm later attaches to it by name with its
//! own `TUNSETIFF` (`IFF_TAP | IFF_NO_PI`, optionally `IFF_VNET_HDR`; never
//! `IFF_MULTI_QUEUE`, which must match the device's).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// Creates the persistent TAP device `name`; succeeds if a TAP of that name exists already.
pub fn create_persistent_tap(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `tun` is an open /dev/net/tun; TUNSETIFF reads and writes one `ifreq`, and `req`
    // is a valid, exclusively borrowed one for the duration of the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes its argument by value; `tun` is attached to the device.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // Closing the file detaches us; the device stays because it is persistent.
    Ok(())
}
