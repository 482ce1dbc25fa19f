//! Node networking on the real kernel: bridge, veth into an instance namespace, traffic through
//! it, teardown, and re-adoption by a restarted agent. Every test builds its node inside an
//! anonymous network namespace (see `net_fixture`), so the host's namespace is never touched.

mod net_fixture;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hearth_agent::net::inside::configure_inside;
use hearth_agent::net::{
    AddressPool, Adoption, InterfaceKind, NetConfig, NetnsRef, Network, NodePlan,
};
use hearth_testkit::{require, skip};
use net_fixture::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn plan(subnet: &str) -> NodePlan {
    NetConfig {
        subnet: subnet.parse().unwrap(),
        ..Default::default()
    }
    .plan_with_resolv_conf("")
    .unwrap()
}

/// `ip -j -d link show NAME` in `ns`, as JSON (`None` when there is no such link).
fn link_json(ns: &Netns, name: &str) -> Option<serde_json::Value> {
    let out = ns.run(|| {
        std::process::Command::new("ip")
            .args(["-j", "-d", "link", "show", name])
            .output()
            .unwrap()
    });
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().and_then(|a| a.first()).cloned()
}

/// Connects `sock` to `to`, sends a line, and returns the echo.
async fn echo_through(sock: TcpSocket, to: SocketAddr) -> String {
    let mut c = tokio::time::timeout(Duration::from_secs(30), sock.connect(to))
        .await
        .expect("connect timed out")
        .expect("connect");
    c.write_all(b"ping\n").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(30), c.read_exact(&mut buf))
        .await
        .expect("echo timed out")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// Serves one echo connection on `listener` and returns the client's address.
fn serve_echo_once(listener: TcpListener) -> tokio::task::JoinHandle<SocketAddr> {
    tokio::spawn(async move {
        let (mut s, peer): (TcpStream, SocketAddr) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        peer
    })
}

#[test]
fn veth_connects_an_instance_namespace_through_the_bridge() {
    require!(skip::root(), skip::program("ip"), skip::program("nft"));
    let node = Netns::new();
    let inst_ns = Netns::new();
    node.block_on(|| async {
        let plan = plan("10.77.0.0/16");
        let net = Network::connect(plan.clone()).unwrap();
        net.setup_node().await.unwrap();
        let bridge = link_json(&node, &plan.bridge).expect("bridge exists");
        assert_eq!(bridge["address"], plan.bridge_mac.to_string());
        assert_eq!(bridge["linkinfo"]["info_kind"], "bridge");

        let mut pool = AddressPool::new(&plan);
        let inst = pool.allocate("web-1").unwrap();
        net.attach_veth(&inst, NetnsRef::Fd(inst_ns.fd()))
            .await
            .unwrap();

        let host = link_json(&node, &inst.host_ifname).expect("host end exists");
        assert_eq!(host["master"], plan.bridge.as_str());
        assert_eq!(host["ifalias"], "web-1");
        assert_eq!(host["mtu"], 1500);
        let eth0 = link_json(&inst_ns, "eth0").expect("eth0 in the instance namespace");
        assert_eq!(eth0["address"], inst.mac.to_string());
        assert!(
            link_json(&node, "eth0").is_none_or(|l| l["address"] != inst.mac.to_string()),
            "the peer must not appear in the node namespace"
        );

        configure_inside(NetnsRef::Fd(inst_ns.fd()), &inst)
            .await
            .unwrap();
        configure_inside(NetnsRef::Fd(inst_ns.fd()), &inst)
            .await
            .expect("configuring twice is fine");
        let routes = inst_ns.cmd(&["ip", "route", "show", "default"]);
        assert!(
            routes.contains(&format!("via {}", plan.gateway)),
            "{routes}"
        );

        // Node → instance, from the ingress address (what the proxy does).
        let listener =
            TcpListener::from_std(inst_ns.listen(SocketAddr::new(inst.address.into(), 0))).unwrap();
        let to = listener.local_addr().unwrap();
        let server = serve_echo_once(listener);
        let sock = node.tcp_socket(SocketAddr::new(plan.ingress_address.into(), 0));
        assert_eq!(echo_through(sock, to).await, "ping\n");
        assert_eq!(server.await.unwrap().ip(), plan.ingress_address);

        // Instance → node, through its default gateway.
        let listener = TcpListener::bind(SocketAddr::new(plan.gateway.into(), 0))
            .await
            .unwrap();
        let to = listener.local_addr().unwrap();
        let server = serve_echo_once(listener);
        let sock = inst_ns.tcp_socket(SocketAddr::new(inst.address.into(), 0));
        assert_eq!(echo_through(sock, to).await, "ping\n");
        assert_eq!(server.await.unwrap().ip(), inst.address);

        net.detach(&inst).await.unwrap();
        assert!(link_json(&node, &inst.host_ifname).is_none());
        assert!(
            link_json(&inst_ns, "eth0").is_none(),
            "deleting the host end removes the peer"
        );
        net.detach(&inst).await.expect("detach is idempotent");

        net.teardown_node().await.unwrap();
        assert!(link_json(&node, &plan.bridge).is_none());
        let tables = node.cmd(&["nft", "list", "tables"]);
        assert!(!tables.contains(&plan.nat_table), "{tables}");
    });
}

#[test]
fn a_restarted_agent_rediscovers_and_adopts_its_interfaces() {
    require!(skip::root(), skip::program("ip"), skip::program("nft"));
    let node = Netns::new();
    let inst_ns = Netns::new();
    // The sandbox's init would be this process; the veth is put in its namespace by pid.
    let sandbox = inst_ns.spawn(&["sleep", "600"]);
    node.block_on(|| async {
        let plan = plan("10.78.0.0/24");
        let mut pool = AddressPool::new(&plan);
        let a = pool.allocate("sandbox-a").unwrap();
        let b = pool.allocate("vm-b").unwrap();
        let stored = pool.state();
        let bridge_index = {
            let net = Network::connect(plan.clone()).unwrap();
            net.setup_node().await.unwrap();
            net.attach_veth(&a, NetnsRef::Pid(sandbox.pid()))
                .await
                .unwrap();
            net.attach_tap(&b).await.unwrap();
            net.set_internet(&a, true).await.unwrap();
            link_json(&node, &plan.bridge).unwrap()["ifindex"].clone()
            // The agent "dies" here: the Network and its netlink socket are dropped.
        };
        assert!(link_json(&inst_ns, "eth0").is_some());

        let net = Network::connect(plan.clone()).unwrap();
        net.setup_node().await.unwrap();
        assert_eq!(
            link_json(&node, &plan.bridge).unwrap()["ifindex"],
            bridge_index,
            "the bridge was adopted, not recreated"
        );
        let addrs = node.cmd(&["ip", "-4", "-o", "addr", "show", "dev", &plan.bridge]);
        assert_eq!(addrs.lines().count(), 2, "no duplicate addresses: {addrs}");

        let found = net.discover().await.unwrap();
        let summary: Vec<_> = found
            .iter()
            .map(|d| (d.ifname.clone(), d.kind, d.address, d.id.clone()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    a.host_ifname.clone(),
                    InterfaceKind::Veth,
                    a.address,
                    Some("sandbox-a".to_owned())
                ),
                (
                    b.host_ifname.clone(),
                    InterfaceKind::Tap,
                    b.address,
                    Some("vm-b".to_owned())
                ),
            ]
        );
        // The pool rebuilt from what was found matches the stored one.
        let mut rebuilt = AddressPool::new(&plan);
        for d in &found {
            rebuilt.insert(d.id.as_deref().unwrap(), d.address).unwrap();
        }
        assert_eq!(rebuilt.state().addresses, stored.addresses);

        assert_eq!(
            net.adopt(&a, true).await.unwrap(),
            Adoption::Adopted(InterfaceKind::Veth)
        );
        assert_eq!(
            net.adopt(&b, false).await.unwrap(),
            Adoption::Adopted(InterfaceKind::Tap)
        );
        let set = node.cmd(&["nft", "list", "set", "ip", &plan.nat_table, "internet"]);
        assert!(set.contains(&a.address.to_string()), "{set}");
        assert!(!set.contains(&b.address.to_string()), "{set}");

        net.detach(&a).await.unwrap();
        net.detach(&b).await.unwrap();
        assert!(net.discover().await.unwrap().is_empty());
        assert_eq!(net.adopt(&a, false).await.unwrap(), Adoption::Missing);
        let set = node.cmd(&["nft", "list", "set", "ip", &plan.nat_table, "internet"]);
        assert!(!set.contains(&a.address.to_string()), "{set}");
        assert!(Ipv4Addr::new(10, 78, 0, 16) == a.address);
    });
}
