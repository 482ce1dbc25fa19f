//! tc classifiers attached to each instance's host-side interface (TAP or veth).
//!
//! Packets the instance sends arrive on the interface's tc ingress hook ([`hearth_egress`]);
//! packets going to the instance leave through its tc egress hook ([`hearth_ingress`]).

// On the host (workspace-wide builds and clippy) this is an ordinary program that says what it
// is; the programs themselves only exist in the bpfel build.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// aya's program macros emit an undocumented wrapper for each program.
#![allow(missing_docs)]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use hearth_ebpf_common::{Counter, Verdict};

/// Packets and bytes per [`Verdict`], per CPU.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Verdict::COUNT, 0);

/// Adds one packet of `ctx.len()` bytes to the counter for `verdict`.
#[inline(always)]
fn count(ctx: &TcContext, verdict: Verdict) {
    if let Some(counter) = COUNTERS.get_ptr_mut(verdict as u32) {
        // SAFETY: the pointer comes from the per-CPU map and stays valid for this program run;
        // no other CPU touches this CPU's slot.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
}

/// Packets sent by the instance (tc ingress on its host-side interface).
#[classifier]
pub fn hearth_egress(ctx: TcContext) -> i32 {
    count(&ctx, Verdict::EgressAllowed);
    TC_ACT_PIPE
}

/// Packets going to the instance (tc egress on its host-side interface).
#[classifier]
pub fn hearth_ingress(ctx: TcContext) -> i32 {
    count(&ctx, Verdict::IngressAllowed);
    TC_ACT_PIPE
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "hearth-ebpf is an eBPF object: hearth-agent's build.rs builds it for bpfel-unknown-none"
    );
    std::process::exit(2);
}

/// The kernel only lets GPL-compatible programs use some helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
