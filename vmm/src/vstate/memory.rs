//! Guest memory: anonymous mappings (no prefault: pages are touched by the guest on demand),
//! split around the MMIO gap, checked against what the host can give.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Too small to hold the boot structures and a kernel.
    #[error("Guest memory of {0} MiB is too small (at least 16 MiB)")]
    TooSmall(u64),
    /// More than the host has.
    #[error("Guest memory of {requested} MiB exceeds the host's {available} MiB of RAM and swap")]
    TooLarge {
        /// Requested MiB.
        requested: u64,
        /// The host's RAM + swap in MiB.
        available: u64,
    },
    /// mmap failed.
    #[error("Cannot map {0} MiB of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u64 = 16;

/// The host's RAM plus swap, in MiB.
pub fn host_memory_mib() -> u64 {
    let mut info: libc::sysinfo = unsafe_zeroed_sysinfo();
    // SAFETY: sysinfo writes into the struct we own and has no other effect.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    let unit = u64::from(info.mem_unit.max(1));
    info.totalram
        .saturating_add(info.totalswap)
        .saturating_mul(unit)
        >> 20
}

fn unsafe_zeroed_sysinfo() -> libc::sysinfo {
    // SAFETY: sysinfo is a plain C struct of integers, for which all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Maps `mib` MiB of guest memory.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mib));
    }
    let available = host_memory_mib();
    if mib > available {
        return Err(MemoryError::TooLarge {
            requested: mib,
            available,
        });
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map(mib, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn refuses_more_than_the_host_has() {
        let too_much = host_memory_mib() + 1;
        assert!(matches!(
            create(too_much),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(matches!(create(1), Err(MemoryError::TooSmall(1))));
        let mem = create(64).unwrap();
        assert_eq!(mem.last_addr().0, (64 << 20) - 1);
    }
}
