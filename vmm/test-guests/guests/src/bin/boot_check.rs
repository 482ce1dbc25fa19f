//! Checks the boot state the VMM handed over and prints one line per check:
//! `boot_check: ok <name>` or `boot_check: FAIL <name>: <detail>`, then
//! `boot_check: done failures=<n>`. Expectations come from the command line:
//! `boot_check.vcpus=<n> boot_check.mem_mib=<n>`.

#![no_std]
#![no_main]

use guest_rt::{boot::BootParams, cpu, exit, println, report::Checks};

fn sum(addr: u64, len: usize) -> u8 {
    // SAFETY: called on the MP table the VMM wrote in the EBDA (identity-mapped RAM).
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: reads inside the MP table, identity-mapped RAM.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

/// Entry point: 64-bit mode, boot_params in RSI (the second argument register).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start(_rdi: u64, rsi: u64) -> ! {
    let rsp: u64;
    // SAFETY: reads the stack pointer.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    // SAFETY: the VMM passes the zero page in RSI.
    let bp = unsafe { BootParams::new(rsi as *const u8) };
    let mut c = Checks::new("boot_check");
    let vcpus: u32 = bp
        .param("boot_check.vcpus")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mem_mib: u64 = bp
        .param("boot_check.mem_mib")
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);

    c.check_with(
        "entry_registers",
        rsi == 0x7000 && rsp < 0x8ff0 && rsp > 0x8000,
        format_args!("rsi={rsi:#x} rsp={rsp:#x}"),
    );
    c.check_with(
        "zero_page",
        bp.u16_at(0x1fe) == 0xaa55 && bp.u32_at(0x202) == 0x5372_6448 && bp.byte(0x210) == 0xff,
        format_args!(
            "boot_flag={:#x} header={:#x} loader={:#x}",
            bp.u16_at(0x1fe),
            bp.u32_at(0x202),
            bp.byte(0x210)
        ),
    );
    let cmdline = bp.cmdline();
    c.check_with(
        "cmdline",
        cmdline.contains("hearth.test=boot_check"),
        format_args!("{cmdline:?}"),
    );
    println!("boot_check: cmdline {cmdline}");

    if bp.param("boot_check.initrd") == Some("1") {
        let (image, size) = (bp.u32_at(0x218), bp.u32_at(0x21c));
        // SAFETY: the VMM loaded the initrd at `image`, identity-mapped RAM.
        let head = unsafe { core::ptr::read_unaligned(image as usize as *const [u8; 8]) };
        c.check_with(
            "initrd",
            size > 0 && image % 4096 == 0 && &head == b"HEARTHRD",
            format_args!("image={image:#x} size={size} head={head:?}"),
        );
    }

    let mut e820 = bp.e820();
    let first = e820.next();
    let second = e820.next();
    let mem_end = mem_mib << 20;
    let ok = matches!(first, Some(e) if e.addr == 0 && e.size == 0x9fc00 && e.kind == 1)
        && matches!(second, Some(e) if e.addr == 0x10_0000 && e.addr + e.size == mem_end && e.kind == 1)
        && e820.next().is_none();
    c.check_with("e820", ok, format_args!("{first:?} {second:?}"));

    let (_, ebx, ecx, _) = cpu::cpuid(1, 0);
    c.check_with(
        "cpuid_1",
        ecx & (1 << 31) != 0 && (ebx >> 16) & 0xff == vcpus && ebx >> 24 == 0,
        format_args!("ebx={ebx:#x} ecx={ecx:#x}"),
    );
    let (a0, b0, c0, d0) = cpu::cpuid(0xb, 0);
    let (a1, b1, c1, d1) = cpu::cpuid(0xb, 1);
    c.check_with(
        "cpuid_b",
        b0 == 1
            && (c0 >> 8) & 0xff == 1
            && d0 == 0
            && b1 == vcpus
            && (c1 >> 8) & 0xff == 2
            && d1 == 0,
        format_args!("{a0:#x} {b0:#x} {c0:#x} {d0:#x} / {a1:#x} {b1:#x} {c1:#x} {d1:#x}"),
    );
    let (ha, hb, hc, hd) = cpu::cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&hb.to_le_bytes());
    sig[4..8].copy_from_slice(&hc.to_le_bytes());
    sig[8..12].copy_from_slice(&hd.to_le_bytes());
    c.check_with(
        "cpuid_hypervisor",
        &sig == b"KVMKVMKVM\0\0\0" && ha >= 0x4000_0001,
        format_args!("eax={ha:#x} sig={sig:?}"),
    );

    let fp = 0x9fc00u64;
    // SAFETY: the EBDA is RAM.
    let sig_ok = unsafe { core::ptr::read_unaligned(fp as *const [u8; 4]) } == *b"_MP_";
    let table = u64::from(read_u32(fp + 4));
    let table_len = usize::from(read_u32(table + 4) as u16);
    let entries = read_u32(table + 34) & 0xffff;
    let mut cpus = 0;
    let mut bsp_ok = false;
    let mut ioapic_ok = false;
    let mut at = table + 44;
    for _ in 0..entries {
        // SAFETY: entries lie inside the table the VMM wrote.
        let kind = unsafe { core::ptr::read(at as *const u8) };
        if kind == 0 {
            cpus += 1;
            // SAFETY: as above.
            let (id, flags) = unsafe {
                (
                    core::ptr::read((at + 1) as *const u8),
                    core::ptr::read((at + 3) as *const u8),
                )
            };
            if id == 0 && flags & 3 == 3 {
                bsp_ok = true;
            }
            at += 20;
        } else {
            if kind == 2 && read_u32(at + 4) == 0xfec0_0000 {
                ioapic_ok = true;
            }
            at += 8;
        }
    }
    c.check_with(
        "mptable",
        sig_ok
            && sum(fp, 16) == 0
            && sum(table, table_len) == 0
            && cpus == vcpus
            && bsp_ok
            && ioapic_ok,
        format_args!("sig={sig_ok} cpus={cpus} bsp={bsp_ok} ioapic={ioapic_ok}"),
    );

    // SAFETY: these MSRs exist on every x86-64 CPU and KVM emulates them.
    let (efer, mtrr, misc, sysenter_cs) = unsafe {
        (
            cpu::rdmsr(0xc000_0080),
            cpu::rdmsr(0x2ff),
            cpu::rdmsr(0x1a0),
            cpu::rdmsr(0x174),
        )
    };
    c.check_with(
        "msrs",
        efer & 0x500 == 0x500 && mtrr == 0x806 && misc & 1 == 1 && sysenter_cs == 0,
        format_args!("efer={efer:#x} mtrr_def_type={mtrr:#x} misc_enable={misc:#x} sysenter_cs={sysenter_cs:#x}"),
    );

    let (cr0, cr3, cr4) = (cpu::cr0(), cpu::cr3(), cpu::cr4());
    // Walk the tables for the boot-timer page: PML4[0] → PDPT[3] → PD[0].
    // SAFETY: the page tables live in identity-mapped RAM.
    let pde = unsafe {
        let pml4e = cpu::read_phys_u64(cr3 & !0xfff);
        let pdpte = cpu::read_phys_u64((pml4e & !0xfff) + 3 * 8);
        cpu::read_phys_u64(pdpte & !0xfff)
    };
    c.check_with(
        "paging",
        cr0 & 0x8000_0001 == 0x8000_0001
            && cr4 & 0x20 != 0
            && cr3 == 0x9000
            && pde & 0x83 == 0x83
            && pde & !0x1f_ffff == 0xc000_0000,
        format_args!("cr0={cr0:#x} cr3={cr3:#x} cr4={cr4:#x} boot_timer_pde={pde:#x}"),
    );
    let (limit, base) = cpu::sgdt();
    c.check_with(
        "gdt",
        base == 0x500 && limit == 31 && cpu::cs() == 0x8,
        format_args!("base={base:#x} limit={limit} cs={:#x}", cpu::cs()),
    );

    exit::boot_timer();
    c.done();
    exit::reset()
}
