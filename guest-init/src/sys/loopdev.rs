//! Attaching an image file to a loop device, read-only, with the kernel's loop ioctls.
//!
//! The device is configured with `LO_FLAGS_AUTOCLEAR`: it detaches itself when its last user
//! goes, i.e. when the mount namespace holding the root mount dies. The caller keeps the
//! returned [`LoopDevice`] open until the image is mounted (closing it earlier would detach it).

use std::{
    fs::{File, OpenOptions},
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

const LOOP_CTL_GET_FREE: u32 = 0x4C82;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

nix::ioctl_none_bad!(
    /// `LOOP_CTL_GET_FREE` on `/dev/loop-control`: the number of a free loop device.
    ///
    /// # Safety
    ///
    /// `fd` must be an open `/dev/loop-control`.
    loop_ctl_get_free,
    LOOP_CTL_GET_FREE
);
nix::ioctl_write_ptr_bad!(
    /// `LOOP_CONFIGURE` on a loop device: attach a backing file with flags.
    ///
    /// # Safety
    ///
    /// `fd` must be an open loop device and `data` a valid `LoopConfig`.
    loop_configure,
    LOOP_CONFIGURE,
    LoopConfig
);

/// An attached loop device; keep it until the image is mounted.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    _device: File,
}

/// Attaches `image` read-only to a free loop device.
pub fn attach_read_only(image: &Path) -> io::Result<LoopDevice> {
    let backing = File::open(image)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let mut name = [0u8; LO_NAME_SIZE];
    let bytes = image.as_os_str().as_encoded_bytes();
    let n = bytes.len().min(LO_NAME_SIZE - 1);
    name[..n].copy_from_slice(&bytes[..n]);
    let config = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd()).map_err(io::Error::other)?,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            lo_file_name: name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // Another process may take the free device between the two ioctls: try the next one.
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let number = unsafe { loop_ctl_get_free(control.as_raw_fd()) }.map_err(io::Error::from)?;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = OpenOptions::new().read(true).open(&path)?;
        // SAFETY: `config` is a fully initialised `struct loop_config` that outlives the call;
        // the kernel only reads it.
        match unsafe { loop_configure(device.as_raw_fd(), &config) } {
            Ok(_) => {
                return Ok(LoopDevice {
                    path,
                    _device: device,
                });
            }
            Err(nix::errno::Errno::EBUSY) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other(
        "every free loop device was taken by someone else",
    ))
}
