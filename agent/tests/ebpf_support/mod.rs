//! Crafted Ethernet frames for the eBPF tests (`BPF_PROG_TEST_RUN`). Checksums are filled in
//! where cheap; the programs do not check them.

#![allow(dead_code)]

pub mod lab;
pub mod vlan_push;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const ETH_IP: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV6: u16 = 0x86dd;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet with DF set and no options.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with(src, dst, proto, payload, 0x4000, &[])
}

/// An IPv4 packet with the given flags/fragment-offset word and options.
pub fn ipv4_with(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload: &[u8],
    frag: u16,
    options: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let hlen = 20 + options.len();
    let total = (hlen + payload.len()) as u16;
    let mut h = vec![0x40 | (hlen / 4) as u8, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, hop_limit]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An ICMP / ICMPv6 message: type, code, checksum 0, then `rest` (id + seq for echo).
pub fn icmp(kind: u8, code: u8, rest: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(rest);
    m
}

pub fn echo(kind: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut rest = id.to_be_bytes().to_vec();
    rest.extend_from_slice(&seq.to_be_bytes());
    rest.extend_from_slice(b"hearth-ping-data");
    icmp(kind, 0, &rest)
}

pub fn arp(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

/// A neighbour solicitation (135) or advertisement (136) for `target`, with an optional
/// source/target link-layer address option.
pub fn nd(kind: u8, target: Ipv6Addr, lladdr: Option<Mac>) -> Vec<u8> {
    let mut rest = vec![0u8; 4];
    if kind == 136 {
        rest[0] = 0x60; // solicited + override
    }
    rest.extend_from_slice(&target.octets());
    if let Some(mac) = lladdr {
        rest.push(if kind == 135 { 1 } else { 2 });
        rest.push(1);
        rest.extend_from_slice(&mac);
    }
    icmp(kind, 0, &rest)
}

/// Router solicitation (133) or advertisement (134), no options.
pub fn router(kind: u8) -> Vec<u8> {
    let len = if kind == 133 { 4 } else { 12 };
    icmp(kind, 0, &vec![0; len])
}

/// The solicited-node multicast address of `a` and its MAC.
pub fn solicited_node(a: Ipv6Addr) -> (Ipv6Addr, Mac) {
    let o = a.octets();
    let addr = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    (addr, [0x33, 0x33, 0xff, o[13], o[14], o[15]])
}

/// A whole frame for an IP packet of either family.
pub fn ip_frame(
    dst_mac: Mac,
    src_mac: Mac,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth(dst_mac, src_mac, ETH_IP, &ipv4(s, d, proto, l4)),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            eth(dst_mac, src_mac, ETH_IPV6, &ipv6(s, d, proto, 64, l4))
        }
        _ => panic!("mixed families"),
    }
}

/// Pads a frame to the Ethernet minimum, as a NIC would.
pub fn pad(mut f: Vec<u8>) -> Vec<u8> {
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}
