//! CPUID for each vCPU: what `KVM_GET_SUPPORTED_CPUID` offers, with the topology (APIC ids,
//! logical processor counts, leaf 0xB, AMD's core counts), the hypervisor bit and KVM's
//! hypervisor leaf set for a VM of `vcpu_count` single-threaded cores in one package.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// Why the CPUID table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The table is full.
    #[error("CPUID table has no room for leaf {0:#x}")]
    Full(u32),
}

/// Leaf 0x1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 EDX: the logical-processor count in EBX is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: legacy multi-core detection.
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// KVM's hypervisor signature, "KVMKVMKVM\0\0\0", as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// Leaf 0xB level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` things (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..Default::default()
    }
}

/// Adapts the supported CPUID to vCPU `cpu_index` of `vcpu_count`.
pub fn normalize(cpuid: &mut CpuId, cpu_index: u8, vcpu_count: u8) -> Result<(), CpuidError> {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(vcpu_count);
    let core_bits = bits_for(count);

    // Leaf 0x1F (extended topology v2) would override 0xB in Linux; we describe one level only.
    let mut entries: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .copied()
        .filter(|e| e.function != 0x1f && e.function != 0xb && e.function != 0x4000_0000)
        .collect();

    for e in &mut entries {
        match e.function {
            0x1 => {
                // APIC id, logical processors per package, CLFLUSH line size in 8-byte units.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package; caches of level ≥ 3 are
                // shared by all cores, lower levels are per core.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            0x8000_0001 => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 => {
                // AMD: NC (cores - 1) and the APIC id bits used for the core.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            0x8000_001e => {
                // AMD: extended APIC id, core id with one thread per core, node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }

    // Extended topology: SMT level (one thread per core), then the core level.
    let mut smt = entry(0xb, 0);
    smt.ebx = 1;
    smt.ecx = LEVEL_TYPE_SMT << 8;
    smt.edx = apic_id;
    let mut core = entry(0xb, 1);
    core.eax = core_bits;
    core.ebx = count;
    core.ecx = (LEVEL_TYPE_CORE << 8) | 1;
    core.edx = apic_id;
    let mut end = entry(0xb, 2);
    end.ecx = 2;
    end.edx = apic_id;

    let mut hv = entry(0x4000_0000, 0);
    hv.flags = 0;
    // The highest KVM leaf the kernel reported (features in 0x4000_0001), at least 0x4000_0001.
    hv.eax = entries
        .iter()
        .filter(|e| (0x4000_0001..0x4000_0100).contains(&e.function))
        .map(|e| e.function)
        .max()
        .unwrap_or(0x4000_0001);
    [hv.ebx, hv.ecx, hv.edx] = KVM_SIGNATURE;

    entries.extend([smt, core, end, hv]);
    // Make sure leaf 0 announces leaf 0xB.
    if let Some(leaf0) = entries.iter_mut().find(|e| e.function == 0) {
        leaf0.eax = leaf0.eax.max(0xb);
    }

    let mut out = CpuId::new(0).map_err(|_| CpuidError::Full(0))?;
    for e in entries {
        out.push(e).map_err(|_| CpuidError::Full(e.function))?;
    }
    *cpuid = out;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap_or_else(|| panic!("leaf {f:#x}/{i} missing"))
    }

    fn sample() -> CpuId {
        let mut c = CpuId::new(0).unwrap();
        for (f, i) in [
            (0, 0),
            (1, 0),
            (4, 0),
            (4, 3),
            (0xb, 0),
            (0x1f, 0),
            (0x8000_0008, 0),
        ] {
            let mut e = entry(f, i);
            if f == 4 && i == 3 {
                e.eax = 3 << 5;
            }
            c.push(e).unwrap();
        }
        c
    }

    #[test]
    fn topology_for_four_vcpus() {
        let mut c = sample();
        normalize(&mut c, 2, 4).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.ebx, smt.edx, (smt.ecx >> 8) & 0xff), (1, 2, 1));
        assert_eq!((core.eax, core.ebx, (core.ecx >> 8) & 0xff), (2, 4, 2));
        assert!(!c.as_slice().iter().any(|e| e.function == 0x1f));
        let hv = find(&c, 0x4000_0000, 0);
        assert_eq!([hv.ebx, hv.ecx, hv.edx], KVM_SIGNATURE);
        assert_eq!(find(&c, 4, 3).eax >> 26, 3);
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&c, 4, 0).eax >> 14 & 0xfff, 0);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 3);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = sample();
        normalize(&mut c, 0, 1).unwrap();
        assert_eq!(find(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 1).eax, 0);
    }

    #[test]
    fn signature_spells_kvm() {
        let bytes: Vec<u8> = KVM_SIGNATURE.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
    }
}
