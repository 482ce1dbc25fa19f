//! Packets going to the instance (the interface's tc egress hook): HTTP from the ingress proxy
//! to the instance's HTTP ports, replies to flows the instance opened (still allowed by its
//! egress policy), ICMP errors about them, and the ARP/NDP addressing needs. Nothing else.

use aya_ebpf::programs::TcContext;
use hearth_ebpf_common::{
    Config, DropReason, FLAG_HAS_V4, FlowKey, FlowValue, ORIGIN_EGRESS, ORIGIN_INGRESS, PROTO_TCP,
    PassReason, Verdict,
};

use crate::{
    parse::{
        ArpHdr, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, EthHdr, ICMP_ECHO_REPLY,
        ICMPV6_ECHO_REPLY, NDP_NA, NDP_NS, Packet, addr_eq, load, mac_eq, parse_ip, quoted_flow,
    },
    policy::{
        active, egress_policy, flow_mut, fresh, is_http_port, is_instance_addr, is_instance_v6,
        is_proxy, now, record_flow, touch,
    },
};

const ARP_HTYPE_ETHER: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
const BROADCAST: [u8; 6] = [0xff; 6];
/// ff02::1 (all nodes), in network byte order words.
const ALL_NODES: [u32; 4] = [
    u32::from_ne_bytes([0xff, 0x02, 0, 0]),
    0,
    0,
    u32::from_ne_bytes([0, 0, 0, 1]),
];

/// Decides about one packet going to the instance.
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
    let ethertype = u16::from_be(eth.proto);
    if ethertype == ETH_P_ARP {
        return arp(ctx, cfg, &eth);
    }
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Err(DropReason::Ethertype);
    }
    let p = parse_ip(ctx, ethertype)?;
    if p.is_ndp() {
        return ndp(ctx, cfg, &p);
    }
    if !mac_eq(&eth.dst, &cfg.instance_mac) || !is_instance_addr(cfg, p.family, &p.dst) {
        return Err(DropReason::NotForInstance);
    }
    ip(ctx, cfg, version, &p)
}

/// ARP requests for the instance's IPv4 address and replies to its own requests.
#[inline(always)]
fn arp(ctx: &TcContext, cfg: &Config, eth: &EthHdr) -> Result<Verdict, DropReason> {
    let arp: ArpHdr = load(ctx, ETH_HLEN)?;
    let op = u16::from_be(arp.op);
    let well_formed = cfg.flags & FLAG_HAS_V4 != 0
        && u16::from_be(arp.htype) == ARP_HTYPE_ETHER
        && u16::from_be(arp.ptype) == ETH_P_IP
        && arp.hlen == 6
        && arp.plen == 4
        && u32::from_ne_bytes(arp.tpa) == cfg.instance_v4;
    let to_instance = mac_eq(&eth.dst, &cfg.instance_mac);
    let ok = well_formed
        && ((op == ARP_OP_REQUEST && (to_instance || mac_eq(&eth.dst, &BROADCAST)))
            || (op == ARP_OP_REPLY && to_instance && mac_eq(&arp.tha, &cfg.instance_mac)));
    if ok {
        Ok(Verdict::Pass(PassReason::Arp))
    } else {
        Err(DropReason::Arp)
    }
}

/// Neighbour solicitations for the instance's addresses and advertisements to it.
#[inline(always)]
fn ndp(ctx: &TcContext, cfg: &Config, p: &Packet) -> Result<Verdict, DropReason> {
    if p.hop_limit != 255 {
        return Err(DropReason::Ndp);
    }
    if p.icmp_type == NDP_NS {
        if p.l4_len < 24 {
            return Err(DropReason::Malformed);
        }
        let target: [u32; 4] = load(ctx, p.l4_off + 8)?;
        if is_instance_v6(cfg, &target) {
            return Ok(Verdict::Pass(PassReason::Ndp));
        }
    } else if p.icmp_type == NDP_NA {
        if p.l4_len < 24 {
            return Err(DropReason::Malformed);
        }
        if is_instance_v6(cfg, &p.dst) || addr_eq(&p.dst, &ALL_NODES) {
            return Ok(Verdict::Pass(PassReason::Ndp));
        }
    }
    Err(DropReason::Ndp)
}

/// An IP packet to one of the instance's addresses.
#[inline(always)]
fn ip(ctx: &TcContext, cfg: &Config, version: u32, p: &Packet) -> Result<Verdict, DropReason> {
    let now = now();
    let mut from_proxy = false;
    let mut http = false;
    if p.proto == PROTO_TCP {
        from_proxy = is_proxy(cfg, p.family, &p.src);
        http = is_http_port(cfg, p.dport);
        if from_proxy && http {
            let key = FlowKey {
                instance_addr: p.dst,
                remote_addr: p.src,
                instance_port: p.dport,
                remote_port: p.sport,
                protocol: PROTO_TCP,
                family: p.family,
                _pad: [0; 2],
            };
            match flow_mut(&key) {
                Some(flow) if flow.origin == ORIGIN_INGRESS => touch(flow, now),
                _ => record_flow(
                    &key,
                    &FlowValue {
                        last_seen_ns: now,
                        policy_version: version,
                        policy_port: 0,
                        origin: ORIGIN_INGRESS,
                        reason: PassReason::Http as u8,
                    },
                ),
            }
            return Ok(Verdict::Pass(PassReason::Http));
        }
    }

    // Replies to flows the instance opened, and ICMP errors about them.
    let mut related = false;
    let key = if p.is_icmp() {
        let echo_reply = if p.family == 4 {
            ICMP_ECHO_REPLY
        } else {
            ICMPV6_ECHO_REPLY
        };
        if p.icmp_type == echo_reply {
            Some((p.proto, p.dst, p.src, p.icmp_id, 0))
        } else if is_icmp_error(p) {
            related = true;
            quoted_flow(ctx, p)?.map(|q| (q.proto, q.src, q.dst, q.sport, q.dport))
        } else {
            None
        }
    } else {
        Some((p.proto, p.dst, p.src, p.dport, p.sport))
    };
    if let Some((protocol, instance_addr, remote_addr, instance_port, remote_port)) = key {
        let key = FlowKey {
            instance_addr,
            remote_addr,
            instance_port,
            remote_port,
            protocol,
            family: p.family,
            _pad: [0; 2],
        };
        if let Some(flow) = flow_mut(&key)
            && flow.origin == ORIGIN_EGRESS
            && fresh(cfg, flow, protocol, now)
        {
            if flow.policy_version != version {
                // The policy changed since the flow was last checked: it must still allow it.
                let verdict = egress_policy(
                    cfg,
                    version,
                    p.family,
                    &remote_addr,
                    protocol,
                    flow.policy_port,
                );
                if let Verdict::Drop(reason) = verdict {
                    return Err(reason);
                }
                flow.policy_version = version;
            }
            touch(flow, now);
            let reason = if related {
                PassReason::Related
            } else {
                PassReason::Reply
            };
            return Ok(Verdict::Pass(reason));
        }
    }
    if from_proxy {
        return Err(DropReason::NotHttpPort);
    }
    if http {
        return Err(DropReason::NotFromProxy);
    }
    Err(DropReason::Unsolicited)
}

/// ICMP errors that quote a packet: destination unreachable (incl. "fragmentation needed"),
/// time exceeded, parameter problem; for ICMPv6 also "packet too big".
#[inline(always)]
fn is_icmp_error(p: &Packet) -> bool {
    if p.family == 4 {
        p.icmp_type == 3 || p.icmp_type == 11 || p.icmp_type == 12
    } else {
        p.icmp_type >= 1 && p.icmp_type <= 4
    }
}
