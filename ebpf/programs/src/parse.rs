//! Header parsing. Everything is read with `bpf_skb_load_bytes` (through [`TcContext::load`]),
//! which also works when the headers are not in the linear part of the skb, and every length
//! the packet claims is checked against what the packet holds.

use aya_ebpf::programs::TcContext;
use hearth_ebpf_common::{DropReason, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;

/// ICMP echo request / reply types, per family.
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// Neighbour discovery types (RFC 4861).
pub const NDP_RS: u8 = 133;
pub const NDP_NS: u8 = 135;
pub const NDP_NA: u8 = 136;
const NDP_FIRST: u8 = 133;
const NDP_LAST: u8 = 137;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    src: u32,
    dst: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    vtcfl: u32,
    payload_len: u16,
    next: u8,
    hop_limit: u8,
    src: [u32; 4],
    dst: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ArpHdr {
    pub htype: u16,
    pub ptype: u16,
    pub hlen: u8,
    pub plen: u8,
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    id: u16,
    seq: u16,
}

/// An IP packet's addresses and transport fields. IPv4 addresses use the first word.
pub struct Packet {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol of the transport header.
    pub proto: u8,
    /// TTL / hop limit.
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Offset of the transport header.
    pub l4_off: usize,
    /// Bytes from the transport header to the end of the IP payload.
    pub l4_len: usize,
    /// TCP/UDP ports, host byte order (0 otherwise).
    pub sport: u16,
    pub dport: u16,
    /// ICMP / ICMPv6 type and echo identifier (0 otherwise).
    pub icmp_type: u8,
    pub icmp_id: u16,
}

impl Packet {
    /// Whether the transport is this family's ICMP.
    #[inline(always)]
    pub fn is_icmp(&self) -> bool {
        (self.family == 4 && self.proto == PROTO_ICMP)
            || (self.family == 6 && self.proto == PROTO_ICMPV6)
    }

    /// Whether this is an IPv6 neighbour discovery message.
    #[inline(always)]
    pub fn is_ndp(&self) -> bool {
        self.family == 6
            && self.proto == PROTO_ICMPV6
            && self.icmp_type >= NDP_FIRST
            && self.icmp_type <= NDP_LAST
    }
}

#[inline(always)]
pub fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, DropReason> {
    ctx.load::<T>(offset).map_err(|_| DropReason::Malformed)
}

#[inline(always)]
pub fn mac_eq(a: &[u8; 6], b: &[u8; 6]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]
}

#[inline(always)]
pub fn addr_eq(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// Parses the IPv4 or IPv6 header after the Ethernet header and the start of the transport
/// header. Fragments, IPv4 options and IPv6 extension headers are refused: their transport
/// fields cannot be matched reliably, so the programs fail closed.
#[inline(always)]
pub fn parse_ip(ctx: &TcContext, ethertype: u16) -> Result<Packet, DropReason> {
    let frame_len = ctx.len() as usize;
    let mut p = Packet {
        family: 0,
        proto: 0,
        hop_limit: 0,
        src: [0; 4],
        dst: [0; 4],
        l4_off: 0,
        l4_len: 0,
        sport: 0,
        dport: 0,
        icmp_type: 0,
        icmp_id: 0,
    };
    if ethertype == ETH_P_IP {
        let ip: Ipv4Hdr = load(ctx, ETH_HLEN)?;
        if ip.vihl >> 4 != 4 {
            return Err(DropReason::Malformed);
        }
        let ihl = (ip.vihl & 0xf) as usize;
        if ihl < 5 {
            return Err(DropReason::Malformed);
        }
        let tot_len = u16::from_be(ip.tot_len) as usize;
        if tot_len < IPV4_HLEN || ETH_HLEN + tot_len > frame_len {
            return Err(DropReason::Malformed);
        }
        if ihl != 5 {
            return Err(DropReason::IpOptions);
        }
        // More-fragments flag or a fragment offset.
        if u16::from_be(ip.frag_off) & 0x3fff != 0 {
            return Err(DropReason::Fragment);
        }
        p.family = 4;
        p.proto = ip.protocol;
        p.hop_limit = ip.ttl;
        p.src[0] = ip.src;
        p.dst[0] = ip.dst;
        p.l4_off = ETH_HLEN + IPV4_HLEN;
        p.l4_len = tot_len - IPV4_HLEN;
    } else {
        let ip: Ipv6Hdr = load(ctx, ETH_HLEN)?;
        if (u32::from_be(ip.vtcfl) >> 28) != 6 {
            return Err(DropReason::Malformed);
        }
        let payload = u16::from_be(ip.payload_len) as usize;
        if ETH_HLEN + IPV6_HLEN + payload > frame_len {
            return Err(DropReason::Malformed);
        }
        match ip.next {
            44 => return Err(DropReason::Fragment),
            // Hop-by-hop, routing, AH, destination options, mobility, HIP, shim6, experiments.
            0 | 43 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => {
                return Err(DropReason::IpOptions);
            }
            _ => {}
        }
        p.family = 6;
        p.proto = ip.next;
        p.hop_limit = ip.hop_limit;
        p.src = ip.src;
        p.dst = ip.dst;
        p.l4_off = ETH_HLEN + IPV6_HLEN;
        p.l4_len = payload;
    }
    parse_l4(ctx, &mut p)?;
    Ok(p)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, p: &mut Packet) -> Result<(), DropReason> {
    if p.proto == PROTO_TCP {
        if p.l4_len < 20 {
            return Err(DropReason::Malformed);
        }
        let ports: [u16; 2] = load(ctx, p.l4_off)?;
        let doff: u8 = load(ctx, p.l4_off + 12)?;
        let hlen = ((doff >> 4) as usize) * 4;
        if hlen < 20 || hlen > p.l4_len {
            return Err(DropReason::Malformed);
        }
        p.sport = u16::from_be(ports[0]);
        p.dport = u16::from_be(ports[1]);
    } else if p.proto == PROTO_UDP {
        if p.l4_len < 8 {
            return Err(DropReason::Malformed);
        }
        let ports: [u16; 2] = load(ctx, p.l4_off)?;
        p.sport = u16::from_be(ports[0]);
        p.dport = u16::from_be(ports[1]);
    } else if p.is_icmp() {
        if p.l4_len < 8 {
            return Err(DropReason::Malformed);
        }
        let icmp: IcmpHdr = load(ctx, p.l4_off)?;
        p.icmp_type = icmp.kind;
        p.icmp_id = u16::from_be(icmp.id);
    }
    Ok(())
}

/// The flow fields of a packet quoted by an ICMP error; for an echo request the ports are
/// (echo id, 0).
pub struct Quoted {
    pub proto: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

/// The packet an ICMP error quotes: the error's payload starts with the original IP header and
/// at least 8 bytes of its transport header. `None` when the quote is not something a flow can
/// be found for.
#[inline(always)]
pub fn quoted_flow(ctx: &TcContext, p: &Packet) -> Result<Option<Quoted>, DropReason> {
    let off = p.l4_off + 8;
    let (proto, src, dst, l4) = if p.family == 4 {
        let ip: Ipv4Hdr = load(ctx, off)?;
        if ip.vihl != 0x45 {
            return Ok(None);
        }
        (
            ip.protocol,
            [ip.src, 0, 0, 0],
            [ip.dst, 0, 0, 0],
            off + IPV4_HLEN,
        )
    } else {
        let ip: Ipv6Hdr = load(ctx, off)?;
        (ip.next, ip.src, ip.dst, off + IPV6_HLEN)
    };
    if proto == PROTO_TCP || proto == PROTO_UDP {
        let ports: [u16; 2] = load(ctx, l4)?;
        return Ok(Some(Quoted {
            proto,
            src,
            dst,
            sport: u16::from_be(ports[0]),
            dport: u16::from_be(ports[1]),
        }));
    }
    let echo_request = if p.family == 4 {
        ICMP_ECHO_REQUEST
    } else {
        ICMPV6_ECHO_REQUEST
    };
    if proto == p.proto {
        let icmp: IcmpHdr = load(ctx, l4)?;
        if icmp.kind == echo_request {
            return Ok(Some(Quoted {
                proto,
                src,
                dst,
                sport: u16::from_be(icmp.id),
                dport: 0,
            }));
        }
    }
    Ok(None)
}
