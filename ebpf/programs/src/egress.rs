//! Packets the instance sends (the interface's tc ingress hook): anti-spoofing, ARP and NDP for
//! its own addresses, answers on flows the ingress proxy opened, then the egress policy.

use aya_ebpf::programs::TcContext;
use hearth_ebpf_common::{
    Config, DropReason, FLAG_HAS_V4, FlowKey, FlowValue, ORIGIN_EGRESS, ORIGIN_INGRESS, PROTO_TCP,
    PassReason, Verdict,
};

use crate::{
    parse::{
        ArpHdr, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, EthHdr, ICMP_ECHO_REQUEST,
        ICMPV6_ECHO_REQUEST, NDP_NA, NDP_NS, NDP_RS, Packet, load, mac_eq, parse_ip,
    },
    policy::{
        active, egress_policy, flow_mut, fresh, is_http_port, is_instance_addr, is_instance_v6,
        is_proxy, now, policy_port, record_flow, stored_reason, touch,
    },
};

const ARP_HTYPE_ETHER: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;

/// Decides about one packet sent by the instance.
#[inline(always)]
pub fn decide(ctx: &TcContext) -> Verdict {
    match try_decide(ctx) {
        Ok(v) => v,
        Err(reason) => Verdict::Drop(reason),
    }
}

#[inline(always)]
fn try_decide(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let Some((cfg, version)) = active() else {
        return Err(DropReason::NoPolicy);
    };
    if crate::vlan_tagged(ctx) {
        return Err(DropReason::Vlan);
    }
    let eth: EthHdr = load(ctx, 0)?;
    if !mac_eq(&eth.src, &cfg.instance_mac) {
        return Err(DropReason::SpoofedMac);
    }
    let ethertype = u16::from_be(eth.proto);
    if ethertype == ETH_P_ARP {
        return arp(ctx, cfg);
    }
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Err(DropReason::Ethertype);
    }
    let p = parse_ip(ctx, ethertype)?;
    if p.is_ndp() {
        return ndp(ctx, cfg, &p);
    }
    if !is_instance_addr(cfg, p.family, &p.src) {
        return Err(DropReason::SpoofedIp);
    }
    Ok(ip(cfg, version, &p))
}

/// ARP requests and replies that speak for the instance's own IPv4 address and MAC.
#[inline(always)]
fn arp(ctx: &TcContext, cfg: &Config) -> Result<Verdict, DropReason> {
    let arp: ArpHdr = load(ctx, ETH_HLEN)?;
    let op = u16::from_be(arp.op);
    let ok = cfg.flags & FLAG_HAS_V4 != 0
        && u16::from_be(arp.htype) == ARP_HTYPE_ETHER
        && u16::from_be(arp.ptype) == ETH_P_IP
        && arp.hlen == 6
        && arp.plen == 4
        && (op == ARP_OP_REQUEST || op == ARP_OP_REPLY)
        && mac_eq(&arp.sha, &cfg.instance_mac)
        && u32::from_ne_bytes(arp.spa) == cfg.instance_v4;
    if ok {
        Ok(Verdict::Pass(PassReason::Arp))
    } else {
        Err(DropReason::Arp)
    }
}

/// Router and neighbour solicitations, and neighbour advertisements for the instance's own
/// addresses; a link-layer address option must carry the instance's MAC.
#[inline(always)]
fn ndp(ctx: &TcContext, cfg: &Config, p: &Packet) -> Result<Verdict, DropReason> {
    if p.hop_limit != 255 {
        return Err(DropReason::Ndp);
    }
    let unspecified = p.src[0] == 0 && p.src[1] == 0 && p.src[2] == 0 && p.src[3] == 0;
    let own_source = is_instance_v6(cfg, &p.src);
    let options = if p.icmp_type == NDP_RS {
        if !own_source && !unspecified {
            return Err(DropReason::SpoofedIp);
        }
        p.l4_off + 8
    } else if p.icmp_type == NDP_NS {
        if p.l4_len < 24 {
            return Err(DropReason::Malformed);
        }
        if !own_source && !unspecified {
            return Err(DropReason::SpoofedIp);
        }
        p.l4_off + 24
    } else if p.icmp_type == NDP_NA {
        if p.l4_len < 24 {
            return Err(DropReason::Malformed);
        }
        if !own_source {
            return Err(DropReason::SpoofedIp);
        }
        let target: [u32; 4] = load(ctx, p.l4_off + 8)?;
        if !is_instance_v6(cfg, &target) {
            return Err(DropReason::Ndp);
        }
        p.l4_off + 24
    } else {
        // Router advertisements and redirects: the instance is not a router.
        return Err(DropReason::Ndp);
    };
    check_lladdr_options(ctx, cfg, options, p.l4_off + p.l4_len)?;
    Ok(Verdict::Pass(PassReason::Ndp))
}

/// Source/target link-layer address options (types 1 and 2) must name the instance's MAC. Looks
/// at the first few options, which is where Linux and every other stack put them.
#[inline(always)]
fn check_lladdr_options(
    ctx: &TcContext,
    cfg: &Config,
    mut off: usize,
    end: usize,
) -> Result<(), DropReason> {
    let mut i = 0;
    while i < 3 {
        if off + 8 > end {
            return Ok(());
        }
        let head: [u8; 2] = load(ctx, off)?;
        if head[1] == 0 {
            return Err(DropReason::Malformed);
        }
        if head[0] == 1 || head[0] == 2 {
            let mac: [u8; 6] = load(ctx, off + 2)?;
            if head[1] != 1 || !mac_eq(&mac, &cfg.instance_mac) {
                return Err(DropReason::Ndp);
            }
        }
        off += head[1] as usize * 8;
        i += 1;
    }
    Ok(())
}

/// The flow an egress packet belongs to; `None` for ICMP other than echo requests (nothing may
/// answer those).
#[inline(always)]
fn flow_key(p: &Packet) -> Option<FlowKey> {
    let (instance_port, remote_port) = if p.is_icmp() {
        let echo = if p.family == 4 {
            ICMP_ECHO_REQUEST
        } else {
            ICMPV6_ECHO_REQUEST
        };
        if p.icmp_type != echo {
            return None;
        }
        (p.icmp_id, 0)
    } else {
        (p.sport, p.dport)
    };
    Some(FlowKey {
        instance_addr: p.src,
        remote_addr: p.dst,
        instance_port,
        remote_port,
        protocol: p.proto,
        family: p.family,
        _pad: [0; 2],
    })
}

/// An IP packet from one of the instance's addresses.
#[inline(always)]
fn ip(cfg: &Config, version: u32, p: &Packet) -> Verdict {
    let now = now();
    let port = policy_port(p);
    let key = flow_key(p);
    if let Some(key) = &key
        && let Some(flow) = flow_mut(key)
        && fresh(cfg, flow, p.proto, now)
    {
        if flow.origin == ORIGIN_INGRESS {
            // The instance answering the ingress proxy (SYN-ACK included), whatever the egress
            // policy says, as long as the proxy and port are still the configured ones.
            if p.proto == PROTO_TCP && is_http_port(cfg, p.sport) && is_proxy(cfg, p.family, &p.dst)
            {
                touch(flow, now);
                return Verdict::Pass(PassReason::Reply);
            }
        } else if flow.policy_version == version && flow.policy_port == port {
            // Already found allowed under this very policy version.
            touch(flow, now);
            return Verdict::Pass(stored_reason(flow.reason));
        }
    }
    let verdict = egress_policy(cfg, version, p.family, &p.dst, p.proto, port);
    if let (Verdict::Pass(reason), Some(key)) = (verdict, key) {
        record_flow(
            &key,
            &FlowValue {
                last_seen_ns: now,
                policy_version: version,
                policy_port: port,
                origin: ORIGIN_EGRESS,
                reason: reason as u8,
            },
        );
    }
    verdict
}
