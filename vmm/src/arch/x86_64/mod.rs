//! x86-64 specifics: the memory layout, boot-time vCPU state, CPUID, MSRs, the MP table and
//! Linux's boot protocol.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
