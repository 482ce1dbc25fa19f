//! An instance's network policy as the agent states it: its own addresses, internet on or off,
//! allowed and denied CIDRs with protocol and port ranges, the node's resolver, gateway and
//! ingress proxy, the HTTP ports. Plain data; [`Policy::validate`] (also run by every loader
//! call that takes a policy) says what is wrong with one.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::Duration,
};

use hearth_ebpf_common::{MAX_HTTP_PORTS, MAX_INSTANCE_V6};

/// Why a policy (or a rule or CIDR in text form) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A CIDR could not be parsed.
    #[error("Invalid CIDR {0:?} (expected ADDRESS or ADDRESS/PREFIX)")]
    CidrSyntax(String),
    /// The prefix length is longer than the address.
    #[error("Prefix length {len} is too long for {addr}")]
    PrefixTooLong {
        /// The address.
        addr: IpAddr,
        /// The prefix length given.
        len: u8,
    },
    /// The address has bits set after the prefix.
    #[error("{addr}/{len} has host bits set (did you mean {network}/{len}?)")]
    HostBits {
        /// The address given.
        addr: IpAddr,
        /// The prefix length.
        len: u8,
        /// The network the prefix names.
        network: IpAddr,
    },
    /// A rule could not be parsed.
    #[error("Invalid rule {0:?} (expected CIDR [any|tcp|udp|icmp [PORT|FIRST-LAST]])")]
    RuleSyntax(String),
    /// A port range whose first port is after its last.
    #[error("Port range {first}-{last} is empty")]
    EmptyPortRange {
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// A port range on a rule for every protocol.
    #[error("Rule {0} gives ports, but its protocol is `any`: name tcp, udp or icmp")]
    PortsWithAnyProtocol(String),
    /// An ICMP "port" (type) above 255.
    #[error("Rule {0}: ICMP types go from 0 to 255")]
    IcmpTypeRange(String),
    /// The instance MAC is zero or multicast.
    #[error("Instance MAC {0} is not a unicast address")]
    BadMac(String),
    /// An address that cannot be an instance's or a node service's.
    #[error("{what} {addr} is not a unicast address")]
    BadAddress {
        /// Which address.
        what: &'static str,
        /// The address.
        addr: IpAddr,
    },
    /// Too many instance IPv6 addresses.
    #[error("At most {max} instance IPv6 addresses are supported (got {got}, link-local included)")]
    TooManyIpv6 {
        /// The limit.
        max: usize,
        /// How many the policy has.
        got: usize,
    },
    /// Too many HTTP ports, or port 0.
    #[error("HTTP ports must be 1 to {max} distinct non-zero ports (got {got:?})")]
    HttpPorts {
        /// The limit.
        max: usize,
        /// The ports given.
        got: Vec<u16>,
    },
    /// Too many distinct CIDRs in one list.
    #[error("The {list} list has {got} distinct IPv{family} CIDRs; at most {max} are supported")]
    TooManyCidrs {
        /// `allow` or `deny`.
        list: &'static str,
        /// 4 or 6.
        family: u8,
        /// How many.
        got: usize,
        /// The limit.
        max: u32,
    },
    /// One CIDR collects too many rules (its own and those of the CIDRs containing it).
    #[error(
        "{cidr} in the {list} list collects {got} port rules (its own and those of the CIDRs containing it); at most {max} are supported"
    )]
    TooManyRules {
        /// `allow` or `deny`.
        list: &'static str,
        /// The CIDR.
        cidr: Cidr,
        /// How many rules.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A flow timeout of zero or above a day.
    #[error("Flow timeout {0:?} must be between 1 s and 1 day")]
    FlowTimeout(Duration),
}

/// An IPv4 or IPv6 network: an address with no bits set after its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// The network `addr/prefix_len`; refuses host bits after the prefix.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Cidr, PolicyError> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix_len > max {
            return Err(PolicyError::PrefixTooLong {
                addr,
                len: prefix_len,
            });
        }
        let network = mask(addr, prefix_len);
        if network != addr {
            return Err(PolicyError::HostBits {
                addr,
                len: prefix_len,
                network,
            });
        }
        Ok(Cidr { addr, prefix_len })
    }

    /// The network `addr/prefix_len` with any host bits cleared.
    pub fn new_truncating(addr: IpAddr, prefix_len: u8) -> Result<Cidr, PolicyError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(PolicyError::PrefixTooLong {
                addr,
                len: prefix_len,
            });
        }
        Ok(Cidr {
            addr: mask(addr, prefix_len),
            prefix_len,
        })
    }

    /// The one-address network of `addr`.
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix_len }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `addr` is inside this network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4() && mask(addr, self.prefix_len) == self.addr
    }

    /// Whether `other` is inside (or equal to) this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix_len <= other.prefix_len && self.contains(other.addr)
    }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Cidr, PolicyError> {
        let bad = || PolicyError::CidrSyntax(s.to_owned());
        match s.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().map_err(|_| bad())?;
                let len: u8 = len.parse().map_err(|_| bad())?;
                Cidr::new(addr, len)
            }
            None => Ok(Cidr::host(s.parse().map_err(|_| bad())?)),
        }
    }
}

/// The transport protocol a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Every IP protocol, every port.
    Any,
    /// TCP, by destination port.
    Tcp,
    /// UDP, by destination port.
    Udp,
    /// ICMP for IPv4 CIDRs, ICMPv6 for IPv6 CIDRs, by message type (echo request: 8 / 128).
    Icmp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        })
    }
}

/// An inclusive range of destination ports (or ICMP types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    /// One port.
    pub const fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Destinations in `cidr` reached with `protocol` on `ports`.
///
/// Text form (for configs and command lines): `CIDR [PROTOCOL [PORTS]]`, e.g. `10.0.0.0/8`,
/// `2001:db8::/32 tcp 443`, `192.0.2.1 udp 5000-5100`, `0.0.0.0/0 icmp 8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    /// Destination network.
    pub cidr: Cidr,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination ports (ICMP: types); must be [`PortRange::ALL`] for [`Protocol::Any`].
    pub ports: PortRange,
}

impl Rule {
    /// Every protocol and port to `cidr`.
    pub fn any(cidr: Cidr) -> Rule {
        Rule {
            cidr,
            protocol: Protocol::Any,
            ports: PortRange::ALL,
        }
    }

    /// `protocol` on `ports` to `cidr`.
    pub fn new(cidr: Cidr, protocol: Protocol, ports: PortRange) -> Result<Rule, PolicyError> {
        let rule = Rule {
            cidr,
            protocol,
            ports,
        };
        rule.validate()?;
        Ok(rule)
    }

    /// Checks the port range against the protocol.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.ports.first > self.ports.last {
            return Err(PolicyError::EmptyPortRange {
                first: self.ports.first,
                last: self.ports.last,
            });
        }
        match self.protocol {
            Protocol::Any if self.ports != PortRange::ALL => {
                Err(PolicyError::PortsWithAnyProtocol(self.to_string()))
            }
            Protocol::Icmp if self.ports.last > 255 && self.ports != PortRange::ALL => {
                Err(PolicyError::IcmpTypeRange(self.to_string()))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        if self.protocol != Protocol::Any {
            write!(f, " {}", self.protocol)?;
            if self.ports != PortRange::ALL {
                write!(f, " {}", self.ports)?;
            }
        }
        Ok(())
    }
}

impl FromStr for Rule {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Rule, PolicyError> {
        let bad = || PolicyError::RuleSyntax(s.to_owned());
        let mut words = s.split_whitespace();
        let cidr: Cidr = words.next().ok_or_else(bad)?.parse()?;
        let protocol = match words.next() {
            None => return Ok(Rule::any(cidr)),
            Some("any") => Protocol::Any,
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some("icmp") => Protocol::Icmp,
            Some(_) => return Err(bad()),
        };
        let ports = match words.next() {
            None => PortRange::ALL,
            Some(p) => match p.split_once('-') {
                Some((a, b)) => PortRange {
                    first: a.parse().map_err(|_| bad())?,
                    last: b.parse().map_err(|_| bad())?,
                },
                None => PortRange::single(p.parse().map_err(|_| bad())?),
            },
        };
        if words.next().is_some() {
            return Err(bad());
        }
        Rule::new(cidr, protocol, ports)
    }
}

/// A node service's addresses, one per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeAddr {
    /// IPv4 address, if the service has one.
    pub v4: Option<Ipv4Addr>,
    /// IPv6 address, if the service has one.
    pub v6: Option<Ipv6Addr>,
}

impl NodeAddr {
    /// An IPv4-only service.
    pub fn v4(addr: Ipv4Addr) -> NodeAddr {
        NodeAddr {
            v4: Some(addr),
            v6: None,
        }
    }
}

/// How long an idle flow is remembered (so that its replies are let in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// TCP flows. Default: 24 hours.
    pub tcp: Duration,
    /// UDP and ICMP flows. Default: 2 minutes.
    pub other: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> FlowTimeouts {
        FlowTimeouts {
            tcp: Duration::from_secs(24 * 3600),
            other: Duration::from_secs(120),
        }
    }
}

/// One instance's network policy.
///
/// Egress (what the instance sends): its source MAC and IP must be its own; ARP and neighbour
/// discovery only for its own addresses; then, for IP: a [`deny`](Policy::deny) match drops
/// (denies win over everything), DNS to the node's resolver passes if
/// [`allow_dns`](Policy::allow_dns), ICMP echo to the gateway if
/// [`allow_gateway_ping`](Policy::allow_gateway_ping), an [`allow`](Policy::allow) match passes,
/// and with [`internet`](Policy::internet) on every destination outside the special-purpose
/// ranges (private, loopback, link-local, multicast, documentation, …; see
/// [`NON_INTERNET_V4`](super::NON_INTERNET_V4)) passes. Everything else is dropped.
///
/// Ingress (what reaches the instance): TCP from the [`ingress_proxy`](Policy::ingress_proxy) to
/// one of the [`http_ports`](Policy::http_ports), replies to flows the instance opened (while the
/// egress policy still allows them), ICMP errors about those flows, ARP/NDP for its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The instance's MAC address.
    pub instance_mac: [u8; 6],
    /// The instance's IPv4 address, if it has one.
    pub instance_ipv4: Option<Ipv4Addr>,
    /// The instance's IPv6 addresses. The EUI-64 link-local address of
    /// [`instance_mac`](Policy::instance_mac) is always added; list the link-local address
    /// too if the instance uses another one.
    pub instance_ipv6: Vec<Ipv6Addr>,
    /// Whether the instance may reach the internet.
    pub internet: bool,
    /// Allowed destinations.
    pub allow: Vec<Rule>,
    /// Denied destinations; they win over everything else.
    pub deny: Vec<Rule>,
    /// The node's DNS resolver.
    pub dns: NodeAddr,
    /// Whether the instance may query [`dns`](Policy::dns) (UDP and TCP port 53).
    pub allow_dns: bool,
    /// The node's gateway (the instance's next hop).
    pub gateway: NodeAddr,
    /// Whether the instance may ping [`gateway`](Policy::gateway).
    pub allow_gateway_ping: bool,
    /// The ingress proxy's address as the instance sees it.
    pub ingress_proxy: NodeAddr,
    /// The instance's HTTP ports (the proxy's only way in).
    pub http_ports: Vec<u16>,
    /// How long idle flows are remembered.
    pub flow_timeouts: FlowTimeouts,
}

impl Policy {
    /// A policy for the instance with MAC `instance_mac` with the defaults: no addresses, no
    /// internet, no rules, DNS allowed (once [`dns`](Policy::dns) is set), gateway ping not
    /// allowed, no ingress, default [`FlowTimeouts`].
    pub fn new(instance_mac: [u8; 6]) -> Policy {
        Policy {
            instance_mac,
            instance_ipv4: None,
            instance_ipv6: Vec::new(),
            internet: false,
            allow: Vec::new(),
            deny: Vec::new(),
            dns: NodeAddr::default(),
            allow_dns: true,
            gateway: NodeAddr::default(),
            allow_gateway_ping: false,
            ingress_proxy: NodeAddr::default(),
            http_ports: Vec::new(),
            flow_timeouts: FlowTimeouts::default(),
        }
    }

    /// The instance's IPv6 addresses as the programs see them: the listed ones plus the EUI-64
    /// link-local address of its MAC, without duplicates.
    pub fn effective_ipv6(&self) -> Vec<Ipv6Addr> {
        let mut all = self.instance_ipv6.clone();
        let ll = eui64_link_local(self.instance_mac);
        if !all.contains(&ll) {
            all.push(ll);
        }
        let mut seen = Vec::with_capacity(all.len());
        all.retain(|a| {
            let new = !seen.contains(a);
            seen.push(*a);
            new
        });
        all
    }

    /// Checks everything that can be checked without the kernel.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mac = self.instance_mac;
        if mac == [0; 6] || mac[0] & 1 != 0 {
            return Err(PolicyError::BadMac(format_mac(mac)));
        }
        let unicast_v4 = |what, a: Ipv4Addr| {
            if a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
                Err(PolicyError::BadAddress {
                    what,
                    addr: a.into(),
                })
            } else {
                Ok(())
            }
        };
        let unicast_v6 = |what, a: Ipv6Addr| {
            if a.is_unspecified() || a.is_multicast() {
                Err(PolicyError::BadAddress {
                    what,
                    addr: a.into(),
                })
            } else {
                Ok(())
            }
        };
        if let Some(a) = self.instance_ipv4 {
            unicast_v4("Instance address", a)?;
        }
        for a in &self.instance_ipv6 {
            unicast_v6("Instance address", *a)?;
        }
        let v6 = self.effective_ipv6().len();
        if v6 > MAX_INSTANCE_V6 {
            return Err(PolicyError::TooManyIpv6 {
                max: MAX_INSTANCE_V6,
                got: v6,
            });
        }
        for (what, node) in [
            ("DNS resolver", &self.dns),
            ("Gateway", &self.gateway),
            ("Ingress proxy", &self.ingress_proxy),
        ] {
            if let Some(a) = node.v4 {
                unicast_v4(what, a)?;
            }
            if let Some(a) = node.v6 {
                unicast_v6(what, a)?;
            }
        }
        let mut ports = self.http_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() != self.http_ports.len()
            || ports.len() > MAX_HTTP_PORTS
            || ports.contains(&0)
        {
            return Err(PolicyError::HttpPorts {
                max: MAX_HTTP_PORTS,
                got: self.http_ports.clone(),
            });
        }
        for rule in self.allow.iter().chain(&self.deny) {
            rule.validate()?;
        }
        for t in [self.flow_timeouts.tcp, self.flow_timeouts.other] {
            if t < Duration::from_secs(1) || t > Duration::from_secs(86_400) {
                return Err(PolicyError::FlowTimeout(t));
            }
        }
        Ok(())
    }
}

/// The EUI-64 link-local address (`fe80::/64`) Linux derives from `mac` by default.
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c.prefix_len(), 8);
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.0".parse().unwrap()));
        assert!(!c.contains("::a00:1".parse().unwrap()));
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>().unwrap_err().to_string(),
            "10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let h: Cidr = "2001:db8::1".parse().unwrap();
        assert_eq!(h.prefix_len(), 128);
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.covers(&h));
        assert!(!h.covers(&all));
    }

    #[test]
    fn rule_text_round_trips() {
        for s in [
            "10.0.0.0/8",
            "2001:db8::/32 tcp 443",
            "192.0.2.1/32 udp 5000-5100",
            "0.0.0.0/0 icmp 8",
            "198.51.100.0/24 tcp",
        ] {
            let r: Rule = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        assert!("10.0.0.0/8 any 80".parse::<Rule>().is_err());
        assert!("10.0.0.0/8 tcp 90-80".parse::<Rule>().is_err());
        assert!("10.0.0.0/8 icmp 300".parse::<Rule>().is_err());
        assert!("10.0.0.0/8 sctp".parse::<Rule>().is_err());
        assert!("10.0.0.0/8 tcp 80 extra".parse::<Rule>().is_err());
    }

    #[test]
    fn validation() {
        let mut p = Policy::new([0x02, 0, 0, 0, 0, 1]);
        p.validate().unwrap();
        p.http_ports = vec![80, 80];
        assert!(p.validate().is_err());
        p.http_ports = vec![80, 8080];
        p.validate().unwrap();
        p.instance_ipv4 = Some(Ipv4Addr::BROADCAST);
        assert!(p.validate().is_err());
        p.instance_ipv4 = Some(Ipv4Addr::new(10, 0, 0, 2));
        p.instance_mac = [0x01, 0, 0, 0, 0, 1];
        assert!(p.validate().is_err());
    }

    #[test]
    fn link_local_is_eui64() {
        assert_eq!(
            eui64_link_local([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]),
            "fe80::11:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap()
        );
    }
}
