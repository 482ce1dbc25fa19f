//! The microVM's TAP device on the real kernel: created persistent and on the bridge, opened by
//! name the way hearth-vmm does, and carrying frames: an ARP request written by the "guest"
//! is answered by the node's gateway address on the bridge.

mod net_fixture;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hearth_agent::net::{AddressPool, InstanceNet, MacAddr, NetConfig, Network, NodePlan};
use hearth_testkit::{require, skip};
use net_fixture::Netns;

/// Attaches to an existing TAP by name (`IFF_TAP | IFF_NO_PI`), like hearth-vmm.
fn open_tap(name: &str) -> File {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the one valid `ifreq` we pass.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: F_SETFL with plain flags on an fd we own.
    let rc = unsafe { libc::fcntl(tun.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
    tun
}

fn arp_request(inst: &InstanceNet, target: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&inst.mac.0);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&inst.mac.0);
    f.extend_from_slice(&inst.address.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// Sends `request` (again every half second: the bridge port may still be coming up) and reads
/// frames until an ARP reply from `ip` arrives; returns the MAC it announces.
fn arp(tap: &mut File, request: &[u8], ip: std::net::Ipv4Addr) -> MacAddr {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_send = Instant::now();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if Instant::now() >= next_send {
            tap.write_all(request).unwrap();
            next_send = Instant::now() + Duration::from_millis(500);
        }
        match tap.read(&mut buf) {
            Ok(n)
                if n >= 42
                    && buf[12..14] == [0x08, 0x06]
                    && buf[20..22] == [0, 2]
                    && buf[28..32] == ip.octets() =>
            {
                return MacAddr(buf[22..28].try_into().unwrap());
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reading the TAP: {e}"),
        }
    }
    panic!("no ARP reply from {ip} within 60 s");
}

fn plan() -> NodePlan {
    NetConfig {
        subnet: "10.81.0.0/16".parse().unwrap(),
        ..Default::default()
    }
    .plan_with_resolv_conf("")
    .unwrap()
}

#[test]
fn tap_on_the_bridge_carries_the_guests_frames() {
    require!(skip::root(), skip::program("ip"), skip::program("nft"));
    let node = Netns::new();
    node.block_on(|| async {
        let plan = plan();
        let net = Network::connect(plan.clone()).unwrap();
        net.setup_node().await.unwrap();
        let inst = AddressPool::new(&plan).allocate("vm-1").unwrap();
        net.attach_tap(&inst).await.unwrap();
        // Attaching again (e.g. a retried start) replaces the device instead of failing.
        net.attach_tap(&inst).await.unwrap();

        let link = node.cmd(&["ip", "-d", "link", "show", &inst.host_ifname]);
        assert!(link.contains(&format!("master {}", plan.bridge)), "{link}");
        assert!(link.contains("tun type tap"), "{link}");
        assert!(link.contains("alias vm-1"), "{link}");

        // This thread is in the node namespace, where the TAP is.
        let mut tap = open_tap(&inst.host_ifname);
        let reply = arp(&mut tap, &arp_request(&inst, plan.gateway), plan.gateway);
        assert_eq!(
            reply, plan.bridge_mac,
            "the gateway answers with the bridge's MAC"
        );

        drop(tap);
        assert!(
            node.cmd(&["ip", "link", "show", &inst.host_ifname])
                .contains(&inst.host_ifname),
            "the TAP is persistent: it outlives the VMM's file"
        );
        net.detach(&inst).await.unwrap();
        let out = node.run(|| {
            std::process::Command::new("ip")
                .args(["link", "show", &inst.host_ifname])
                .output()
                .unwrap()
        });
        assert!(!out.status.success(), "detach removes the TAP");
    });
}
