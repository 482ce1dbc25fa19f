//! The Intel MultiProcessor table (spec 1.4) in the EBDA: one processor entry per vCPU, the
//! ISA bus, the IOAPIC and its 24 interrupt routes, LINT0/LINT1. Linux finds the CPUs and the
//! IOAPIC through it (a guest without ACPI has no MADT).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{EBDA_START, IOAPIC_ADDR, IRQ_MAX, LAPIC_ADDR};

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than fit the EBDA.
    #[error("{0} vCPUs do not fit the MP table (at most {MAX_VCPUS})")]
    TooManyVcpus(u8),
    /// The table could not be written.
    #[error("Cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Most vCPUs the table describes (it must fit the 1 KiB EBDA).
pub const MAX_VCPUS: u8 = 32;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table's bytes: the 16-byte floating pointer followed by the configuration table, to be
/// placed at [`EBDA_START`].
pub fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus;
    let config_addr = EBDA_START as u32 + 16;

    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        entries.extend([
            ENTRY_PROCESSOR,
            cpu,
            APIC_VERSION,
            CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
        ]);
        entries.extend(CPU_STEPPING.to_le_bytes());
        entries.extend((CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend([0u8; 8]);
    }
    entries.extend([ENTRY_BUS, 0]);
    entries.extend(*b"ISA   ");
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend((IOAPIC_ADDR as u32).to_le_bytes());
    for irq in 0..=IRQ_MAX as u8 {
        // Conforming polarity and trigger mode; source bus 0 (ISA), IRQ n to IOAPIC pin n.
        entries.extend([ENTRY_INTSRC, IRQ_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend([ENTRY_LINTSRC, IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([ENTRY_LINTSRC, IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(vcpus) + 1 + 1 + (IRQ_MAX as u16 + 1) + 2;

    let mut header = Vec::with_capacity(44);
    header.extend(*b"PCMP");
    header.extend(((44 + entries.len()) as u16).to_le_bytes());
    header.extend([SPEC_REV, 0]);
    header.extend(*b"HEARTH  ");
    header.extend(*b"HEARTH-VMM  ");
    header.extend(0u32.to_le_bytes());
    header.extend(0u16.to_le_bytes());
    header.extend(entry_count.to_le_bytes());
    header.extend((LAPIC_ADDR as u32).to_le_bytes());
    header.extend([0u8; 4]);
    debug_assert_eq!(header.len(), 44);
    let mut table = header;
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend(*b"_MP_");
    fp.extend(config_addr.to_le_bytes());
    fp.extend([1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend(table);
    if out.len() > 0x400 {
        return Err(MptableError::TooManyVcpus(vcpus));
    }
    Ok(out)
}

/// Writes the table for `vcpus` vCPUs to guest memory.
pub fn write<M: GuestMemoryBackend>(mem: &M, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, MAX_VCPUS] {
            let t = build(n).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let cfg = &t[16..];
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(n) + 28);
            let cpus = cfg[44..]
                .chunks(20)
                .take(n as usize)
                .filter(|e| e[0] == 0)
                .count();
            assert_eq!(cpus, n as usize);
        }
    }

    #[test]
    fn refuses_impossible_counts() {
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
