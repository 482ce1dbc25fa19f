//! CPUID, MSRs, control registers, descriptor tables.

use core::arch::asm;

/// CPUID leaf/subleaf → (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads an MSR.
///
/// # Safety
///
/// The MSR must exist (reading an unknown one raises #GP, which a test guest cannot handle).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists; rdmsr only reads it.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CR0.
pub fn cr0() -> u64 {
    let v: u64;
    // SAFETY: reading a control register in ring 0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// CR3.
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: as for `cr0`.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// CR4.
pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: as for `cr0`.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

/// The code segment selector.
pub fn cs() -> u16 {
    let v: u16;
    // SAFETY: reading a segment register has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) v, options(nomem, nostack)) };
    v
}

/// GDTR: (limit, base).
pub fn sgdt() -> (u16, u64) {
    let mut buf = [0u8; 10];
    // SAFETY: sgdt stores 10 bytes into our buffer.
    unsafe { asm!("sgdt [{}]", in(reg) buf.as_mut_ptr(), options(nostack)) };
    (
        u16::from_le_bytes([buf[0], buf[1]]),
        u64::from_le_bytes([
            buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8], buf[9],
        ]),
    )
}

/// Reads a u64 of physical memory (identity mapped).
///
/// # Safety
///
/// `addr` must be mapped RAM.
pub unsafe fn read_phys_u64(addr: u64) -> u64 {
    // SAFETY: the caller guarantees the address is mapped.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}
