//! Egress NAT on the real kernel: an instance reaches an "internet" namespace through the node,
//! masqueraded to the node's uplink address while its policy allows the internet, and with its
//! own address once it does not. The node, the instance and the internet are all namespaces
//! this test creates; forwarding and the nftables table exist only in the node's namespace.

mod net_fixture;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hearth_agent::net::{AddressPool, NetConfig};
use hearth_testkit::{require, skip};
use net_fixture::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// Accepts one connection on `listener`, echoes 4 bytes, and returns the client's address.
async fn accept_one(
    listener: &TcpListener,
    connect: impl std::future::Future<Output = ()>,
) -> SocketAddr {
    let server = async {
        let (mut s, peer) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        peer
    };
    let (peer, ()) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(server, connect)
    })
    .await
    .expect("connection through the node timed out");
    peer
}

async fn talk(sock: tokio::net::TcpSocket, to: SocketAddr) {
    let mut c = sock.connect(to).await.expect("connect to the remote");
    c.write_all(b"nat?").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"nat?");
}

#[test]
fn internet_egress_is_masqueraded_only_while_allowed() {
    require!(skip::root(), skip::program("ip"), skip::program("nft"));
    let node = Netns::new();
    let internet = Netns::new();
    let inst_ns = Netns::new();

    // The node's uplink: a veth between the node and the "internet".
    let anchor = internet.spawn(&["sleep", "600"]);
    let pid = anchor.pid().to_string();
    node.cmd(&[
        "ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &pid,
    ]);
    node.cmd(&["ip", "addr", "add", &format!("{UPLINK}/24"), "dev", "up0"]);
    node.cmd(&["ip", "link", "set", "up0", "up"]);
    internet.cmd(&["ip", "addr", "add", &format!("{REMOTE}/24"), "dev", "eth0"]);
    internet.cmd(&["ip", "link", "set", "eth0", "up"]);
    // A route back to the node subnet, so that un-NATed traffic is answered too and the test
    // can tell the two cases apart by the source address the remote sees.
    internet.cmd(&[
        "ip",
        "route",
        "add",
        "10.80.0.0/16",
        "via",
        &UPLINK.to_string(),
    ]);

    let listener = internet.listen(SocketAddr::new(REMOTE.into(), 0));
    node.block_on(|| async {
        let listener = TcpListener::from_std(listener).unwrap();
        let remote = listener.local_addr().unwrap();
        let (plan, net) = net_fixture::node_network(NetConfig {
            subnet: "10.80.0.0/16".parse().unwrap(),
            nat_table: "hearth_nat_test".into(),
            ..Default::default()
        })
        .await;
        let inst = AddressPool::new(&plan).allocate("egress").unwrap();
        net_fixture::attach_instance(&net, &inst, &inst_ns).await;

        let forwarding = || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
        assert_eq!(
            forwarding().trim(),
            "0",
            "setup alone must not enable forwarding"
        );

        net.set_internet(&inst, true).await.unwrap();
        assert_eq!(forwarding().trim(), "1");
        let sock = inst_ns.tcp_socket(SocketAddr::new(inst.address.into(), 0));
        let peer = accept_one(&listener, talk(sock, remote)).await;
        assert_eq!(
            peer.ip(),
            UPLINK,
            "masqueraded to the node's uplink address"
        );

        net.set_internet(&inst, false).await.unwrap();
        let set = node.cmd(&["nft", "list", "set", "ip", &plan.nat_table, "internet"]);
        assert!(!set.contains(&inst.address.to_string()), "{set}");
        let sock = inst_ns.tcp_socket(SocketAddr::new(inst.address.into(), 0));
        let peer = accept_one(&listener, talk(sock, remote)).await;
        assert_eq!(peer.ip(), inst.address, "no longer masqueraded");

        net.detach(&inst).await.unwrap();
        net.teardown_node().await.unwrap();
        let tables = node.cmd(&["nft", "list", "tables"]);
        assert!(!tables.contains(&plan.nat_table), "{tables}");
    });
}
