//! tc classifiers attached (with TCX) to each instance's host-side interface (TAP or veth).
//!
//! Packets the instance sends arrive on the interface's tc ingress hook ([`hearth_egress`]);
//! packets going to the instance leave through its tc egress hook ([`hearth_ingress`]). Each
//! attachment has its own copy of every map below; the layouts are in `hearth-ebpf-common`.
//!
//! A passed packet returns `TCX_NEXT` (-1), so programs attached after ours still see it; a
//! dropped one returns `TC_ACT_SHOT`. Every packet is counted once, per CPU, under its verdict.

// On the host (workspace-wide builds and clippy) this is an ordinary program that says what it
// is; the programs themselves only exist in the bpfel build.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// aya's program macros emit an undocumented wrapper for each program.
#![allow(missing_docs)]
// The header structs mirror wire formats; not every field is read.
#![allow(dead_code)]

mod egress;
mod ingress;
mod parse;
mod policy;

use aya_ebpf::{
    macros::{classifier, map},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use hearth_ebpf_common::{
    COUNTER_SLOTS, Config, Counter, Direction, FLOW_TABLE_DEFAULT, FlowKey, FlowValue,
    LPM_MAX_ENTRIES, LpmV4, LpmV6, Meta, RuleSet, SPECIAL_MAX_ENTRIES, Verdict,
};

/// Packets and bytes per direction and verdict, per CPU.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
/// The two halves of the configuration.
#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(2, 0);
/// The live policy version.
#[map(name = "ACTIVE")]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
#[map(name = "ALLOW_V4")]
static ALLOW_V4: LpmTrie<LpmV4, RuleSet> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);
#[map(name = "ALLOW_V6")]
static ALLOW_V6: LpmTrie<LpmV6, RuleSet> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);
#[map(name = "DENY_V4")]
static DENY_V4: LpmTrie<LpmV4, RuleSet> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);
#[map(name = "DENY_V6")]
static DENY_V6: LpmTrie<LpmV6, RuleSet> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);
/// Ranges that are not "the internet".
#[map(name = "SPECIAL_V4")]
static SPECIAL_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(SPECIAL_MAX_ENTRIES, 0);
#[map(name = "SPECIAL_V6")]
static SPECIAL_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(SPECIAL_MAX_ENTRIES, 0);
/// Flows either side was allowed to open, keyed from the instance's side.
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(FLOW_TABLE_DEFAULT, 0);
/// The loader's record of the attachment; the programs never read it.
#[map(name = "META")]
static META: Array<Meta> = Array::with_max_entries(1, 0);

/// `TCX_NEXT`: let the packet continue (to later programs, then the stack).
const PASS: i32 = -1;
/// `TC_ACT_SHOT`.
const DROP: i32 = 2;

/// Adds one packet of `ctx.len()` bytes to the counter for `verdict` in `direction`.
#[inline(always)]
fn count(ctx: &TcContext, direction: Direction, verdict: Verdict) {
    if let Some(counter) = COUNTERS.get_ptr_mut(verdict.slot(direction)) {
        // SAFETY: the pointer comes from the per-CPU map and stays valid for this program run;
        // no other CPU touches this CPU's slot and tc programs do not nest on one CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
}

#[inline(always)]
fn action(verdict: Verdict) -> i32 {
    if verdict.is_pass() { PASS } else { DROP }
}

/// Whether the skb carries an offloaded VLAN tag (not visible in the packet data).
#[inline(always)]
fn vlan_tagged(ctx: &TcContext) -> bool {
    // SAFETY: `skb` is the context pointer the kernel passed to the program; `vlan_present` is
    // a readable `__sk_buff` field for tc programs.
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

/// Packets sent by the instance (tc ingress on its host-side interface).
#[classifier]
pub fn hearth_egress(ctx: TcContext) -> i32 {
    let verdict = egress::decide(&ctx);
    count(&ctx, Direction::Egress, verdict);
    action(verdict)
}

/// Packets going to the instance (tc egress on its host-side interface).
#[classifier]
pub fn hearth_ingress(ctx: TcContext) -> i32 {
    let verdict = ingress::decide(&ctx);
    count(&ctx, Direction::Ingress, verdict);
    action(verdict)
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
