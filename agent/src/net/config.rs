//! The node's network configuration ([`NetConfig`], what the operator writes) and the plan
//! resolved from it ([`NodePlan`], what the rest of the module works with).
//!
//! Defaults (documented here and nowhere else):
//!
//! | field | default |
//! |---|---|
//! | `subnet` | `10.88.0.0/16` |
//! | `bridge` | `hearth0` |
//! | `interface_prefix` | `hth` |
//! | `gateway` | the subnet's first host address (`10.88.0.1`) |
//! | `ingress_address` | the subnet's second host address (`10.88.0.2`) |
//! | `resolver` | the first non-loopback IPv4 `nameserver` of `/etc/resolv.conf`, else the gateway |
//! | `mtu` | 1500 |
//! | `nat_table` | `hearth` |

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::NetError;
use super::alloc::{MacAddr, RESERVED_LOW};

/// An IPv4 network in CIDR notation (`10.88.0.0/16`); host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    /// A network from its address and prefix length; host bits must be zero.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, NetError> {
        if prefix_len > 32 {
            return Err(NetError::Config(format!(
                "prefix length {prefix_len} is over 32"
            )));
        }
        let cidr = Ipv4Cidr {
            network,
            prefix_len,
        };
        if u32::from(network) & !cidr.mask() != 0 {
            return Err(NetError::Config(format!(
                "{network}/{prefix_len} has host bits set (the network is {}/{prefix_len})",
                Ipv4Addr::from(u32::from(network) & cidr.mask())
            )));
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The netmask as a number.
    pub fn mask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n)),
        }
    }

    /// How many addresses the network spans (network and broadcast included).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    /// Whether `addr` lies inside the network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network)
    }

    /// The address at offset `index` from the network address (`None` past the end).
    pub fn nth(&self, index: u32) -> Option<Ipv4Addr> {
        (u64::from(index) < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + index))
    }

    /// The offset of `addr` from the network address (`None` when outside).
    pub fn index_of(&self, addr: Ipv4Addr) -> Option<u32> {
        self.contains(addr)
            .then(|| u32::from(addr) - u32::from(self.network))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.split_once('/').ok_or_else(|| {
            NetError::Config(format!("{s:?} is not in CIDR notation (a.b.c.d/n)"))
        })?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| NetError::Config(format!("{addr:?} in {s:?} is not an IPv4 address")))?;
        let len: u8 = len
            .parse()
            .map_err(|_| NetError::Config(format!("{len:?} in {s:?} is not a prefix length")))?;
        Ipv4Cidr::new(addr, len)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = NetError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

/// The node network as the operator configures it (`[network]` in the agent's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// The node subnet every instance gets its address from; at most a /27.
    pub subnet: Ipv4Cidr,
    /// Name of the node bridge the instances' host-side interfaces are attached to.
    pub bridge: String,
    /// Prefix of the instances' host-side interface names (`<prefix><address index>`).
    pub interface_prefix: String,
    /// The bridge's address: the instances' default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// The ingress proxy's source address toward instances (a second address on the bridge).
    /// The eBPF ingress program admits TCP to an instance's HTTP port only from this address.
    pub ingress_address: Option<Ipv4Addr>,
    /// The DNS resolver handed to hearth-init.
    pub resolver: Option<Ipv4Addr>,
    /// MTU of the bridge and of every instance interface.
    pub mtu: u32,
    /// Name of the agent's own nftables table (family `ip`) holding the egress NAT.
    pub nat_table: String,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            subnet: Ipv4Cidr {
                network: Ipv4Addr::new(10, 88, 0, 0),
                prefix_len: 16,
            },
            bridge: "hearth0".to_owned(),
            interface_prefix: "hth".to_owned(),
            gateway: None,
            ingress_address: None,
            resolver: None,
            mtu: 1500,
            nat_table: "hearth".to_owned(),
        }
    }
}

/// The longest Linux interface name (`IFNAMSIZ` - 1).
pub const IFNAME_MAX: usize = 15;

impl NetConfig {
    /// Checks the config and resolves its defaults, reading `/etc/resolv.conf` when no resolver
    /// is configured.
    pub fn plan(&self) -> Result<NodePlan, NetError> {
        let resolv_conf = if self.resolver.is_none() {
            std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
        } else {
            String::new()
        };
        self.plan_with_resolv_conf(&resolv_conf)
    }

    /// [`plan`](Self::plan) with the text of `resolv.conf` given (for tests).
    pub fn plan_with_resolv_conf(&self, resolv_conf: &str) -> Result<NodePlan, NetError> {
        let subnet = self.subnet;
        if subnet.prefix_len() > 27 {
            return Err(NetError::Config(format!(
                "subnet {subnet} is too small: use at most a /27 (the first {RESERVED_LOW} \
                 addresses are kept for the node)"
            )));
        }
        let host = |name: &str, addr: Option<Ipv4Addr>, default_index: u32| {
            let addr = addr.unwrap_or_else(|| subnet.nth(default_index).expect("/27 or larger"));
            match subnet.index_of(addr) {
                Some(0) => Err(NetError::Config(format!(
                    "{name} {addr} is the network address of {subnet}"
                ))),
                Some(i) if u64::from(i) == subnet.size() - 1 => Err(NetError::Config(format!(
                    "{name} {addr} is the broadcast address of {subnet}"
                ))),
                Some(_) => Ok(addr),
                None => Err(NetError::Config(format!(
                    "{name} {addr} is outside the subnet {subnet}"
                ))),
            }
        };
        let gateway = host("gateway", self.gateway, 1)?;
        let ingress_address = host("ingress_address", self.ingress_address, 2)?;
        if gateway == ingress_address {
            return Err(NetError::Config(format!(
                "gateway and ingress_address are both {gateway}: the ingress proxy needs an \
                 address of its own"
            )));
        }
        check_ifname("bridge", &self.bridge)?;
        let max_index = (subnet.size() - 1) as u32;
        let longest = format!("{}{}", self.interface_prefix, max_index);
        if self.interface_prefix.is_empty() || longest.len() > IFNAME_MAX {
            return Err(NetError::Config(format!(
                "interface_prefix {:?} must be non-empty and leave room for the address index: \
                 {longest:?} is longer than {IFNAME_MAX} bytes",
                self.interface_prefix
            )));
        }
        check_ifname("interface_prefix", &self.interface_prefix)?;
        if self
            .bridge
            .strip_prefix(&self.interface_prefix)
            .is_some_and(|rest| rest.parse::<u32>().is_ok())
        {
            return Err(NetError::Config(format!(
                "bridge name {:?} looks like an instance interface (prefix {:?})",
                self.bridge, self.interface_prefix
            )));
        }
        if !(576..=65535).contains(&self.mtu) {
            return Err(NetError::Config(format!(
                "mtu {} is outside 576..=65535",
                self.mtu
            )));
        }
        if self.nat_table.is_empty()
            || self.nat_table.len() > 64
            || !self
                .nat_table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            || !self.nat_table.as_bytes()[0].is_ascii_alphabetic()
        {
            return Err(NetError::Config(format!(
                "nat_table {:?} must start with a letter and hold only letters, digits, '_' \
                 and '-'",
                self.nat_table
            )));
        }
        let resolver = self
            .resolver
            .or_else(|| first_nameserver(resolv_conf))
            .unwrap_or(gateway);
        Ok(NodePlan {
            subnet,
            gateway,
            ingress_address,
            resolver,
            bridge: self.bridge.clone(),
            bridge_mac: MacAddr::for_address(gateway),
            interface_prefix: self.interface_prefix.clone(),
            mtu: self.mtu,
            nat_table: self.nat_table.clone(),
        })
    }
}

fn check_ifname(what: &str, name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetError::Config(format!(
            "{what} {name:?} is not a valid interface name (1-{IFNAME_MAX} bytes of letters, \
             digits, '-', '_', '.')"
        )))
    }
}

/// The first IPv4 `nameserver` of a `resolv.conf` text that an instance can reach, i.e. not a
/// loopback address (systemd-resolved's 127.0.0.53 means nothing inside an instance).
pub fn first_nameserver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback() && !a.is_unspecified())
}

/// The resolved node network: every address and name the module works with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    /// The node subnet.
    pub subnet: Ipv4Cidr,
    /// The bridge's primary address and every instance's default gateway.
    pub gateway: Ipv4Addr,
    /// The ingress proxy's source address (a secondary address on the bridge).
    pub ingress_address: Ipv4Addr,
    /// The DNS resolver handed to hearth-init.
    pub resolver: Ipv4Addr,
    /// The bridge's name.
    pub bridge: String,
    /// The bridge's MAC address (fixed, so that it does not change as ports come and go).
    pub bridge_mac: MacAddr,
    /// Prefix of instance interface names.
    pub interface_prefix: String,
    /// MTU of every interface.
    pub mtu: u32,
    /// The agent's nftables table.
    pub nat_table: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_to_the_documented_plan() {
        let plan = NetConfig::default()
            .plan_with_resolv_conf("nameserver 127.0.0.53\nnameserver 192.0.2.53\n")
            .unwrap();
        assert_eq!(plan.subnet.to_string(), "10.88.0.0/16");
        assert_eq!(plan.gateway, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(plan.ingress_address, Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(plan.resolver, Ipv4Addr::new(192, 0, 2, 53));
        assert_eq!(plan.bridge, "hearth0");
        assert_eq!(plan.bridge_mac.to_string(), "02:48:0a:58:00:01");
    }

    #[test]
    fn resolver_falls_back_to_the_gateway() {
        let plan = NetConfig::default()
            .plan_with_resolv_conf("nameserver 127.0.0.53\n")
            .unwrap();
        assert_eq!(plan.resolver, plan.gateway);
    }

    #[test]
    fn config_parses_from_toml_and_rejects_unknown_fields() {
        let c: NetConfig = toml_like(r#"{"subnet": "10.99.0.0/24", "mtu": 1400}"#).unwrap();
        assert_eq!(c.subnet.to_string(), "10.99.0.0/24");
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.bridge, "hearth0");
        let err = toml_like(r#"{"subnett": "10.99.0.0/24"}"#).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        let err = toml_like(r#"{"subnet": "10.99.0.1/24"}"#).unwrap_err();
        assert!(err.contains("host bits"), "{err}");
    }

    fn toml_like(json: &str) -> Result<NetConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn bad_configs_are_rejected_with_a_reason() {
        let bad = [
            (
                NetConfig {
                    subnet: "10.1.0.0/28".parse().unwrap(),
                    ..Default::default()
                },
                "too small",
            ),
            (
                NetConfig {
                    gateway: Some(Ipv4Addr::new(10, 89, 0, 1)),
                    ..Default::default()
                },
                "outside",
            ),
            (
                NetConfig {
                    ingress_address: Some(Ipv4Addr::new(10, 88, 0, 1)),
                    ..Default::default()
                },
                "both",
            ),
            (
                NetConfig {
                    gateway: Some(Ipv4Addr::new(10, 88, 255, 255)),
                    ..Default::default()
                },
                "broadcast",
            ),
            (
                NetConfig {
                    bridge: "a-very-long-bridge-name".into(),
                    ..Default::default()
                },
                "interface name",
            ),
            (
                NetConfig {
                    interface_prefix: "longprefix12".into(),
                    ..Default::default()
                },
                "leave room",
            ),
            (
                NetConfig {
                    bridge: "hth7".into(),
                    ..Default::default()
                },
                "looks like",
            ),
            (
                NetConfig {
                    nat_table: "bad table".into(),
                    ..Default::default()
                },
                "nat_table",
            ),
            (
                NetConfig {
                    mtu: 100,
                    ..Default::default()
                },
                "mtu",
            ),
        ];
        for (config, want) in bad {
            let err = config.plan_with_resolv_conf("").unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn cidr_arithmetic() {
        let c: Ipv4Cidr = "10.88.0.0/16".parse().unwrap();
        assert_eq!(c.size(), 65536);
        assert_eq!(c.nth(258), Some(Ipv4Addr::new(10, 88, 1, 2)));
        assert_eq!(c.nth(65536), None);
        assert_eq!(c.index_of(Ipv4Addr::new(10, 88, 1, 2)), Some(258));
        assert_eq!(c.index_of(Ipv4Addr::new(10, 89, 0, 0)), None);
        assert!("10.88.0.0".parse::<Ipv4Cidr>().is_err());
        assert!("10.88.0.0/33".parse::<Ipv4Cidr>().is_err());
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }
}
