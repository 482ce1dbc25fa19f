//! Loading the kernel (vmlinux ELF or bzImage), the initrd and the command line, and writing
//! Linux's zero page (`boot_params`) with the e820 map.

use std::{fs::File, io::Read, io::Seek, io::SeekFrom};

use linux_loader::{
    bootparam::{boot_e820_entry, boot_params, setup_header},
    loader::{KernelLoader, bzimage::BzImage, elf::Elf},
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    ZERO_PAGE_START,
};

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("Cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    /// The kernel is neither format.
    #[error("Kernel image is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat,
    /// linux-loader refused the kernel.
    #[error("Kernel image is corrupt or does not fit guest memory: {0}")]
    Load(linux_loader::loader::Error),
    /// The kernel would overlap the MMIO gap or the end of RAM.
    #[error("Kernel image ends at {end:#x}, beyond the end of low RAM at {limit:#x}")]
    KernelTooBig {
        /// Last byte + 1 the kernel needs.
        end: u64,
        /// End of low RAM.
        limit: u64,
    },
    /// The initrd could not be read.
    #[error("Cannot read the initrd")]
    ReadInitrd(#[source] std::io::Error),
    /// The initrd does not fit.
    #[error("Initrd of {size} bytes does not fit guest memory above the kernel")]
    InitrdTooBig {
        /// Its size.
        size: u64,
    },
    /// The command line is too long or contains a NUL.
    #[error("Kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// The command line contains a NUL byte.
    #[error("Kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Guest memory write failed.
    #[error("Cannot write the {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// What the loader found: where to enter, where the kernel ends, a bzImage's setup header.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header (None for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
}

/// The bzImage 64-bit entry point is 0x200 bytes into the protected-mode code.
const BZIMAGE_ENTRY_OFFSET: u64 = 0x200;
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";

/// End of RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    (mem.last_addr().0 + 1).min(MMIO_GAP_START)
}

/// Loads a vmlinux ELF (at its physical addresses) or a bzImage (at 1 MiB).
pub fn load_kernel(mem: &GuestMemoryMmap, file: &mut File) -> Result<LoadedKernel, BootError> {
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(BootError::ReadKernel)?;
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    let limit = low_ram_end(mem);
    let loaded = if n == 4 && magic == ELF_MAGIC {
        let r =
            Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(BootError::Load)?;
        LoadedKernel {
            entry: r.kernel_load.0,
            end: r.kernel_end,
            setup_header: None,
        }
    } else {
        let r = match BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => r,
            Err(linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::InvalidBzImage,
            )) => return Err(BootError::UnknownFormat),
            Err(e) => return Err(BootError::Load(e)),
        };
        LoadedKernel {
            entry: r.kernel_load.0 + BZIMAGE_ENTRY_OFFSET,
            end: r.kernel_end,
            setup_header: r.setup_header,
        }
    };
    if loaded.end > limit || loaded.entry >= limit {
        return Err(BootError::KernelTooBig {
            end: loaded.end.max(loaded.entry),
            limit,
        });
    }
    Ok(loaded)
}

/// Loads the initrd at the top of low RAM (page aligned); returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    file: &mut File,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = file.seek(SeekFrom::End(0)).map_err(BootError::ReadInitrd)?;
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::ReadInitrd)?;
    let top = low_ram_end(mem);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitrdTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| BootError::ReadInitrd(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Writes the command line (NUL-terminated) at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::Write("command line", e))
}

const E820_RAM: u32 = 1;

/// The e820 map: RAM below the EBDA, RAM from 1 MiB to the MMIO gap (or the end of memory),
/// RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    let low_end = mem_size.min(MMIO_GAP_START);
    map.push(boot_e820_entry {
        addr: HIMEM_START,
        size: low_end - HIMEM_START,
        r#type: E820_RAM,
    });
    if mem_size > MMIO_GAP_START {
        map.push(boot_e820_entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            r#type: E820_RAM,
        });
    }
    map
}

/// Writes the zero page: the setup header (a bzImage's own, completed), the command line
/// pointer, the initrd and the e820 map.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| BootError::Write("zero page", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_skips_the_hole_and_the_gap() {
        let m = e820_map(128 << 20);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].addr, m[0].size), (0, EBDA_START));
        assert_eq!((m[1].addr, m[1].addr + m[1].size), (HIMEM_START, 128 << 20));
        let m = e820_map(4 << 30);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].addr + m[1].size, MMIO_GAP_START);
        assert_eq!((m[2].addr, m[2].size), (MMIO_GAP_END, 1 << 30));
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn temp_file(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    #[test]
    fn garbage_is_no_kernel() {
        let mut f = temp_file(&[0x55; 4096]);
        assert!(matches!(
            load_kernel(&mem(), &mut f),
            Err(BootError::UnknownFormat)
        ));
        let mut f = temp_file(b"");
        assert!(matches!(
            load_kernel(&mem(), &mut f),
            Err(BootError::UnknownFormat)
        ));
        let mut f = temp_file(b"\x7fELF\x02\x01\x01");
        assert!(matches!(
            load_kernel(&mem(), &mut f),
            Err(BootError::Load(_))
        ));
    }

    #[test]
    fn command_line_limits() {
        let m = mem();
        write_cmdline(&m, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(write_cmdline(&m, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
        assert!(write_cmdline(&m, "a\0b").is_err());
    }

    #[test]
    fn initrd_sits_at_the_top_of_low_ram() {
        let m = mem();
        let mut f = temp_file(&[7u8; 5000]);
        let (addr, size) = load_initrd(&m, &mut f, 2 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 16 << 20);
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 7);
        let mut big = temp_file(&vec![0u8; 15 << 20]);
        assert!(matches!(
            load_initrd(&m, &mut big, 2 << 20),
            Err(BootError::InitrdTooBig { .. })
        ));
    }
}
