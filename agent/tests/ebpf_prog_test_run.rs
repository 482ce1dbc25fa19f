//! The eBPF programs run on crafted frames with `BPF_PROG_TEST_RUN` (no interface involved):
//! every rule and every drop reason that a frame can trigger. (`NoPolicy` and `Vlan` need state
//! or skb metadata a test run cannot set; `ebpf_netns.rs` covers them.)

mod ebpf_support;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ebpf_support::*;
use hearth_agent::ebpf::{
    Direction::{Egress, Ingress},
    DropReason as D, Filter, FlowTimeouts, LoadOptions, NodeAddr, PassReason as P, Policy, Verdict,
};
use hearth_testkit::{require, skip};

const M: Mac = [0x02, 0x48, 0x54, 0, 0, 2];
const H: Mac = [0x02, 0x48, 0x54, 0, 0, 1];
const OTHER_MAC: Mac = [0x02, 0x48, 0x54, 0, 0, 9];
const BCAST: Mac = [0xff; 6];

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const INST4: &str = "10.0.0.2";
const GW4: &str = "10.0.0.1";
const DNS4: &str = "10.0.0.53";
const INST6: &str = "fd00::2";
const GW6: &str = "fd00::1";
const DNS6: &str = "fd00::53";

fn policy() -> Policy {
    let mut p = Policy::new(M);
    p.instance_ipv4 = Some(v4(INST4));
    p.instance_ipv6 = vec![v6(INST6)];
    p.gateway = NodeAddr {
        v4: Some(v4(GW4)),
        v6: Some(v6(GW6)),
    };
    p.dns = NodeAddr {
        v4: Some(v4(DNS4)),
        v6: Some(v6(DNS6)),
    };
    p.ingress_proxy = p.gateway;
    p.allow_gateway_ping = true;
    p.http_ports = vec![8080, 8443];
    p.allow = [
        "198.51.100.0/24 tcp 443",
        "198.51.100.7 udp 5000-5010",
        "2001:db8:1::/48 tcp 443",
        "192.0.2.0/24 icmp 8",
        "192.0.2.128/25",
    ]
    .iter()
    .map(|r| r.parse().unwrap())
    .collect();
    p.deny = [
        "198.51.100.66",
        "2001:db8:1:66::/64 tcp",
        "0.0.0.0/0 tcp 25",
    ]
    .iter()
    .map(|r| r.parse().unwrap())
    .collect();
    p
}

fn load(p: &Policy) -> Option<Filter> {
    Some(Filter::load(p, &LoadOptions::default()).expect("load"))
}

/// A frame the instance sends.
fn out(dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
    let src = if dst.contains(':') { INST6 } else { INST4 };
    ip_frame(H, M, ip(src), ip(dst), proto, l4)
}

/// A frame going to the instance.
fn inn(src: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
    let dst = if src.contains(':') { INST6 } else { INST4 };
    ip_frame(M, H, ip(src), ip(dst), proto, l4)
}

#[track_caller]
fn check(f: &Filter, dir: hearth_agent::ebpf::Direction, frame: &[u8], want: Verdict) {
    let got = f.classify(dir, frame).expect("test run");
    assert_eq!(got, want, "{dir:?} frame {frame:02x?}");
}

#[test]
fn egress_rules_dns_gateway_and_internet() {
    require!(skip::root());
    let mut p = policy();
    let Some(mut f) = load(&p) else { return };
    let pass = |r| Verdict::Pass(r);
    let drop = |r| Verdict::Drop(r);
    // Allowed CIDRs with protocol and port ranges, both families.
    check(
        &f,
        Egress,
        &out("198.51.100.10", 6, &tcp(50000, 443, SYN)),
        pass(P::Rule),
    );
    check(
        &f,
        Egress,
        &out("198.51.100.10", 6, &tcp(50001, 80, SYN)),
        drop(D::NotAllowed),
    );
    check(
        &f,
        Egress,
        &out("198.51.100.7", 17, &udp(40000, 5005, b"x")),
        pass(P::Rule),
    );
    check(
        &f,
        Egress,
        &out("198.51.100.7", 17, &udp(40000, 5011, b"x")),
        drop(D::NotAllowed),
    );
    check(
        &f,
        Egress,
        &out("198.51.100.8", 17, &udp(40000, 5005, b"x")),
        drop(D::NotAllowed),
    );
    check(
        &f,
        Egress,
        &out("2001:db8:1::10", 6, &tcp(50000, 443, SYN)),
        pass(P::Rule),
    );
    check(
        &f,
        Egress,
        &out("2001:db8:2::10", 6, &tcp(50000, 443, SYN)),
        drop(D::NotAllowed),
    );
    // ICMP rules match the message type; a nested "any" CIDR allows everything.
    check(
        &f,
        Egress,
        &out("192.0.2.5", 1, &echo(8, 1, 1)),
        pass(P::Rule),
    );
    check(
        &f,
        Egress,
        &out("192.0.2.5", 1, &icmp(13, 0, &[0; 16])),
        drop(D::NotAllowed),
    );
    check(&f, Egress, &out("192.0.2.200", 47, &[0; 8]), pass(P::Rule));
    // Denied CIDRs win over allowed ones.
    check(
        &f,
        Egress,
        &out("198.51.100.66", 6, &tcp(50000, 443, SYN)),
        drop(D::Denied),
    );
    check(
        &f,
        Egress,
        &out("2001:db8:1:66::1", 6, &tcp(50000, 443, SYN)),
        drop(D::Denied),
    );
    check(
        &f,
        Egress,
        &out("192.0.2.200", 6, &tcp(50000, 25, SYN)),
        drop(D::Denied),
    );
    // The node's resolver (UDP and TCP 53 only) and gateway (echo only).
    check(
        &f,
        Egress,
        &out(DNS4, 17, &udp(40001, 53, b"q")),
        pass(P::Dns),
    );
    check(
        &f,
        Egress,
        &out(DNS4, 6, &tcp(40002, 53, SYN)),
        pass(P::Dns),
    );
    check(
        &f,
        Egress,
        &out(DNS6, 17, &udp(40001, 53, b"q")),
        pass(P::Dns),
    );
    check(
        &f,
        Egress,
        &out(DNS4, 17, &udp(40001, 54, b"q")),
        drop(D::NotAllowed),
    );
    check(&f, Egress, &out(GW4, 1, &echo(8, 7, 1)), pass(P::Gateway));
    check(
        &f,
        Egress,
        &out(GW6, 58, &echo(128, 7, 1)),
        pass(P::Gateway),
    );
    check(
        &f,
        Egress,
        &out(GW4, 6, &tcp(40003, 22, SYN)),
        drop(D::NotAllowed),
    );
    // Internet off: a public address is not allowed.
    check(
        &f,
        Egress,
        &out("11.22.33.44", 6, &tcp(50000, 80, SYN)),
        drop(D::NotAllowed),
    );

    // Live update: internet on, DNS and gateway ping off.
    p.internet = true;
    p.allow_dns = false;
    p.allow_gateway_ping = false;
    f.update_policy(&p).unwrap();
    assert_eq!(f.policy_version(), 2);
    check(
        &f,
        Egress,
        &out("11.22.33.44", 6, &tcp(50000, 80, SYN)),
        pass(P::Internet),
    );
    check(
        &f,
        Egress,
        &out("2a00:1234::1", 17, &udp(1, 2, b"")),
        pass(P::Internet),
    );
    // Special-purpose ranges are not the internet.
    for dst in [
        "10.9.9.9",
        "172.16.0.1",
        "169.254.169.254",
        "255.255.255.255",
        "100.64.0.1",
    ] {
        check(
            &f,
            Egress,
            &out(dst, 17, &udp(1, 2, b"")),
            drop(D::NotAllowed),
        );
    }
    for dst in [
        "fe80::1",
        "fc00::1",
        "::ffff:10.0.0.1",
        "ff02::1",
        "2001:db8:9::1",
    ] {
        check(
            &f,
            Egress,
            &out(dst, 17, &udp(1, 2, b"")),
            drop(D::NotAllowed),
        );
    }
    check(
        &f,
        Egress,
        &out(DNS4, 17, &udp(40001, 53, b"q")),
        drop(D::NotAllowed),
    );
    check(
        &f,
        Egress,
        &out(GW4, 1, &echo(8, 7, 1)),
        drop(D::NotAllowed),
    );
    // Denies still win, the internet included.
    check(
        &f,
        Egress,
        &out("11.22.33.44", 6, &tcp(50000, 25, SYN)),
        drop(D::Denied),
    );
    // An invalid policy changes nothing.
    let mut bad = p.clone();
    bad.http_ports = vec![0];
    assert!(f.update_policy(&bad).is_err());
    assert_eq!(f.policy_version(), 2);
    check(
        &f,
        Egress,
        &out("11.22.33.44", 6, &tcp(50000, 80, SYN)),
        pass(P::Internet),
    );
}

#[test]
fn egress_anti_spoofing_arp_and_ndp() {
    require!(skip::root());
    let Some(f) = load(&policy()) else { return };
    let pass = |r| Verdict::Pass(r);
    let drop = |r| Verdict::Drop(r);
    // Source MAC and IP must be the instance's.
    let l4 = tcp(50000, 443, SYN);
    let spoofed_mac = ip_frame(H, OTHER_MAC, ip(INST4), ip("198.51.100.10"), 6, &l4);
    check(&f, Egress, &spoofed_mac, drop(D::SpoofedMac));
    let spoofed_ip = ip_frame(H, M, ip("10.0.0.3"), ip("198.51.100.10"), 6, &l4);
    check(&f, Egress, &spoofed_ip, drop(D::SpoofedIp));
    let spoofed_ip6 = ip_frame(H, M, ip("fd00::3"), ip("2001:db8:1::1"), 6, &l4);
    check(&f, Egress, &spoofed_ip6, drop(D::SpoofedIp));
    // The EUI-64 link-local address is the instance's own.
    let ll = hearth_agent::ebpf::eui64_link_local(M);
    let from_ll = ip_frame(H, M, ll.into(), ip("2001:db8:1::1"), 6, &l4);
    check(&f, Egress, &from_ll, pass(P::Rule));

    // ARP only for its own address and MAC.
    let req = arp(1, M, v4(INST4), [0; 6], v4(GW4));
    check(&f, Egress, &pad(eth(BCAST, M, ETH_ARP, &req)), pass(P::Arp));
    let reply = arp(2, M, v4(INST4), H, v4(GW4));
    check(&f, Egress, &pad(eth(H, M, ETH_ARP, &reply)), pass(P::Arp));
    let lie = arp(2, M, v4("10.0.0.9"), H, v4(GW4));
    check(&f, Egress, &pad(eth(H, M, ETH_ARP, &lie)), drop(D::Arp));
    let lie_mac = arp(2, OTHER_MAC, v4(INST4), H, v4(GW4));
    check(&f, Egress, &pad(eth(H, M, ETH_ARP, &lie_mac)), drop(D::Arp));
    let rarp = arp(3, M, v4(INST4), H, v4(GW4));
    check(&f, Egress, &pad(eth(H, M, ETH_ARP, &rarp)), drop(D::Arp));

    // Neighbour discovery: solicitations from its addresses (or :: for DAD), advertisements
    // only for its own addresses, link-layer options only with its MAC, hop limit 255.
    let (sn, sn_mac) = solicited_node(v6(GW6));
    let ns =
        |src: Ipv6Addr, hl: u8, body: &[u8]| eth(sn_mac, M, ETH_IPV6, &ipv6(src, sn, 58, hl, body));
    check(
        &f,
        Egress,
        &ns(v6(INST6), 255, &nd(135, v6(GW6), Some(M))),
        pass(P::Ndp),
    );
    check(
        &f,
        Egress,
        &ns(ll, 255, &nd(135, v6(GW6), Some(M))),
        pass(P::Ndp),
    );
    check(
        &f,
        Egress,
        &ns(Ipv6Addr::UNSPECIFIED, 255, &nd(135, v6(INST6), None)),
        pass(P::Ndp),
    );
    check(
        &f,
        Egress,
        &ns(v6(INST6), 64, &nd(135, v6(GW6), Some(M))),
        drop(D::Ndp),
    );
    check(
        &f,
        Egress,
        &ns(v6(INST6), 255, &nd(135, v6(GW6), Some(OTHER_MAC))),
        drop(D::Ndp),
    );
    check(
        &f,
        Egress,
        &ns(v6("fd00::9"), 255, &nd(135, v6(GW6), None)),
        drop(D::SpoofedIp),
    );
    let na = |target: &str, mac| {
        eth(
            H,
            M,
            ETH_IPV6,
            &ipv6(v6(INST6), v6(GW6), 58, 255, &nd(136, v6(target), Some(mac))),
        )
    };
    check(&f, Egress, &na(INST6, M), pass(P::Ndp));
    check(&f, Egress, &na("fd00::9", M), drop(D::Ndp));
    check(&f, Egress, &na(INST6, OTHER_MAC), drop(D::Ndp));
    let all_routers = v6("ff02::2");
    let rs = eth(
        [0x33, 0x33, 0, 0, 0, 2],
        M,
        ETH_IPV6,
        &ipv6(ll, all_routers, 58, 255, &router(133)),
    );
    check(&f, Egress, &rs, pass(P::Ndp));
    let ra = eth(
        [0x33, 0x33, 0, 0, 0, 1],
        M,
        ETH_IPV6,
        &ipv6(ll, v6("ff02::1"), 58, 255, &router(134)),
    );
    check(&f, Egress, &ra, drop(D::Ndp));
}

#[test]
fn malformed_fragments_options_and_ethertypes_both_ways() {
    require!(skip::root());
    let Some(f) = load(&policy()) else { return };
    let drop = |r| Verdict::Drop(r);
    for (dir, src_mac, dst_mac, src, dst) in [
        (Egress, M, H, INST4, "198.51.100.10"),
        (Ingress, H, M, "198.51.100.10", INST4),
    ] {
        let (s, d) = (v4(src), v4(dst));
        let good = ipv4(s, d, 6, &tcp(443, 443, ACK));
        // Truncated: the IP header claims more than the frame holds.
        let mut truncated = eth(dst_mac, src_mac, ETH_IP, &good);
        truncated.truncate(14 + 30);
        check(&f, dir, &truncated, drop(D::Malformed));
        // A TCP header cut short (the kernel refuses test frames without a full IP header).
        let short_tcp = ipv4(s, d, 6, &tcp(443, 443, ACK)[..10]);
        check(
            &f,
            dir,
            &eth(dst_mac, src_mac, ETH_IP, &short_tcp),
            drop(D::Malformed),
        );
        // Wrong IP version, bad IHL, TCP data offset below 5, UDP shorter than its header.
        let mut bad_version = good.clone();
        bad_version[0] = 0x55;
        check(
            &f,
            dir,
            &eth(dst_mac, src_mac, ETH_IP, &bad_version),
            drop(D::Malformed),
        );
        let mut bad_ihl = good.clone();
        bad_ihl[0] = 0x44;
        check(
            &f,
            dir,
            &eth(dst_mac, src_mac, ETH_IP, &bad_ihl),
            drop(D::Malformed),
        );
        let mut doff = tcp(443, 443, ACK);
        doff[12] = 4 << 4;
        check(
            &f,
            dir,
            &eth(dst_mac, src_mac, ETH_IP, &ipv4(s, d, 6, &doff)),
            drop(D::Malformed),
        );
        check(
            &f,
            dir,
            &pad(eth(dst_mac, src_mac, ETH_IP, &ipv4(s, d, 17, &[0; 4]))),
            drop(D::Malformed),
        );
        // Fragments: more-fragments set, or a non-zero offset.
        let mf = ipv4_with(s, d, 6, &tcp(443, 443, ACK), 0x2000, &[]);
        check(
            &f,
            dir,
            &eth(dst_mac, src_mac, ETH_IP, &mf),
            drop(D::Fragment),
        );
        let later = ipv4_with(s, d, 6, &[0; 24], 0x0003, &[]);
        check(
            &f,
            dir,
            &eth(dst_mac, src_mac, ETH_IP, &later),
            drop(D::Fragment),
        );
        // IPv4 options (router alert).
        let opts = ipv4_with(s, d, 6, &tcp(443, 443, ACK), 0x4000, &[0x94, 4, 0, 0]);
        check(
            &f,
            dir,
            &eth(dst_mac, src_mac, ETH_IP, &opts),
            drop(D::IpOptions),
        );
        // Unknown ethertypes, in-band VLAN tags included.
        check(
            &f,
            dir,
            &pad(eth(dst_mac, src_mac, 0x88cc, &[0; 20])),
            drop(D::Ethertype),
        );
        check(
            &f,
            dir,
            &pad(eth(dst_mac, src_mac, 0x8100, &[0; 20])),
            drop(D::Ethertype),
        );
    }
    for (dir, src_mac, dst_mac, src, dst) in [
        (Egress, M, H, INST6, "2001:db8:1::1"),
        (Ingress, H, M, "2001:db8:1::1", INST6),
    ] {
        let (s, d) = (v6(src), v6(dst));
        // Payload length beyond the frame.
        let mut truncated = eth(
            dst_mac,
            src_mac,
            ETH_IPV6,
            &ipv6(s, d, 6, 64, &tcp(1, 443, ACK)),
        );
        truncated.truncate(14 + 40 + 10);
        check(&f, dir, &truncated, drop(D::Malformed));
        // Fragment header; hop-by-hop, routing and destination options headers.
        let frag = ipv6(s, d, 44, 64, &[6, 0, 0, 1, 0, 0, 0, 1]);
        check(
            &f,
            dir,
            &pad(eth(dst_mac, src_mac, ETH_IPV6, &frag)),
            drop(D::Fragment),
        );
        for ext in [0u8, 43, 60] {
            let pkt = ipv6(s, d, ext, 64, &[6, 0, 0, 0, 0, 0, 0, 0]);
            check(
                &f,
                dir,
                &pad(eth(dst_mac, src_mac, ETH_IPV6, &pkt)),
                drop(D::IpOptions),
            );
        }
    }
}

#[test]
fn ingress_http_from_the_proxy_and_answers() {
    require!(skip::root());
    let Some(f) = load(&policy()) else { return };
    let pass = |r| Verdict::Pass(r);
    let drop = |r| Verdict::Drop(r);
    // TCP from the proxy to an HTTP port, both families; the instance's answers (SYN-ACK
    // included) pass although its egress policy allows nothing to the proxy.
    for (proxy, inst) in [(GW4, INST4), (GW6, INST6)] {
        check(
            &f,
            Ingress,
            &inn(proxy, 6, &tcp(41000, 8080, SYN)),
            pass(P::Http),
        );
        let syn_ack = ip_frame(H, M, ip(inst), ip(proxy), 6, &tcp(8080, 41000, SYN | ACK));
        check(&f, Egress, &syn_ack, pass(P::Reply));
        check(
            &f,
            Ingress,
            &inn(proxy, 6, &tcp(41000, 8080, ACK)),
            pass(P::Http),
        );
        check(
            &f,
            Ingress,
            &inn(proxy, 6, &tcp(41001, 8443, SYN)),
            pass(P::Http),
        );
        // Not answering the proxy: the egress policy applies.
        let other = ip_frame(H, M, ip(inst), ip(proxy), 6, &tcp(8080, 41999, SYN | ACK));
        check(&f, Egress, &other, drop(D::NotAllowed));
        // Another port from the proxy, an HTTP port from elsewhere, UDP, ICMP: dropped.
        check(
            &f,
            Ingress,
            &inn(proxy, 6, &tcp(41000, 22, SYN)),
            drop(D::NotHttpPort),
        );
        check(
            &f,
            Ingress,
            &inn(proxy, 17, &udp(41000, 8080, b"x")),
            drop(D::Unsolicited),
        );
    }
    check(
        &f,
        Ingress,
        &inn("10.0.0.77", 6, &tcp(41000, 8080, SYN)),
        drop(D::NotFromProxy),
    );
    check(
        &f,
        Ingress,
        &inn("fd00::77", 6, &tcp(41000, 8080, SYN)),
        drop(D::NotFromProxy),
    );
    check(
        &f,
        Ingress,
        &inn(GW4, 1, &echo(8, 5, 1)),
        drop(D::Unsolicited),
    );
    check(
        &f,
        Ingress,
        &inn(GW6, 58, &echo(128, 5, 1)),
        drop(D::Unsolicited),
    );
    // Not addressed to the instance (IP or MAC).
    let other_ip = ip_frame(M, H, ip(GW4), ip("10.0.0.9"), 6, &tcp(41000, 8080, SYN));
    check(&f, Ingress, &other_ip, drop(D::NotForInstance));
    let other_mac = ip_frame(OTHER_MAC, H, ip(GW4), ip(INST4), 6, &tcp(41000, 8080, SYN));
    check(&f, Ingress, &other_mac, drop(D::NotForInstance));
    let bcast = ip_frame(BCAST, H, ip(GW4), ip("10.0.0.255"), 17, &udp(67, 68, b""));
    check(&f, Ingress, &bcast, drop(D::NotForInstance));
}

#[test]
fn ingress_replies_related_errors_arp_and_ndp() {
    require!(skip::root());
    let mut p = policy();
    let Some(mut f) = load(&p) else { return };
    let pass = |r| Verdict::Pass(r);
    let drop = |r| Verdict::Drop(r);
    // Nothing comes in unasked.
    check(
        &f,
        Ingress,
        &inn("198.51.100.10", 6, &tcp(443, 50000, SYN | ACK)),
        drop(D::Unsolicited),
    );
    // Replies to allowed egress: TCP, UDP, ICMP echo, both families.
    let syn = out("198.51.100.10", 6, &tcp(50000, 443, SYN));
    check(&f, Egress, &syn, pass(P::Rule));
    check(
        &f,
        Ingress,
        &inn("198.51.100.10", 6, &tcp(443, 50000, SYN | ACK)),
        pass(P::Reply),
    );
    check(&f, Egress, &syn, pass(P::Rule));
    // The reply must match the flow exactly.
    check(
        &f,
        Ingress,
        &inn("198.51.100.10", 6, &tcp(443, 50001, ACK)),
        drop(D::Unsolicited),
    );
    check(
        &f,
        Ingress,
        &inn("198.51.100.11", 6, &tcp(443, 50000, ACK)),
        drop(D::Unsolicited),
    );
    check(
        &f,
        Egress,
        &out("198.51.100.7", 17, &udp(40000, 5000, b"q")),
        pass(P::Rule),
    );
    check(
        &f,
        Ingress,
        &inn("198.51.100.7", 17, &udp(5000, 40000, b"a")),
        pass(P::Reply),
    );
    check(&f, Egress, &out(GW4, 1, &echo(8, 77, 1)), pass(P::Gateway));
    check(&f, Ingress, &inn(GW4, 1, &echo(0, 77, 1)), pass(P::Reply));
    check(
        &f,
        Ingress,
        &inn(GW4, 1, &echo(0, 78, 1)),
        drop(D::Unsolicited),
    );
    check(
        &f,
        Egress,
        &out("2001:db8:1::10", 6, &tcp(50000, 443, SYN)),
        pass(P::Rule),
    );
    check(
        &f,
        Ingress,
        &inn("2001:db8:1::10", 6, &tcp(443, 50000, SYN | ACK)),
        pass(P::Reply),
    );
    check(
        &f,
        Egress,
        &out(GW6, 58, &echo(128, 9, 1)),
        pass(P::Gateway),
    );
    check(&f, Ingress, &inn(GW6, 58, &echo(129, 9, 1)), pass(P::Reply));
    // ICMP errors quoting the instance's flows: "fragmentation needed", "packet too big".
    let quoted = ipv4(v4(INST4), v4("198.51.100.10"), 6, &tcp(50000, 443, ACK));
    let mut frag_needed = vec![0, 0, 0x05, 0xdc];
    frag_needed.extend_from_slice(&quoted[..28]);
    check(
        &f,
        Ingress,
        &inn("192.0.2.1", 1, &icmp(3, 4, &frag_needed)),
        pass(P::Related),
    );
    let unknown = ipv4(v4(INST4), v4("198.51.100.10"), 6, &tcp(50009, 443, ACK));
    let mut stray = vec![0, 0, 0x05, 0xdc];
    stray.extend_from_slice(&unknown[..28]);
    check(
        &f,
        Ingress,
        &inn("192.0.2.1", 1, &icmp(3, 4, &stray)),
        drop(D::Unsolicited),
    );
    let quoted6 = ipv6(
        v6(INST6),
        v6("2001:db8:1::10"),
        6,
        64,
        &tcp(50000, 443, ACK),
    );
    let mut too_big = vec![0, 0, 0x05, 0x00];
    too_big.extend_from_slice(&quoted6[..48]);
    check(
        &f,
        Ingress,
        &inn("2001:db8:ff::1", 58, &icmp(2, 0, &too_big)),
        pass(P::Related),
    );

    // A policy update that no longer allows a flow cuts its replies (and its egress).
    p.deny.push("198.51.100.10".parse().unwrap());
    f.update_policy(&p).unwrap();
    check(
        &f,
        Ingress,
        &inn("198.51.100.10", 6, &tcp(443, 50000, ACK)),
        drop(D::Denied),
    );
    check(&f, Egress, &syn, drop(D::Denied));
    // Unaffected flows keep working across the update.
    check(
        &f,
        Ingress,
        &inn("198.51.100.7", 17, &udp(5000, 40000, b"a")),
        pass(P::Reply),
    );
    check(
        &f,
        Ingress,
        &inn("2001:db8:1::10", 6, &tcp(443, 50000, ACK)),
        pass(P::Reply),
    );

    // ARP to the instance: requests for its address (broadcast or unicast), replies to it.
    let req = arp(1, H, v4(GW4), [0; 6], v4(INST4));
    check(
        &f,
        Ingress,
        &pad(eth(BCAST, H, ETH_ARP, &req)),
        pass(P::Arp),
    );
    check(&f, Ingress, &pad(eth(M, H, ETH_ARP, &req)), pass(P::Arp));
    let reply = arp(2, H, v4(GW4), M, v4(INST4));
    check(&f, Ingress, &pad(eth(M, H, ETH_ARP, &reply)), pass(P::Arp));
    let for_other = arp(1, H, v4(GW4), [0; 6], v4("10.0.0.9"));
    check(
        &f,
        Ingress,
        &pad(eth(BCAST, H, ETH_ARP, &for_other)),
        drop(D::Arp),
    );
    let reply_other = arp(2, H, v4(GW4), OTHER_MAC, v4(INST4));
    check(
        &f,
        Ingress,
        &pad(eth(M, H, ETH_ARP, &reply_other)),
        drop(D::Arp),
    );
    // NDP to the instance: solicitations for its addresses, advertisements to it.
    let (sn, sn_mac) = solicited_node(v6(INST6));
    let ns = |target: &str| {
        eth(
            sn_mac,
            H,
            ETH_IPV6,
            &ipv6(v6(GW6), sn, 58, 255, &nd(135, v6(target), Some(H))),
        )
    };
    check(&f, Ingress, &ns(INST6), pass(P::Ndp));
    check(&f, Ingress, &ns("fd00::9"), drop(D::Ndp));
    let na = eth(
        M,
        H,
        ETH_IPV6,
        &ipv6(v6(GW6), v6(INST6), 58, 255, &nd(136, v6(GW6), Some(H))),
    );
    check(&f, Ingress, &na, pass(P::Ndp));
    let na_hl = eth(
        M,
        H,
        ETH_IPV6,
        &ipv6(v6(GW6), v6(INST6), 58, 64, &nd(136, v6(GW6), Some(H))),
    );
    check(&f, Ingress, &na_hl, drop(D::Ndp));
    let ra = eth(
        M,
        H,
        ETH_IPV6,
        &ipv6(v6("fe80::1"), v6(INST6), 58, 255, &router(134)),
    );
    check(&f, Ingress, &ra, drop(D::Ndp));
}

#[test]
fn flows_expire() {
    require!(skip::root());
    let mut p = policy();
    p.flow_timeouts = FlowTimeouts {
        tcp: Duration::from_secs(1),
        other: Duration::from_secs(1),
    };
    let Some(f) = load(&p) else { return };
    check(
        &f,
        Egress,
        &out("198.51.100.7", 17, &udp(40000, 5000, b"q")),
        Verdict::Pass(P::Rule),
    );
    check(
        &f,
        Ingress,
        &inn("198.51.100.7", 17, &udp(5000, 40000, b"a")),
        Verdict::Pass(P::Reply),
    );
    assert_eq!(f.flows().unwrap().len(), 1);
    // The only way to let a timeout pass is to wait for it.
    std::thread::sleep(Duration::from_millis(2200));
    check(
        &f,
        Ingress,
        &inn("198.51.100.7", 17, &udp(5000, 40000, b"a")),
        Verdict::Drop(D::Unsolicited),
    );
}

#[test]
fn counters_add_up_per_reason() {
    require!(skip::root());
    let Some(f) = load(&policy()) else { return };
    let allowed = out("198.51.100.10", 6, &tcp(50000, 443, SYN));
    let denied = out("198.51.100.66", 17, &udp(1, 2, &[0; 100]));
    for _ in 0..5 {
        f.classify(Egress, &allowed).unwrap();
    }
    for _ in 0..3 {
        f.classify(Egress, &denied).unwrap();
    }
    let c = f.counters().unwrap();
    assert_eq!(c.passed_for(Egress, P::Rule).packets, 5);
    assert_eq!(
        c.passed_for(Egress, P::Rule).bytes,
        5 * allowed.len() as u64
    );
    assert_eq!(c.dropped_for(Egress, D::Denied).packets, 3);
    assert_eq!(
        c.dropped_for(Egress, D::Denied).bytes,
        3 * denied.len() as u64
    );
    assert_eq!(c.passed(Egress).packets, 5);
    assert_eq!(c.dropped(Egress).packets, 3);
    assert_eq!(c.passed(Ingress).packets + c.dropped(Ingress).packets, 0);
}
