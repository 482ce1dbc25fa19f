//! Differential property test: for random policies (applied as live updates to one loaded
//! filter) and random packets, the egress program's verdict equals a plain model of the
//! policy written from its documentation: denied CIDRs, then the resolver, the gateway, the
//! allowed CIDRs, the internet. The kernel runs the real programs (`BPF_PROG_TEST_RUN`).

mod ebpf_support;

use std::{
    cell::RefCell,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ebpf_support::{SYN, echo, icmp, ip_frame, tcp, udp};
use hearth_agent::ebpf::{
    Cidr, Direction::Egress, DropReason, Filter, LoadOptions, NodeAddr, PassReason, Policy,
    PortRange, Protocol, Rule, Verdict,
};
use hearth_testkit::{require, skip};
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config, TestRunner},
};

const M: [u8; 6] = [0x02, 0x48, 0x54, 0, 0, 2];
const H: [u8; 6] = [0x02, 0x48, 0x54, 0, 0, 1];
const INST4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const DNS4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 53);
const INST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const DNS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x53);

/// A small address universe, so that random rules and packets meet often.
fn universe() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = Vec::new();
    for a in 0..2u8 {
        for b in 0..2u8 {
            for c in [0u8, 1, 2, 255] {
                v.push(Ipv4Addr::new(10, a, b, c).into());
            }
        }
    }
    for s in [
        "10.0.0.53",
        "198.51.100.1",
        "198.51.100.2",
        "11.0.0.1",
        "11.0.0.2",
        "8.8.8.8",
        "255.255.255.255",
        "2001:db8::1",
        "2001:db8::2",
        "2001:db8:1::1",
        "fd00::1",
        "fd00::53",
        "fd00::9",
        "2a00::1",
        "2a00:1::2",
        "fe80::1",
    ] {
        v.push(s.parse().unwrap());
    }
    v
}

fn arb_addr() -> impl Strategy<Value = IpAddr> {
    proptest::sample::select(universe())
}

fn arb_cidr() -> impl Strategy<Value = Cidr> {
    (arb_addr(), 0usize..6).prop_map(|(a, i)| {
        let len = if a.is_ipv4() {
            [0, 8, 16, 24, 30, 32][i]
        } else {
            [0, 16, 32, 48, 126, 128][i]
        };
        Cidr::new_truncating(a, len).unwrap()
    })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (arb_cidr(), 0usize..4, 0usize..4).prop_map(|(cidr, p, r)| {
        let protocol = [Protocol::Any, Protocol::Tcp, Protocol::Udp, Protocol::Icmp][p];
        let ports = match protocol {
            Protocol::Any => PortRange::ALL,
            Protocol::Icmp => [
                PortRange::ALL,
                PortRange::single(8),
                PortRange::single(128),
                PortRange { first: 0, last: 10 },
            ][r],
            _ => [
                PortRange::ALL,
                PortRange::single(53),
                PortRange {
                    first: 80,
                    last: 443,
                },
                PortRange {
                    first: 1000,
                    last: 1010,
                },
            ][r],
        };
        Rule {
            cidr,
            protocol,
            ports,
        }
    })
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        vec(arb_rule(), 0..8),
        vec(arb_rule(), 0..4),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(allow, deny, internet, allow_dns, allow_gateway_ping)| {
            let mut p = Policy::new(M);
            p.instance_ipv4 = Some(INST4);
            p.instance_ipv6 = vec![INST6];
            p.gateway = NodeAddr {
                v4: Some(GW4),
                v6: Some(GW6),
            };
            p.dns = NodeAddr {
                v4: Some(DNS4),
                v6: Some(DNS6),
            };
            p.allow = allow;
            p.deny = deny;
            p.internet = internet;
            p.allow_dns = allow_dns;
            p.allow_gateway_ping = allow_gateway_ping;
            p
        })
}

#[derive(Clone, Debug)]
struct Packet {
    dst: IpAddr,
    /// 6, 17 or 1 (ICMP of the packet's family).
    proto: u8,
    /// Destination port, or ICMP type (already the family's number).
    port: u16,
}

fn arb_packet() -> impl Strategy<Value = Packet> {
    (arb_addr(), 0usize..3, 0usize..5).prop_map(|(dst, p, i)| {
        let v6 = dst.is_ipv6();
        match p {
            0 | 1 => Packet {
                dst,
                proto: [6, 17][p],
                port: [53, 80, 443, 1005, 2000][i],
            },
            _ => Packet {
                dst,
                proto: 1,
                port: if v6 {
                    [128, 129, 2, 128, 1][i]
                } else {
                    [8, 0, 13, 8, 3][i]
                },
            },
        }
    })
}

fn frame(p: &Packet) -> Vec<u8> {
    let src: IpAddr = if p.dst.is_ipv4() {
        INST4.into()
    } else {
        INST6.into()
    };
    let (proto, l4) = match p.proto {
        6 => (6, tcp(40000, p.port, SYN)),
        17 => (17, udp(40000, p.port, b"model")),
        _ => {
            let proto = if p.dst.is_ipv4() { 1 } else { 58 };
            let t = p.port as u8;
            let body = if t == 8 || t == 128 || t == 0 || t == 129 {
                echo(t, 7, 1)
            } else {
                icmp(t, 0, &[0; 36])
            };
            (proto, body)
        }
    };
    ip_frame(H, M, src, p.dst, proto, &l4)
}

fn rule_matches(r: &Rule, p: &Packet) -> bool {
    if !r.cidr.contains(p.dst) {
        return false;
    }
    let in_range = p.port >= r.ports.first && p.port <= r.ports.last;
    match r.protocol {
        Protocol::Any => true,
        Protocol::Tcp => p.proto == 6 && in_range,
        Protocol::Udp => p.proto == 17 && in_range,
        Protocol::Icmp => p.proto == 1 && in_range,
    }
}

/// The policy as documented on [`Policy`].
fn model(policy: &Policy, p: &Packet) -> Verdict {
    if policy.deny.iter().any(|r| rule_matches(r, p)) {
        return Verdict::Drop(DropReason::Denied);
    }
    let (dns, gw, echo_request) = match p.dst {
        IpAddr::V4(_) => (IpAddr::from(DNS4), IpAddr::from(GW4), 8),
        IpAddr::V6(_) => (DNS6.into(), GW6.into(), 128),
    };
    if policy.allow_dns && p.dst == dns && (p.proto == 6 || p.proto == 17) && p.port == 53 {
        return Verdict::Pass(PassReason::Dns);
    }
    if policy.allow_gateway_ping && p.dst == gw && p.proto == 1 && p.port == echo_request {
        return Verdict::Pass(PassReason::Gateway);
    }
    if policy.allow.iter().any(|r| rule_matches(r, p)) {
        return Verdict::Pass(PassReason::Rule);
    }
    if policy.internet && hearth_agent::ebpf::compile::is_internet(p.dst) {
        return Verdict::Pass(PassReason::Internet);
    }
    Verdict::Drop(DropReason::NotAllowed)
}

#[test]
fn egress_verdicts_match_the_policy_model() {
    require!(skip::root());
    let first = Policy::new(M);
    let filter = RefCell::new(Filter::load(&first, &LoadOptions::default()).unwrap());
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(arb_policy(), vec(arb_packet(), 1..48)),
            |(policy, packets)| {
                let mut f = filter.borrow_mut();
                f.update_policy(&policy).unwrap();
                for p in &packets {
                    let got = f.classify(Egress, &frame(p)).unwrap();
                    prop_assert_eq!(got, model(&policy, p), "packet {:?}", p);
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Valid frames of every kind the programs parse, both directions' worth.
fn base_frames() -> Vec<Vec<u8>> {
    use ebpf_support::*;
    let (s4, d4) = (IpAddr::from(INST4), IpAddr::from(GW4));
    let (s6, d6) = (IpAddr::from(INST6), IpAddr::from(GW6));
    let quoted = ipv4(INST4, GW4, 6, &tcp(1, 2, ACK));
    let mut frag_needed = vec![0, 0, 5, 0xdc];
    frag_needed.extend_from_slice(&quoted[..28]);
    vec![
        ip_frame(H, M, s4, d4, 6, &tcp(40000, 443, SYN)),
        ip_frame(H, M, s4, d4, 17, &udp(40000, 53, b"q")),
        ip_frame(H, M, s4, d4, 1, &echo(8, 1, 1)),
        ip_frame(M, H, d4, s4, 1, &icmp(3, 4, &frag_needed)),
        ip_frame(H, M, s6, d6, 6, &tcp(40000, 8080, SYN)),
        ip_frame(H, M, s6, d6, 58, &echo(128, 1, 1)),
        eth(
            H,
            M,
            ETH_IPV6,
            &ipv6(INST6, GW6, 58, 255, &nd(136, INST6, Some(M))),
        ),
        eth(
            M,
            H,
            ETH_IPV6,
            &ipv6(GW6, INST6, 58, 255, &nd(135, INST6, Some(H))),
        ),
        pad(eth([0xff; 6], M, ETH_ARP, &arp(1, M, INST4, [0; 6], GW4))),
        pad(eth(M, H, ETH_ARP, &arp(2, H, GW4, M, INST4))),
    ]
    .into_iter()
    .map(pad)
    .collect()
}

/// Frames with random bytes overwritten and random tails cut off always get exactly one
/// verdict, counted with the frame's length, with the matching return code (`classify`
/// checks all three); and the anti-spoofing check cannot be dodged by any of it.
#[test]
fn mutated_frames_always_get_one_consistent_verdict() {
    require!(skip::root());
    let mut policy = Policy::new(M);
    policy.instance_ipv4 = Some(INST4);
    policy.instance_ipv6 = vec![INST6];
    policy.ingress_proxy = NodeAddr {
        v4: Some(GW4),
        v6: Some(GW6),
    };
    policy.http_ports = vec![8080];
    policy.internet = true;
    let filter = Filter::load(&policy, &LoadOptions::default()).unwrap();
    let bases = base_frames();
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(
                0..bases.len(),
                vec((any::<prop::sample::Index>(), any::<u8>()), 1..5),
                any::<prop::sample::Index>(),
                any::<bool>(),
            ),
            |(which, edits, cut, ingress)| {
                let mut f = bases[which].clone();
                for (at, byte) in edits {
                    let i = at.index(f.len());
                    f[i] = byte;
                }
                // The kernel wants a whole IP header in test frames: keep 60 bytes at least.
                let len = 60 + cut.index(f.len() - 59);
                f.truncate(len);
                let dir = if ingress {
                    hearth_agent::ebpf::Direction::Ingress
                } else {
                    Egress
                };
                let verdict = filter.classify(dir, &f).unwrap();
                if dir == Egress && f[6..12] != M {
                    prop_assert_eq!(verdict, Verdict::Drop(DropReason::SpoofedMac));
                }
                Ok(())
            },
        )
        .unwrap();
}
