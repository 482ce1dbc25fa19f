//! The eBPF filter on a real veth pair between two network namespaces, with real traffic:
//! TCP, UDP and ICMP, both directions, IPv4 and IPv6. Shows that what the policy allows
//! passes, what it denies is dropped, replies to allowed egress come back, HTTP from the proxy
//! is the only way in, and the counters match what was sent.

mod ebpf_support;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use aya::maps::{Array, MapData};
use ebpf_support::lab::*;
use hearth_agent::ebpf::{
    Counters,
    Direction::{Egress, Ingress},
    DropReason as D, Filter, PassReason as P,
};
use hearth_testkit::{require, skip};

const N: usize = 20;
const SIZE: usize = 100;
const V4_FRAME: u64 = (14 + 20 + 8 + SIZE) as u64;
const V6_FRAME: u64 = (14 + 40 + 8 + SIZE) as u64;

fn since(f: &Filter, before: &Counters) -> Counters {
    f.counters().unwrap().since(before)
}

#[test]
fn egress_policy_with_real_traffic() {
    require!(skip::root());
    let lab = Lab::new();
    let f = lab.attach("egress", &Lab::policy());
    let a = f.attachment().unwrap();
    assert_ne!(a.egress_link_id, 0);
    assert_ne!(a.ingress_link_id, a.egress_link_id);

    for (inst, allowed, denied, other, frame) in [
        (
            IpAddr::from(INST4),
            IpAddr::from(ALLOWED4),
            IpAddr::from(DENIED4),
            IpAddr::from(OTHER4),
            V4_FRAME,
        ),
        (
            INST6.into(),
            ALLOWED6.into(),
            DENIED6.into(),
            "2001:db8:2::1".parse().unwrap(),
            V6_FRAME,
        ),
    ] {
        let client = lab.inst_udp(inst);
        // Allowed UDP: every datagram arrives and every echo comes back.
        let server = lab.host_udp(allowed, 5005);
        let before = f.counters().unwrap();
        assert_eq!(
            udp_exchange(&client, &server, N, SIZE),
            (N, N),
            "to {allowed}"
        );
        let c = since(&f, &before);
        assert_eq!(c.passed_for(Egress, P::Rule).packets, N as u64);
        assert_eq!(c.passed_for(Egress, P::Rule).bytes, N as u64 * frame);
        assert_eq!(c.passed_for(Ingress, P::Reply).packets, N as u64);
        assert_eq!(c.passed_for(Ingress, P::Reply).bytes, N as u64 * frame);
        // (The instance's MLD reports, which carry a hop-by-hop header, are its only drops.)
        let drops = c.dropped(Egress).packets - c.dropped_for(Egress, D::IpOptions).packets;
        assert_eq!(drops, 0, "{:?}", c.nonzero());

        // A denied CIDR inside an allowed one: nothing arrives, each datagram is counted.
        let server = lab.host_udp(denied, 5005);
        let before = f.counters().unwrap();
        assert_eq!(
            udp_exchange(&client, &server, N, SIZE),
            (0, 0),
            "to {denied}"
        );
        let c = since(&f, &before);
        assert_eq!(c.dropped_for(Egress, D::Denied).packets, N as u64);
        assert_eq!(c.dropped_for(Egress, D::Denied).bytes, N as u64 * frame);

        // Nothing allows this one.
        if let Ok(server) = lab
            .host
            .run(|| std::net::UdpSocket::bind(SocketAddr::new(other, 5005)))
        {
            server
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let before = f.counters().unwrap();
            assert_eq!(
                udp_exchange(&client, &server, N, SIZE),
                (0, 0),
                "to {other}"
            );
            let c = since(&f, &before);
            assert_eq!(c.dropped_for(Egress, D::NotAllowed).packets, N as u64);
        }

        // TCP: allowed connects and carries data both ways; denied never connects.
        let listener = lab.host_listen(allowed, 443);
        let mut stream = lab
            .inst_connect(SocketAddr::new(allowed, 443))
            .expect("allowed TCP connects");
        tcp_round_trip(&mut stream, &listener).unwrap();
        let _denied_listener = lab.host_listen(denied, 443);
        let before = f.counters().unwrap();
        assert!(lab.inst_connect(SocketAddr::new(denied, 443)).is_err());
        assert!(since(&f, &before).dropped_for(Egress, D::Denied).packets >= 1);
        // Not on an allowed port.
        let _l = lab.host_listen(allowed, 444);
        assert!(lab.inst_connect(SocketAddr::new(allowed, 444)).is_err());
    }

    // ICMP echo to the gateway is allowed (and its replies come back); to others it is not.
    for (gw, denied) in [
        (IpAddr::from(GW4), IpAddr::from(DENIED4)),
        (GW6.into(), DENIED6.into()),
    ] {
        let before = f.counters().unwrap();
        assert_eq!(lab.inst_ping(gw, 3), 3, "ping {gw}");
        let c = since(&f, &before);
        assert_eq!(c.passed_for(Egress, P::Gateway).packets, 3);
        assert_eq!(c.passed_for(Ingress, P::Reply).packets, 3);
        assert_eq!(lab.inst_ping(denied, 2), 0, "ping {denied}");
    }

    // The kernel's own ARP and NDP went through (the instance resolved the gateway).
    let c = f.counters().unwrap();
    assert!(c.passed_for(Egress, P::Arp).packets >= 1);
    assert!(c.passed_for(Ingress, P::Arp).packets >= 1);
    assert!(c.passed_for(Egress, P::Ndp).packets >= 1);
    assert!(c.passed_for(Ingress, P::Ndp).packets >= 1);
    assert_eq!(c.dropped_for(Egress, D::SpoofedIp).packets, 0);
    assert_eq!(c.dropped_for(Egress, D::SpoofedMac).packets, 0);
    f.remove().unwrap();
}

#[test]
fn http_only_ingress_with_real_traffic() {
    require!(skip::root());
    let lab = Lab::new();
    let f = lab.attach("ingress", &Lab::policy());
    for (inst, proxy, elsewhere) in [
        (
            IpAddr::from(INST4),
            IpAddr::from(GW4),
            IpAddr::from(ALLOWED4),
        ),
        (INST6.into(), GW6.into(), ALLOWED6.into()),
    ] {
        // The proxy reaches the HTTP port, and the instance's answers get out.
        let http = lab.inst_listen(inst, HTTP_PORT);
        let mut stream = lab
            .host_connect(proxy, SocketAddr::new(inst, HTTP_PORT))
            .expect("proxy connects to the HTTP port");
        tcp_round_trip(&mut stream, &http).unwrap();
        let c = f.counters().unwrap();
        assert!(c.passed_for(Ingress, P::Http).packets >= 3);
        assert!(c.passed_for(Egress, P::Reply).packets >= 2);

        // Another port, even from the proxy, is closed.
        let _ssh = lab.inst_listen(inst, 22);
        let before = f.counters().unwrap();
        assert!(lab.host_connect(proxy, SocketAddr::new(inst, 22)).is_err());
        assert!(
            since(&f, &before)
                .dropped_for(Ingress, D::NotHttpPort)
                .packets
                >= 1
        );

        // The HTTP port from anywhere but the proxy is closed.
        let before = f.counters().unwrap();
        assert!(
            lab.host_connect(elsewhere, SocketAddr::new(inst, HTTP_PORT))
                .is_err()
        );
        assert!(
            since(&f, &before)
                .dropped_for(Ingress, D::NotFromProxy)
                .packets
                >= 1
        );

        // UDP to the instance: nothing arrives, each datagram is counted.
        let target = lab.inst_udp(inst);
        let sender = lab.host_udp(proxy, 0);
        let before = f.counters().unwrap();
        assert_eq!(udp_exchange(&sender, &target, N, SIZE), (0, 0));
        let c = since(&f, &before);
        assert_eq!(c.dropped_for(Ingress, D::Unsolicited).packets, N as u64);
        let frame = if inst.is_ipv4() { V4_FRAME } else { V6_FRAME };
        assert_eq!(
            c.dropped_for(Ingress, D::Unsolicited).bytes,
            N as u64 * frame
        );

        // ICMP echo to the instance: dropped.
        let before = f.counters().unwrap();
        assert_eq!(lab.host_ping(inst, 3), 0);
        assert_eq!(
            since(&f, &before)
                .dropped_for(Ingress, D::Unsolicited)
                .packets,
            3
        );
    }
    f.remove().unwrap();
}

#[test]
fn live_update_no_policy_vlan_and_removal() {
    require!(skip::root());
    let lab = Lab::new();
    let mut policy = Lab::policy();
    let mut f = lab.attach("update", &policy);
    let client = lab.inst_udp(INST4.into());
    let server = lab.host_udp(ALLOWED4.into(), 5005);
    assert_eq!(udp_exchange(&client, &server, N, SIZE), (N, N));

    // An established TCP connection, then a policy that denies its destination: the server's
    // data no longer reaches the instance (the flow is re-checked), new datagrams are denied.
    let listener = lab.host_listen(ALLOWED4.into(), 443);
    let mut stream = lab
        .inst_connect(SocketAddr::new(ALLOWED4.into(), 443))
        .unwrap();
    listener.set_nonblocking(false).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    policy.deny.push("198.51.100.0/24".parse().unwrap());
    f.update_policy(&policy).unwrap();
    assert_eq!(f.policy_version(), 2);
    let before = f.counters().unwrap();
    conn.write_all(b"after the update\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 32];
    assert!(stream.read(&mut buf).is_err(), "data passed a denied flow");
    assert!(since(&f, &before).dropped_for(Ingress, D::Denied).packets >= 1);
    let before = f.counters().unwrap();
    assert_eq!(udp_exchange(&client, &server, N, SIZE), (0, 0));
    assert_eq!(
        since(&f, &before).dropped_for(Egress, D::Denied).packets,
        N as u64
    );
    // And back: the links never changed.
    let links = f.attachment().unwrap().clone();
    policy.deny.pop();
    f.update_policy(&policy).unwrap();
    assert_eq!(udp_exchange(&client, &server, N, SIZE), (N, N));
    assert_eq!(f.attachment().unwrap(), &links);

    // With no live policy (version 0) everything is dropped: fail closed.
    let dir = f.attachment().unwrap().dir.clone();
    let mut active: Array<MapData, u32> = Array::try_from(
        aya::maps::Map::from_map_data(MapData::from_pin(dir.join("ACTIVE")).unwrap()).unwrap(),
    )
    .unwrap();
    let version = active.get(&0, 0).unwrap();
    active.set(0, 0, 0).unwrap();
    let before = f.counters().unwrap();
    assert_eq!(udp_exchange(&client, &server, N, SIZE), (0, 0));
    assert_eq!(
        since(&f, &before).dropped_for(Egress, D::NoPolicy).packets,
        N as u64
    );
    active.set(0, version, 0).unwrap();
    assert_eq!(udp_exchange(&client, &server, N, SIZE), (N, N));

    // VLAN-tagged frames (the tag in skb metadata, as offload leaves it) are dropped.
    let inst_if = lab.inst_if.clone();
    let pusher = lab.inst.run(|| {
        let index = nix_ifindex(&inst_if);
        ebpf_support::vlan_push::attach(index, 5).expect("VLAN pusher")
    });
    let before = f.counters().unwrap();
    assert_eq!(udp_exchange(&client, &server, N, SIZE), (0, 0));
    let c = since(&f, &before);
    assert!(
        c.dropped_for(Egress, D::Vlan).packets >= N as u64,
        "{:?}",
        c.nonzero()
    );
    assert_eq!(c.passed(Egress).packets, 0);
    drop(pusher);
    assert_eq!(udp_exchange(&client, &server, N, SIZE), (N, N));

    // Removal: links detached (even while another handle still holds them), pins gone, the
    // interface unfiltered.
    let host_if = lab.host_if.clone();
    let other_handle = Filter::adopt(&lab.root, "update").unwrap();
    f.remove().unwrap();
    assert!(!dir.exists());
    let (_, progs) = lab.host.run(|| {
        aya::programs::SchedClassifier::query_tcx(&host_if, aya::programs::TcAttachType::Ingress)
            .unwrap()
    });
    assert!(progs.is_empty(), "programs still attached");
    drop(other_handle);
    let denied = lab.host_udp(DENIED4.into(), 5005);
    assert_eq!(udp_exchange(&client, &denied, N, SIZE), (N, N));
    assert!(lab.root.instances().unwrap().is_empty());
}

fn nix_ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: `c` is a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index
}
