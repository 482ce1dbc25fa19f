//! The instance's configuration, the egress policy decision and the flow table; shared by both
//! programs (replies going to the instance are checked against the egress policy too).

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use hearth_ebpf_common::{
    Config, DropReason, FLAG_DNS, FLAG_DNS_V4, FLAG_DNS_V6, FLAG_GATEWAY_PING, FLAG_GATEWAY_V4,
    FLAG_GATEWAY_V6, FLAG_HAS_V4, FLAG_INTERNET, FLAG_PROXY_V4, FLAG_PROXY_V6, FlowKey, FlowValue,
    HALF_BITS, MAX_HTTP_PORTS, MAX_INSTANCE_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    PassReason, Verdict,
};

use crate::{
    ACTIVE, ALLOW_V4, ALLOW_V6, CONFIG, DENY_V4, DENY_V6, FLOWS, SPECIAL_V4, SPECIAL_V6,
    parse::{ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST, Packet, addr_eq},
};

/// A flow's `last_seen_ns` is refreshed at most this often, so that busy flows do not write to
/// the shared entry on every packet.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// The live configuration and its policy version; `None` until the loader wrote a policy.
#[inline(always)]
pub fn active() -> Option<(&'static Config, u32)> {
    let version = *ACTIVE.get(0)?;
    if version == 0 {
        return None;
    }
    Some((CONFIG.get(version & 1)?, version))
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns takes no arguments and has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether `addr` (of `family`) is one of the instance's own addresses.
#[inline(always)]
pub fn is_instance_addr(cfg: &Config, family: u8, addr: &[u32; 4]) -> bool {
    if family == 4 {
        return cfg.flags & FLAG_HAS_V4 != 0 && addr[0] == cfg.instance_v4;
    }
    is_instance_v6(cfg, addr)
}

#[inline(always)]
pub fn is_instance_v6(cfg: &Config, addr: &[u32; 4]) -> bool {
    let mut i = 0;
    while i < MAX_INSTANCE_V6 {
        if i as u32 >= cfg.n_instance_v6 {
            return false;
        }
        if addr_eq(&cfg.instance_v6[i], addr) {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
pub fn is_proxy(cfg: &Config, family: u8, addr: &[u32; 4]) -> bool {
    if family == 4 {
        cfg.flags & FLAG_PROXY_V4 != 0 && addr[0] == cfg.proxy_v4
    } else {
        cfg.flags & FLAG_PROXY_V6 != 0 && addr_eq(addr, &cfg.proxy_v6)
    }
}

#[inline(always)]
pub fn is_http_port(cfg: &Config, port: u16) -> bool {
    let mut i = 0;
    while i < MAX_HTTP_PORTS {
        if i as u32 >= cfg.n_http_ports {
            return false;
        }
        if cfg.http_ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// The "port" the egress policy matches: the destination port, or the ICMP type.
#[inline(always)]
pub fn policy_port(p: &Packet) -> u16 {
    if p.is_icmp() {
        p.icmp_type as u16
    } else {
        p.dport
    }
}

#[inline(always)]
fn v4_key(half: u8, addr: u32) -> Key<[u8; 5]> {
    let b = addr.to_ne_bytes();
    Key::new(HALF_BITS + 32, [half, b[0], b[1], b[2], b[3]])
}

#[inline(always)]
fn v6_key(half: u8, addr: &[u32; 4]) -> Key<[u8; 17]> {
    let mut data = [0u8; 17];
    data[0] = half;
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        data[1 + 4 * i] = b[0];
        data[2 + 4 * i] = b[1];
        data[3 + 4 * i] = b[2];
        data[4 + 4 * i] = b[3];
        i += 1;
    }
    Key::new(HALF_BITS + 128, data)
}

#[inline(always)]
fn v6_plain_key(addr: &[u32; 4]) -> Key<[u8; 16]> {
    let mut data = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        data[4 * i] = b[0];
        data[1 + 4 * i] = b[1];
        data[2 + 4 * i] = b[2];
        data[3 + 4 * i] = b[3];
        i += 1;
    }
    Key::new(128, data)
}

/// The egress policy for a packet of `proto` to `dst` (`port`: destination port or ICMP type):
/// denied CIDRs first (they win over everything), then the node's resolver and gateway, the
/// allowed CIDRs, and the internet.
#[inline(always)]
pub fn egress_policy(
    cfg: &Config,
    version: u32,
    family: u8,
    dst: &[u32; 4],
    proto: u8,
    port: u16,
) -> Verdict {
    let half = (version & 1) as u8;
    let dns_proto = proto == PROTO_TCP || proto == PROTO_UDP;
    let dns_on = cfg.flags & FLAG_DNS != 0 && dns_proto && port == 53;
    let ping_on = cfg.flags & FLAG_GATEWAY_PING != 0;
    if family == 4 {
        let key = v4_key(half, dst[0]);
        if let Some(set) = DENY_V4.get(&key)
            && set.matches(proto, port)
        {
            return Verdict::Drop(DropReason::Denied);
        }
        if dns_on && cfg.flags & FLAG_DNS_V4 != 0 && dst[0] == cfg.dns_v4 {
            return Verdict::Pass(PassReason::Dns);
        }
        if ping_on
            && cfg.flags & FLAG_GATEWAY_V4 != 0
            && dst[0] == cfg.gateway_v4
            && proto == PROTO_ICMP
            && port == ICMP_ECHO_REQUEST as u16
        {
            return Verdict::Pass(PassReason::Gateway);
        }
        if let Some(set) = ALLOW_V4.get(&key)
            && set.matches(proto, port)
        {
            return Verdict::Pass(PassReason::Rule);
        }
        if cfg.flags & FLAG_INTERNET != 0
            && SPECIAL_V4.get(Key::new(32, dst[0].to_ne_bytes())).is_none()
        {
            return Verdict::Pass(PassReason::Internet);
        }
    } else {
        let key = v6_key(half, dst);
        if let Some(set) = DENY_V6.get(&key)
            && set.matches(proto, port)
        {
            return Verdict::Drop(DropReason::Denied);
        }
        if dns_on && cfg.flags & FLAG_DNS_V6 != 0 && addr_eq(dst, &cfg.dns_v6) {
            return Verdict::Pass(PassReason::Dns);
        }
        if ping_on
            && cfg.flags & FLAG_GATEWAY_V6 != 0
            && addr_eq(dst, &cfg.gateway_v6)
            && proto == PROTO_ICMPV6
            && port == ICMPV6_ECHO_REQUEST as u16
        {
            return Verdict::Pass(PassReason::Gateway);
        }
        if let Some(set) = ALLOW_V6.get(&key)
            && set.matches(proto, port)
        {
            return Verdict::Pass(PassReason::Rule);
        }
        if cfg.flags & FLAG_INTERNET != 0 && SPECIAL_V6.get(v6_plain_key(dst)).is_none() {
            return Verdict::Pass(PassReason::Internet);
        }
    }
    Verdict::Drop(DropReason::NotAllowed)
}

/// Whether a flow seen at `last_seen_ns` is still alive at `now`.
#[inline(always)]
pub fn fresh(cfg: &Config, flow: &FlowValue, proto: u8, now: u64) -> bool {
    let timeout = if proto == PROTO_TCP {
        cfg.tcp_timeout_ns
    } else {
        cfg.other_timeout_ns
    };
    now <= flow.last_seen_ns || now - flow.last_seen_ns <= timeout
}

#[inline(always)]
pub fn touch(flow: &mut FlowValue, now: u64) {
    if now > flow.last_seen_ns + TOUCH_INTERVAL_NS {
        flow.last_seen_ns = now;
    }
}

/// Looks a flow up for in-place update.
#[inline(always)]
pub fn flow_mut(key: &FlowKey) -> Option<&'static mut FlowValue> {
    let ptr = FLOWS.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup and stays valid for this program run
    // (RCU); concurrent writers on other CPUs only store whole aligned words, and every field is
    // valid for any bit pattern.
    Some(unsafe { &mut *ptr })
}

/// Records a flow; a full table evicts the least recently used entry.
#[inline(always)]
pub fn record_flow(key: &FlowKey, value: &FlowValue) {
    // A failed insert (out of memory) only means the replies of this flow will be dropped.
    let _ = FLOWS.insert(key, value, 0);
}

/// The pass reason stored in a flow entry.
#[inline(always)]
pub fn stored_reason(reason: u8) -> PassReason {
    const INTERNET: u8 = PassReason::Internet as u8;
    const DNS: u8 = PassReason::Dns as u8;
    const GATEWAY: u8 = PassReason::Gateway as u8;
    match reason {
        INTERNET => PassReason::Internet,
        DNS => PassReason::Dns,
        GATEWAY => PassReason::Gateway,
        _ => PassReason::Rule,
    }
}
