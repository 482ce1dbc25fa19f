//! One byte to a physical address through `/dev/mem` (the VMM's boot timer, an MMIO page).

use std::{fs::OpenOptions, io, os::fd::AsRawFd as _, os::unix::fs::OpenOptionsExt as _};

const PAGE: u64 = 4096;

/// Writes `value` at physical address `addr`.
pub fn write_u8(addr: u64, value: u8) -> io::Result<()> {
    let base = addr & !(PAGE - 1);
    let offset = usize::try_from(addr - base).map_err(io::Error::other)?;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")?;
    let base = libc::off_t::try_from(base)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "address beyond off_t"))?;
    // SAFETY: a fresh shared mapping of one page of /dev/mem; no Rust object aliases it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            base,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `offset < PAGE`, so the byte lies inside the mapping made above; a volatile write
    // because it is device memory. The mapping is unmapped exactly once, after the write.
    unsafe {
        ptr.cast::<u8>().add(offset).write_volatile(value);
        libc::munmap(ptr, PAGE as usize);
    }
    Ok(())
}
