//! The vCPU state Linux's 64-bit boot protocol expects at the kernel's entry: identity page
//! tables, a flat GDT, long-mode segment and control registers, RSI = zero page, a clean FPU.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_COUNT, PDE_START, PDPTE_START,
    PML4_START, ZERO_PAGE_START,
};

/// Why the boot register state could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory could not hold the GDT, IDT or page tables.
    #[error("Cannot write the {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// Selector of the 64-bit code segment (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment (GDT entry 2).
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS (GDT entry 3).
pub const TSS_SELECTOR: u16 = 0x18;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Packs a GDT entry from its flags (access byte in bits 0..8, flags nibble in bits 12..16),
/// base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The `kvm_segment` KVM needs for a GDT entry (the hidden part of a segment register).
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With granularity set the limit counts 4 KiB pages.
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

/// Writes the GDT, the empty IDT and the identity page tables (0..4 GiB in 2 MiB pages, so the
/// boot timer and the virtio-mmio windows are mapped from the first instruction on).
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|e| RegsError::Write("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| RegsError::Write("IDT", e))?;

    // Present | writable.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(|e| RegsError::Write("PML4", e))?;
    for gib in 0..PDE_COUNT {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + gib * 8))
            .map_err(|e| RegsError::Write("PDPT", e))?;
        // One write of the whole directory: 512 present | writable | 2 MiB-page entries.
        let mut dir = [0u8; 4096];
        for (i, chunk) in dir.chunks_exact_mut(8).enumerate() {
            let entry = ((gib * 512 + i as u64) << 21) | 0x83;
            chunk.copy_from_slice(&entry.to_le_bytes());
        }
        mem.write_slice(&dir, GuestAddress(pd))
            .map_err(|e| RegsError::Write("page directory", e))?;
    }
    Ok(())
}

/// Puts `sregs` into 64-bit mode on the boot GDT and page tables.
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General-purpose registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state at reset (x87 control word and MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_round_trip_to_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (code.selector, code.l, code.db, code.type_),
            (CODE_SELECTOR, 1, 0, 0xb)
        );
        assert_eq!(
            (code.base, code.limit, code.g, code.present),
            (0, 0xffff_ffff, 1, 1)
        );
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(
            (data.selector, data.db, data.type_, data.s),
            (DATA_SELECTOR, 1, 3, 1)
        );
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tss.selector, tss.s, tss.type_), (TSS_SELECTOR, 0, 0xb));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        // Walk a few addresses: the boot timer, RAM, the LAPIC.
        for addr in [0u64, 0x10_0000, 0xc000_0000, 0xc000_1000, 0xfee0_0000] {
            let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + ((addr >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((addr >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(
                pde & 0x83,
                0x83,
                "{addr:#x} not mapped as a present 2 MiB page"
            );
            assert_eq!(pde & !0x1f_ffff, addr & !0x1f_ffff);
        }
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mut sregs);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.selector, CODE_SELECTOR);
        let regs = boot_regs(0x10_0000);
        assert_eq!((regs.rip, regs.rsi), (0x10_0000, ZERO_PAGE_START));
    }
}
