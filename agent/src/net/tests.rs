//! [`Network`]'s logic against a fake [`NetOps`] that keeps links in memory and records the
//! nft scripts. The real kernel is exercised by `agent/tests/net_*.rs`.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use super::*;

#[derive(Default)]
struct FakeState {
    links: Vec<LinkInfo>,
    addresses: Vec<(u32, Ipv4Addr, u8)>,
    nft: Vec<String>,
    forward_enabled: u32,
    next_index: u32,
    calls: Vec<String>,
}

#[derive(Default)]
struct FakeOps(Mutex<FakeState>);

impl FakeOps {
    fn add(&self, name: &str, kind: &str, controller: Option<u32>) -> u32 {
        let mut s = self.0.lock().unwrap();
        s.next_index += 1;
        let index = s.next_index + 100;
        s.links.push(LinkInfo {
            index,
            name: name.to_owned(),
            kind: Some(kind.to_owned()),
            controller,
            up: false,
            alias: None,
            mac: None,
        });
        index
    }

    fn get(&self, name: &str) -> Option<LinkInfo> {
        self.0
            .lock()
            .unwrap()
            .links
            .iter()
            .find(|l| l.name == name)
            .cloned()
    }

    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap().calls)
    }
}

impl NetOps for FakeOps {
    async fn links(&self) -> Result<Vec<LinkInfo>, NetError> {
        Ok(self.0.lock().unwrap().links.clone())
    }

    async fn link(&self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        Ok(self.get(name))
    }

    async fn add_bridge(&self, name: &str, mac: MacAddr, _mtu: u32) -> Result<(), NetError> {
        self.0
            .lock()
            .unwrap()
            .calls
            .push(format!("add_bridge {name} {mac}"));
        self.add(name, "bridge", None);
        Ok(())
    }

    async fn add_addresses(&self, index: u32, addrs: &[(Ipv4Addr, u8)]) -> Result<(), NetError> {
        let mut s = self.0.lock().unwrap();
        for &(a, l) in addrs {
            if !s.addresses.contains(&(index, a, l)) {
                s.addresses.push((index, a, l));
            }
        }
        Ok(())
    }

    async fn add_veth(&self, req: &VethRequest<'_>) -> Result<(), NetError> {
        assert!(self.get(req.host_name).is_none(), "veth name taken");
        self.0.lock().unwrap().calls.push(format!(
            "add_veth {} peer {} {}",
            req.host_name, req.peer_name, req.peer_mac
        ));
        let index = self.add(req.host_name, "veth", Some(req.controller));
        let mut s = self.0.lock().unwrap();
        let l = s.links.iter_mut().find(|l| l.index == index).unwrap();
        l.up = true;
        l.alias = Some(req.alias.to_owned());
        Ok(())
    }

    async fn add_tap(&self, name: &str) -> Result<(), NetError> {
        self.0.lock().unwrap().calls.push(format!("add_tap {name}"));
        self.add(name, "tun", None);
        Ok(())
    }

    async fn set_link(&self, index: u32, st: &LinkSettings<'_>) -> Result<(), NetError> {
        let mut s = self.0.lock().unwrap();
        s.calls.push(format!("set_link {index}"));
        let l = s.links.iter_mut().find(|l| l.index == index).unwrap();
        if let Some(c) = st.controller {
            l.controller = Some(c);
        }
        if let Some(a) = st.alias {
            l.alias = Some(a.to_owned());
        }
        l.up |= st.up;
        Ok(())
    }

    async fn del_link(&self, index: u32) -> Result<(), NetError> {
        let mut s = self.0.lock().unwrap();
        s.calls.push(format!("del_link {index}"));
        s.links.retain(|l| l.index != index);
        Ok(())
    }

    async fn nft(&self, script: &str) -> Result<(), NetError> {
        self.0.lock().unwrap().nft.push(script.to_owned());
        Ok(())
    }

    async fn enable_ip_forward(&self) -> Result<(), NetError> {
        self.0.lock().unwrap().forward_enabled += 1;
        Ok(())
    }
}

fn network() -> Network<FakeOps> {
    let plan = NetConfig::default().plan_with_resolv_conf("").unwrap();
    Network::new(plan, FakeOps::default())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn setup_node_creates_the_bridge_once_and_is_idempotent() {
    block_on(async {
        let net = network();
        net.setup_node().await.unwrap();
        let bridge = net.ops().get("hearth0").unwrap();
        assert!(bridge.up);
        assert_eq!(net.ops().calls()[0], "add_bridge hearth0 02:48:0a:58:00:01");
        net.setup_node().await.unwrap();
        assert!(
            !net.ops()
                .calls()
                .iter()
                .any(|c| c.starts_with("add_bridge")),
            "second setup created another bridge"
        );
        let s = net.ops().0.lock().unwrap();
        assert_eq!(
            s.addresses,
            [
                (bridge.index, Ipv4Addr::new(10, 88, 0, 1), 16),
                (bridge.index, Ipv4Addr::new(10, 88, 0, 2), 16)
            ]
        );
        assert_eq!(s.nft.len(), 2);
        assert_eq!(s.forward_enabled, 0, "setup must not enable forwarding");
    });
}

#[test]
fn a_non_bridge_link_with_the_bridge_name_is_a_conflict() {
    block_on(async {
        let net = network();
        net.ops().add("hearth0", "dummy", None);
        let err = net.setup_node().await.unwrap_err();
        assert!(matches!(err, NetError::Conflict { .. }), "{err}");
    });
}

#[test]
fn attach_needs_the_bridge() {
    block_on(async {
        let net = network();
        let inst = AddressPool::new(net.plan()).allocate("a").unwrap();
        let err = net.attach_tap(&inst).await.unwrap_err();
        assert!(matches!(err, NetError::NoBridge(_)), "{err}");
    });
}

#[test]
fn attach_replaces_a_stale_interface_and_detach_is_idempotent() {
    block_on(async {
        let net = network();
        net.setup_node().await.unwrap();
        let bridge = net.ops().get("hearth0").unwrap().index;
        let inst = AddressPool::new(net.plan()).allocate("a").unwrap();
        let stale = net.ops().add(&inst.host_ifname, "tun", None);
        net.ops().calls();
        net.attach_veth(&inst, NetnsRef::Pid(1)).await.unwrap();
        assert_eq!(
            net.ops().calls(),
            [
                format!("del_link {stale}"),
                "add_veth hth16 peer eth0 02:48:0a:58:00:10".to_owned()
            ]
        );
        let link = net.ops().get("hth16").unwrap();
        assert_eq!(link.controller, Some(bridge));
        assert_eq!(link.alias.as_deref(), Some("a"));
        net.detach(&inst).await.unwrap();
        assert!(net.ops().get("hth16").is_none());
        net.detach(&inst).await.unwrap();
    });
}

#[test]
fn tap_is_put_on_the_bridge_up_and_labelled() {
    block_on(async {
        let net = network();
        net.setup_node().await.unwrap();
        let bridge = net.ops().get("hearth0").unwrap().index;
        let inst = AddressPool::new(net.plan()).allocate("vm-1").unwrap();
        net.attach_tap(&inst).await.unwrap();
        let tap = net.ops().get("hth16").unwrap();
        assert_eq!(tap.kind.as_deref(), Some("tun"));
        assert_eq!(tap.controller, Some(bridge));
        assert!(tap.up);
        assert_eq!(tap.alias.as_deref(), Some("vm-1"));
    });
}

#[test]
fn nat_enables_forwarding_once_and_only_when_asked() {
    block_on(async {
        let net = network();
        net.setup_node().await.unwrap();
        let mut pool = AddressPool::new(net.plan());
        let a = pool.allocate("a").unwrap();
        let b = pool.allocate("b").unwrap();
        net.set_internet(&a, false).await.unwrap();
        assert_eq!(net.ops().0.lock().unwrap().forward_enabled, 0);
        net.set_internet(&a, true).await.unwrap();
        net.set_internet(&b, true).await.unwrap();
        let s = net.ops().0.lock().unwrap();
        assert_eq!(s.forward_enabled, 1);
        assert!(
            s.nft
                .last()
                .unwrap()
                .contains("add element ip hearth internet { 10.88.0.17 }")
        );
    });
}

#[test]
fn discover_and_adopt_after_a_restart() {
    block_on(async {
        let net = network();
        net.setup_node().await.unwrap();
        let mut pool = AddressPool::new(net.plan());
        let a = pool.allocate("a").unwrap();
        let b = pool.allocate("b").unwrap();
        net.attach_veth(&a, NetnsRef::Pid(1)).await.unwrap();
        net.attach_tap(&b).await.unwrap();
        // A link that is not ours, and one of ours that lost its label.
        net.ops().add("hth", "veth", None);
        net.ops().add("hth99", "tun", None);

        // "Restart": a new Network over the same kernel state.
        let ops = std::mem::take(&mut *net.ops().0.lock().unwrap());
        let net = Network::new(net.plan().clone(), FakeOps(Mutex::new(ops)));
        let found = net.discover().await.unwrap();
        let summary: Vec<_> = found
            .iter()
            .map(|d| (d.ifname.as_str(), d.kind, d.address, d.id.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                ("hth16", InterfaceKind::Veth, a.address, Some("a")),
                ("hth17", InterfaceKind::Tap, b.address, Some("b")),
                (
                    "hth99",
                    InterfaceKind::Tap,
                    Ipv4Addr::new(10, 88, 0, 99),
                    None
                ),
            ]
        );

        // Someone took the TAP off the bridge: adopting repairs it.
        let tap = net.ops().get("hth17").unwrap();
        net.ops()
            .0
            .lock()
            .unwrap()
            .links
            .iter_mut()
            .find(|l| l.index == tap.index)
            .unwrap()
            .controller = None;
        assert_eq!(
            net.adopt(&b, false).await.unwrap(),
            Adoption::Adopted(InterfaceKind::Tap)
        );
        assert!(net.ops().get("hth17").unwrap().controller.is_some());
        assert_eq!(
            net.adopt(&a, true).await.unwrap(),
            Adoption::Adopted(InterfaceKind::Veth)
        );

        net.detach(&a).await.unwrap();
        assert_eq!(net.adopt(&a, true).await.unwrap(), Adoption::Missing);
    });
}
