//! Per-instance addresses: the [`AddressPool`] hands out one address of the node subnet per
//! instance id, and [`InstanceNet`] is everything derived from that address (interface name,
//! MAC, what hearth-init is told).
//!
//! The pool's whole state is a [`PoolState`] (id → address, plus the next-fit cursor) that the
//! agent stores with its instances; [`Network::discover`](super::Network::discover) can also
//! rebuild it from the interfaces found on the node.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::NetError;
use super::config::NodePlan;

/// Address indexes below this one are kept for the node (network address, gateway, ingress
/// proxy, and room for more node services); instances get addresses from here on.
pub const RESERVED_LOW: u32 = 16;

/// Name of the instance's interface inside its network namespace or VM.
pub const INSTANCE_IFNAME: &str = "eth0";

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The MAC Hearth gives the interface holding `addr`: locally administered, unicast,
    /// `02:48` followed by the four address bytes, so that it is unique on the node and the
    /// eBPF anti-spoofing check can be derived from the address alone.
    pub fn for_address(addr: Ipv4Addr) -> MacAddr {
        let [a, b, c, d] = addr.octets();
        MacAddr([0x02, 0x48, a, b, c, d])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl TryFrom<String> for MacAddr {
    type Error = NetError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            *byte = parts
                .next()
                .filter(|p| p.len() == 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| NetError::Config(format!("{s:?} is not a MAC address")))?;
        }
        if parts.next().is_some() {
            return Err(NetError::Config(format!("{s:?} is not a MAC address")));
        }
        Ok(MacAddr(out))
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// Everything about one instance's network, derived from the node plan and its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceNet {
    /// The instance id.
    pub id: String,
    /// The instance's address.
    pub address: Ipv4Addr,
    /// Prefix length of the node subnet (the instance's on-link network).
    pub prefix_len: u8,
    /// Default gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// DNS resolver.
    pub resolver: Ipv4Addr,
    /// MAC of the instance's `eth0` (sandbox) or of the guest's virtio-net device (microVM).
    pub mac: MacAddr,
    /// Name of the host-side interface: the TAP (microVM) or the host end of the veth
    /// (sandbox). The eBPF programs attach here.
    pub host_ifname: String,
    /// MTU.
    pub mtu: u32,
}

impl InstanceNet {
    /// The instance's network as the node plan derives it from its address.
    pub fn new(plan: &NodePlan, id: &str, address: Ipv4Addr) -> Result<InstanceNet, NetError> {
        let index = plan
            .subnet
            .index_of(address)
            .filter(|&i| is_instance_index(plan, i))
            .ok_or_else(|| {
                NetError::State(format!(
                    "{address} (instance {id:?}) is not an instance address of {}",
                    plan.subnet
                ))
            })?;
        Ok(InstanceNet {
            id: id.to_owned(),
            address,
            prefix_len: plan.subnet.prefix_len(),
            gateway: plan.gateway,
            resolver: plan.resolver,
            mac: MacAddr::for_address(address),
            host_ifname: host_ifname(plan, index),
            mtu: plan.mtu,
        })
    }

    /// The network section of hearth-init's instance spec.
    pub fn init_network(&self) -> hearth_proto::init::Network {
        hearth_proto::init::Network {
            interface: INSTANCE_IFNAME.to_owned(),
            addresses: vec![format!("{}/{}", self.address, self.prefix_len)],
            gateway_v4: self.gateway.to_string(),
            gateway_v6: String::new(),
            dns_servers: vec![self.resolver.to_string()],
            dns_search: Vec::new(),
            mtu: self.mtu,
            hosts: Vec::new(),
        }
    }
}

/// `<prefix><index>`: the host-side interface name for the address at `index`.
pub fn host_ifname(plan: &NodePlan, index: u32) -> String {
    format!("{}{index}", plan.interface_prefix)
}

/// The address index encoded in a host-side interface name, if it is one of ours.
pub fn index_from_ifname(plan: &NodePlan, name: &str) -> Option<u32> {
    let digits = name.strip_prefix(plan.interface_prefix.as_str())?;
    // Only the canonical spelling ("hth17", not "hth017") is ours.
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    let index: u32 = digits.parse().ok()?;
    is_instance_index(plan, index).then_some(index)
}

fn is_instance_index(plan: &NodePlan, index: u32) -> bool {
    let gateway = plan.subnet.index_of(plan.gateway);
    let ingress = plan.subnet.index_of(plan.ingress_address);
    index >= RESERVED_LOW
        && u64::from(index) < plan.subnet.size() - 1
        && Some(index) != gateway
        && Some(index) != ingress
}

/// What the agent stores to give every instance the same address after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolState {
    /// Instance id → its address.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// Where the next search for a free address starts (next fit, so that a released address
    /// is not handed out again at once while stale ARP and conntrack entries may remain).
    pub cursor: u32,
}

/// Hands out the node subnet's instance addresses.
#[derive(Debug, Clone)]
pub struct AddressPool {
    plan: NodePlan,
    by_id: BTreeMap<String, u32>,
    by_index: BTreeMap<u32, String>,
    cursor: u32,
}

impl AddressPool {
    /// An empty pool.
    pub fn new(plan: &NodePlan) -> AddressPool {
        AddressPool {
            plan: plan.clone(),
            by_id: BTreeMap::new(),
            by_index: BTreeMap::new(),
            cursor: RESERVED_LOW,
        }
    }

    /// A pool holding a stored state; fails (and builds nothing) when an address lies outside
    /// the instance range or two ids share one.
    pub fn from_state(plan: &NodePlan, state: &PoolState) -> Result<AddressPool, NetError> {
        let mut pool = AddressPool::new(plan);
        for (id, &addr) in &state.addresses {
            pool.insert(id, addr)?;
        }
        if u64::from(state.cursor) < plan.subnet.size() {
            pool.cursor = state.cursor.max(RESERVED_LOW);
        }
        Ok(pool)
    }

    /// Records that `id` holds `address` (for re-adoption from interfaces found on the node).
    /// Holding the same address again is a no-op.
    pub fn insert(&mut self, id: &str, address: Ipv4Addr) -> Result<InstanceNet, NetError> {
        let net = InstanceNet::new(&self.plan, id, address)?;
        let index = self
            .plan
            .subnet
            .index_of(address)
            .expect("checked by InstanceNet::new");
        match (self.by_id.get(id), self.by_index.get(&index)) {
            (Some(&i), _) if i == index => return Ok(net),
            (Some(&i), _) => {
                return Err(NetError::State(format!(
                    "instance {id:?} holds {} already, not {address}",
                    self.plan.subnet.nth(i).expect("in range")
                )));
            }
            (None, Some(other)) => {
                return Err(NetError::State(format!(
                    "{address} is held by instance {other:?} already, not {id:?}"
                )));
            }
            (None, None) => {}
        }
        self.by_id.insert(id.to_owned(), index);
        self.by_index.insert(index, id.to_owned());
        Ok(net)
    }

    /// The address of `id`: the one it holds, else the next free one.
    pub fn allocate(&mut self, id: &str) -> Result<InstanceNet, NetError> {
        if let Some(net) = self.get(id) {
            return Ok(net);
        }
        let size = self.plan.subnet.size();
        let span = size as u32 - RESERVED_LOW;
        let start = self.cursor.clamp(RESERVED_LOW, size as u32 - 1);
        for step in 0..span {
            let index = RESERVED_LOW + (start - RESERVED_LOW + step) % span;
            if is_instance_index(&self.plan, index) && !self.by_index.contains_key(&index) {
                let addr = self.plan.subnet.nth(index).expect("in range");
                let net = self.insert(id, addr)?;
                self.cursor = index + 1;
                return Ok(net);
            }
        }
        Err(NetError::Exhausted {
            subnet: self.plan.subnet.to_string(),
        })
    }

    /// The network of `id` if it holds an address.
    pub fn get(&self, id: &str) -> Option<InstanceNet> {
        let index = *self.by_id.get(id)?;
        let addr = self.plan.subnet.nth(index)?;
        InstanceNet::new(&self.plan, id, addr).ok()
    }

    /// Gives `id`'s address back; returns whether it held one.
    pub fn release(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(index) => {
                self.by_index.remove(&index);
                true
            }
            None => false,
        }
    }

    /// How many addresses are held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no address is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The state to store.
    pub fn state(&self) -> PoolState {
        PoolState {
            addresses: self
                .by_id
                .iter()
                .map(|(id, &i)| (id.clone(), self.plan.subnet.nth(i).expect("in range")))
                .collect(),
            cursor: self.cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::NetConfig;
    use proptest::prelude::*;

    fn plan(subnet: &str) -> NodePlan {
        NetConfig {
            subnet: subnet.parse().unwrap(),
            ..Default::default()
        }
        .plan_with_resolv_conf("")
        .unwrap()
    }

    #[test]
    fn first_instance_gets_the_first_unreserved_address() {
        let plan = plan("10.88.0.0/16");
        let mut pool = AddressPool::new(&plan);
        let a = pool.allocate("a").unwrap();
        assert_eq!(a.address, Ipv4Addr::new(10, 88, 0, 16));
        assert_eq!(a.host_ifname, "hth16");
        assert_eq!(a.mac.to_string(), "02:48:0a:58:00:10");
        assert_eq!(a.gateway, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(pool.allocate("a").unwrap(), a, "allocation is idempotent");
        let b = pool.allocate("b").unwrap();
        assert_eq!(b.address, Ipv4Addr::new(10, 88, 0, 17));
    }

    #[test]
    fn released_addresses_are_not_reused_at_once() {
        let plan = plan("10.88.0.0/16");
        let mut pool = AddressPool::new(&plan);
        let a = pool.allocate("a").unwrap();
        assert!(pool.release("a"));
        assert!(!pool.release("a"));
        let b = pool.allocate("b").unwrap();
        assert_ne!(a.address, b.address);
    }

    #[test]
    fn a_full_subnet_says_so_and_wraps_after_a_release() {
        let plan = plan("10.1.2.0/27");
        let mut pool = AddressPool::new(&plan);
        // 32 addresses - 16 reserved - broadcast = 15 instances.
        for i in 0..15 {
            pool.allocate(&format!("i{i}")).unwrap();
        }
        let err = pool.allocate("one-too-many").unwrap_err();
        assert!(matches!(err, NetError::Exhausted { .. }), "{err}");
        assert!(pool.release("i3"));
        let again = pool.allocate("late").unwrap();
        assert_eq!(again.address, Ipv4Addr::new(10, 1, 2, 19));
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let plan = plan("10.88.0.0/16");
        let mut pool = AddressPool::new(&plan);
        for id in ["x", "y", "z"] {
            pool.allocate(id).unwrap();
        }
        pool.release("y");
        let state = pool.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: PoolState = serde_json::from_str(&json).unwrap();
        let restored = AddressPool::from_state(&plan, &back).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(restored.get("x"), pool.get("x"));

        let mut dup = state.clone();
        dup.addresses
            .insert("w".into(), *state.addresses.get("x").unwrap());
        let err = AddressPool::from_state(&plan, &dup)
            .unwrap_err()
            .to_string();
        assert!(err.contains("held by"), "{err}");

        let mut outside = PoolState::default();
        outside
            .addresses
            .insert("o".into(), Ipv4Addr::new(10, 88, 0, 1));
        let err = AddressPool::from_state(&plan, &outside)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an instance address"), "{err}");
    }

    #[test]
    fn interface_names_map_back_to_indexes() {
        let plan = plan("10.88.0.0/16");
        assert_eq!(index_from_ifname(&plan, "hth16"), Some(16));
        assert_eq!(index_from_ifname(&plan, "hth65534"), Some(65534));
        for not_ours in [
            "hth", "hth016", "hth1", "hth65535", "hthx", "eth0", "hearth0",
        ] {
            assert_eq!(index_from_ifname(&plan, not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn init_network_carries_address_gateway_and_resolver() {
        let plan = plan("10.88.0.0/16");
        let net = InstanceNet::new(&plan, "a", Ipv4Addr::new(10, 88, 1, 0)).unwrap();
        let n = net.init_network();
        assert_eq!(n.interface, "eth0");
        assert_eq!(n.addresses, ["10.88.1.0/16"]);
        assert_eq!(n.gateway_v4, "10.88.0.1");
        assert_eq!(n.dns_servers, ["10.88.0.1"]);
        assert_eq!(n.mtu, 1500);
    }

    #[test]
    fn mac_parses_back() {
        let m = MacAddr::for_address(Ipv4Addr::new(10, 88, 0, 200));
        assert_eq!(MacAddr::try_from(m.to_string()).unwrap(), m);
        assert!(MacAddr::try_from("02:48:0a".to_owned()).is_err());
        assert!(MacAddr::try_from("02:48:0a:58:00:c8:00".to_owned()).is_err());
    }

    proptest! {
        // Whatever sequence of allocations and releases, addresses stay unique, inside the
        // instance range, and the stored state rebuilds the same pool.
        #[test]
        fn pool_invariants(ops in proptest::collection::vec((0u8..40, any::<bool>()), 1..200)) {
            let plan = plan("10.7.0.0/26");
            let mut pool = AddressPool::new(&plan);
            for (id, alloc) in ops {
                let id = format!("i{id}");
                if alloc {
                    match pool.allocate(&id) {
                        Ok(net) => {
                            prop_assert!(plan.subnet.contains(net.address));
                            let index = plan.subnet.index_of(net.address).unwrap();
                            prop_assert!((RESERVED_LOW..63).contains(&index));
                            prop_assert_eq!(index_from_ifname(&plan, &net.host_ifname), Some(index));
                        }
                        Err(NetError::Exhausted { .. }) => prop_assert_eq!(pool.len(), 63 - 16),
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                } else {
                    pool.release(&id);
                }
                let state = pool.state();
                let mut seen = std::collections::BTreeSet::new();
                for addr in state.addresses.values() {
                    prop_assert!(seen.insert(*addr), "address {addr} handed out twice");
                }
                let rebuilt = AddressPool::from_state(&plan, &state).unwrap();
                prop_assert_eq!(rebuilt.state(), state);
            }
        }
    }
}
