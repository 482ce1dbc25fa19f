//! The guest-physical memory layout: the one place every address and IRQ of the microVM is
//! defined. `docs/vmm.md` shows the same table for people.
//!
//! ```text
//! 0x0000_0000 ┬ real-mode IVT/BDA (unused)
//! 0x0000_0500 │ GDT (4 entries), IDT (empty) right after it
//! 0x0000_7000 │ zero page (Linux `boot_params`), pointed to by RSI at entry
//! 0x0000_8ff0 │ initial stack pointer (grows down)
//! 0x0000_9000 │ PML4, PDPT, 4 page directories: identity map of 0..4 GiB in 2 MiB pages
//! 0x0002_0000 │ kernel command line (≤ 2 KiB)
//! 0x0009_fc00 │ EBDA: MP floating pointer + MP configuration table
//! 0x000a_0000 │ (hole: VGA/BIOS area, not RAM in the e820 map)
//! 0x0010_0000 │ kernel (vmlinux segments / bzImage protected-mode code), RAM …
//!             │ … initrd at the top of low RAM, page aligned
//! 0xc000_0000 ┼ MMIO gap (1 GiB, never RAM)
//! 0xc000_0000 │ boot timer (one page)
//! 0xc000_1000 │ virtio-mmio device 0, IRQ 5; device n at +n × 0x1000, IRQ 5 + n
//! 0xfec0_0000 │ IOAPIC
//! 0xfee0_0000 │ LAPIC
//! 0x1_0000_0000 ┴ RAM above 4 GiB when memory > 3 GiB
//! ```
//!
//! Port I/O: COM1 (8250 UART) at 0x3f8–0x3ff on IRQ 4, i8042 at 0x60 and 0x64 on IRQ 1.

/// Where the GDT is written.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT is written.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux's zero page (`struct boot_params`), passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP/RBP.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the [`PDE_COUNT`] page directories (one per GiB).
pub const PDE_START: u64 = 0xb000;
/// Page directories: 4 map 0..4 GiB, which covers low RAM, the MMIO gap and the boot timer.
pub const PDE_COUNT: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line, terminating NUL included (Linux's x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives. RAM ends here in e820.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte of "high" memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap (no RAM between this and 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// The boot-timer page (Firecracker's address): a guest write of [`BOOT_TIMER_MAGIC`] at its
/// first byte makes the VMM log the time since its own process start.
pub const BOOT_TIMER_ADDR: u64 = MMIO_GAP_START;
/// Size of the boot-timer region.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The value that marks "the guest got here".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// First virtio-mmio device.
pub const VIRTIO_MMIO_START: u64 = BOOT_TIMER_ADDR + BOOT_TIMER_SIZE;
/// Each virtio-mmio device's register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IRQ of the first virtio-mmio device; device n gets `VIRTIO_IRQ_BASE + n`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest IRQ the IOAPIC routes (24 pins).
pub const IRQ_MAX: u32 = 23;
/// How many virtio-mmio devices fit the IRQ range.
pub const VIRTIO_MAX_DEVICES: u32 = IRQ_MAX - VIRTIO_IRQ_BASE + 1;

/// The IOAPIC's registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's task-state-segment pages (three pages in the MMIO gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// COM1's port base.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1's port count.
pub const SERIAL_PORT_LEN: u16 = 8;
/// COM1's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 status/command port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 keyboard IRQ.
pub const I8042_KBD_IRQ: u32 = 1;

/// Guest-physical address of virtio-mmio device `index`.
pub const fn virtio_mmio_addr(index: u32) -> u64 {
    VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE
}

/// IRQ of virtio-mmio device `index`.
pub const fn virtio_irq(index: u32) -> u32 {
    VIRTIO_IRQ_BASE + index
}

/// The RAM regions for `mem_size` bytes of guest memory: below the MMIO gap, and the rest above
/// 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]
        );
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 4 * 8),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, PDE_COUNT * 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, 0x400),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 + a.1 <= HIMEM_START);
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
        assert!(virtio_mmio_addr(VIRTIO_MAX_DEVICES) < IOAPIC_ADDR);
    }
}
