//! Turns a [`Policy`] into what the maps hold: a [`Config`] and the allow/deny trie entries.
//!
//! An LPM trie returns only the longest matching prefix, so each CIDR's entry carries its own
//! rules plus those of every shorter CIDR of the same list that contains it: the longest match
//! then holds every rule that applies to the address.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use hearth_ebpf_common::{
    Config, FLAG_DNS, FLAG_DNS_V4, FLAG_DNS_V6, FLAG_GATEWAY_PING, FLAG_GATEWAY_V4,
    FLAG_GATEWAY_V6, FLAG_HAS_V4, FLAG_INTERNET, FLAG_PROXY_V4, FLAG_PROXY_V6, MAX_CIDRS,
    MAX_RULES, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PortRule, RuleSet,
};

use super::policy::{Cidr, Policy, PolicyError, PortRange, Protocol, Rule};

/// One trie entry: a network and the rules that apply inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrieEntry {
    /// The network.
    pub cidr: Cidr,
    /// Its rules (own and inherited).
    pub rules: RuleSet,
}

/// A policy in map form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// The config half.
    pub config: Config,
    /// Allowed IPv4 networks.
    pub allow_v4: Vec<TrieEntry>,
    /// Allowed IPv6 networks.
    pub allow_v6: Vec<TrieEntry>,
    /// Denied IPv4 networks.
    pub deny_v4: Vec<TrieEntry>,
    /// Denied IPv6 networks.
    pub deny_v6: Vec<TrieEntry>,
}

/// An address as the programs hold it: network byte order, in-memory order of the octets.
pub fn v4_word(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// An IPv6 address as the programs hold it.
pub fn v6_words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// Validates and compiles `policy`.
pub fn compile(policy: &Policy) -> Result<Compiled, PolicyError> {
    policy.validate()?;
    let mut c = Config {
        instance_mac: policy.instance_mac,
        ..Config::default()
    };
    if policy.internet {
        c.flags |= FLAG_INTERNET;
    }
    if policy.allow_dns {
        c.flags |= FLAG_DNS;
    }
    if policy.allow_gateway_ping {
        c.flags |= FLAG_GATEWAY_PING;
    }
    if let Some(a) = policy.instance_ipv4 {
        c.flags |= FLAG_HAS_V4;
        c.instance_v4 = v4_word(a);
    }
    let v6 = policy.effective_ipv6();
    for (slot, a) in c.instance_v6.iter_mut().zip(&v6) {
        *slot = v6_words(*a);
    }
    c.n_instance_v6 = v6.len() as u32;
    let v4_fields = [
        (policy.gateway.v4, FLAG_GATEWAY_V4, &mut c.gateway_v4),
        (policy.dns.v4, FLAG_DNS_V4, &mut c.dns_v4),
        (policy.ingress_proxy.v4, FLAG_PROXY_V4, &mut c.proxy_v4),
    ];
    let mut flags = 0;
    for (addr, flag, field) in v4_fields {
        if let Some(a) = addr {
            flags |= flag;
            *field = v4_word(a);
        }
    }
    let v6_fields = [
        (policy.gateway.v6, FLAG_GATEWAY_V6, &mut c.gateway_v6),
        (policy.dns.v6, FLAG_DNS_V6, &mut c.dns_v6),
        (policy.ingress_proxy.v6, FLAG_PROXY_V6, &mut c.proxy_v6),
    ];
    for (addr, flag, field) in v6_fields {
        if let Some(a) = addr {
            flags |= flag;
            *field = v6_words(a);
        }
    }
    c.flags |= flags;
    for (slot, port) in c.http_ports.iter_mut().zip(&policy.http_ports) {
        *slot = *port;
    }
    c.n_http_ports = policy.http_ports.len() as u32;
    c.tcp_timeout_ns = policy.flow_timeouts.tcp.as_nanos() as u64;
    c.other_timeout_ns = policy.flow_timeouts.other.as_nanos() as u64;

    Ok(Compiled {
        config: c,
        allow_v4: trie("allow", 4, &policy.allow)?,
        allow_v6: trie("allow", 6, &policy.allow)?,
        deny_v4: trie("deny", 4, &policy.deny)?,
        deny_v6: trie("deny", 6, &policy.deny)?,
    })
}

fn port_rule(rule: &Rule) -> PortRule {
    let v4 = rule.cidr.addr().is_ipv4();
    let (protocol, ports) = match rule.protocol {
        Protocol::Any => (PROTO_ANY, PortRange::ALL),
        Protocol::Tcp => (PROTO_TCP, rule.ports),
        Protocol::Udp => (PROTO_UDP, rule.ports),
        Protocol::Icmp => (if v4 { PROTO_ICMP } else { PROTO_ICMPV6 }, rule.ports),
    };
    PortRule {
        port_lo: ports.first,
        port_hi: ports.last,
        protocol,
        _pad: [0; 3],
    }
}

/// The trie entries of one list for one family.
fn trie(list: &'static str, family: u8, rules: &[Rule]) -> Result<Vec<TrieEntry>, PolicyError> {
    let mut own: BTreeMap<Cidr, BTreeSet<PortRule>> = BTreeMap::new();
    for rule in rules {
        if rule.cidr.addr().is_ipv4() == (family == 4) {
            own.entry(rule.cidr).or_default().insert(port_rule(rule));
        }
    }
    if own.len() > MAX_CIDRS as usize {
        return Err(PolicyError::TooManyCidrs {
            list,
            family,
            got: own.len(),
            max: MAX_CIDRS,
        });
    }
    let mut entries = Vec::with_capacity(own.len());
    for cidr in own.keys() {
        let mut merged: BTreeSet<PortRule> = BTreeSet::new();
        for (outer, rules) in &own {
            if outer.covers(cidr) {
                merged.extend(rules);
            }
        }
        // A rule for every protocol makes the others redundant.
        if let Some(any) = merged.iter().find(|r| r.protocol == PROTO_ANY).copied() {
            merged = BTreeSet::from([any]);
        }
        if merged.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules {
                list,
                cidr: *cidr,
                got: merged.len(),
                max: MAX_RULES,
            });
        }
        let mut set = RuleSet {
            count: merged.len() as u32,
            ..RuleSet::default()
        };
        for (slot, r) in set.rules.iter_mut().zip(merged) {
            *slot = r;
        }
        entries.push(TrieEntry {
            cidr: *cidr,
            rules: set,
        });
    }
    Ok(entries)
}

/// IPv4 ranges that are not "the internet" (RFC 6890 special-purpose and the like): with
/// internet access on, these still need an explicit allow rule.
pub const NON_INTERNET_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// IPv6 ranges that are not "the internet". Translation prefixes are included because the IPv4
/// address inside them may be a private one.
pub const NON_INTERNET_V6: &[&str] = &[
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// The special ranges of one family, parsed.
pub fn non_internet(family: u8) -> Vec<Cidr> {
    let list = if family == 4 {
        NON_INTERNET_V4
    } else {
        NON_INTERNET_V6
    };
    list.iter()
        .map(|s| s.parse().expect("the built-in special ranges parse"))
        .collect()
}

/// Whether `addr` is outside every special range (what "internet" means for the policy).
pub fn is_internet(addr: IpAddr) -> bool {
    let family = if addr.is_ipv4() { 4 } else { 6 };
    !non_internet(family).iter().any(|c| c.contains(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> Policy {
        let mut p = Policy::new([0x02, 0, 0, 0, 0, 1]);
        p.instance_ipv4 = Some(Ipv4Addr::new(10, 0, 0, 2));
        p
    }

    #[test]
    fn entries_inherit_the_rules_of_containing_cidrs() {
        let mut p = policy();
        p.allow = vec![
            "10.0.0.0/8 tcp 22".parse().unwrap(),
            "10.1.0.0/16 udp 53".parse().unwrap(),
            "10.1.2.0/24 tcp 80-81".parse().unwrap(),
            "192.0.2.0/24 tcp 1".parse().unwrap(),
        ];
        let c = compile(&p).unwrap();
        let find = |s: &str| {
            let cidr: Cidr = s.parse().unwrap();
            c.allow_v4.iter().find(|e| e.cidr == cidr).unwrap().rules
        };
        assert_eq!(find("10.0.0.0/8").count, 1);
        assert_eq!(find("10.1.0.0/16").count, 2);
        let deepest = find("10.1.2.0/24");
        assert_eq!(deepest.count, 3);
        assert!(deepest.matches(PROTO_TCP, 22));
        assert!(deepest.matches(PROTO_UDP, 53));
        assert!(deepest.matches(PROTO_TCP, 81));
        assert!(!deepest.matches(PROTO_TCP, 82));
        assert_eq!(find("192.0.2.0/24").count, 1);
        assert!(c.allow_v6.is_empty());
    }

    #[test]
    fn any_protocol_collapses_the_set() {
        let mut p = policy();
        p.deny = vec![
            "0.0.0.0/0".parse().unwrap(),
            "10.0.0.0/8 tcp 22".parse().unwrap(),
        ];
        let c = compile(&p).unwrap();
        assert!(c.deny_v4.iter().all(|e| e.rules.count == 1));
    }

    #[test]
    fn too_many_rules_is_an_error() {
        let mut p = policy();
        p.allow = (0..17)
            .map(|i| format!("10.0.0.0/8 tcp {i}").parse().unwrap())
            .collect();
        assert!(matches!(
            compile(&p),
            Err(PolicyError::TooManyRules { got: 17, .. })
        ));
    }

    #[test]
    fn config_fields() {
        let mut p = policy();
        p.internet = true;
        p.gateway = NodeAddr::v4(Ipv4Addr::new(10, 0, 0, 1));
        p.http_ports = vec![8080, 80];
        let c = compile(&p).unwrap().config;
        assert_eq!(c.instance_v4.to_ne_bytes(), [10, 0, 0, 2]);
        assert_eq!(c.gateway_v4.to_ne_bytes(), [10, 0, 0, 1]);
        assert_ne!(c.flags & FLAG_INTERNET, 0);
        assert_ne!(c.flags & FLAG_GATEWAY_V4, 0);
        assert_eq!(c.flags & FLAG_PROXY_V4, 0);
        assert_eq!(&c.http_ports[..2], &[8080, 80]);
        assert_eq!(c.n_http_ports, 2);
        assert_eq!(c.n_instance_v6, 1, "the link-local address is always there");
    }

    #[test]
    fn special_ranges() {
        assert!(!is_internet("10.1.2.3".parse().unwrap()));
        assert!(!is_internet("255.255.255.255".parse().unwrap()));
        assert!(!is_internet("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!is_internet("fe80::1".parse().unwrap()));
        assert!(is_internet("11.22.33.44".parse().unwrap()));
        assert!(is_internet("2a00:1234::1".parse().unwrap()));
        assert!(non_internet(4).len() + non_internet(6).len() <= 64);
    }

    use super::super::policy::NodeAddr;

    fn arb_rule() -> impl Strategy<Value = Rule> {
        let cidr = (any::<u32>(), 0u8..=32).prop_map(|(a, len)| {
            Cidr::new_truncating(IpAddr::V4(Ipv4Addr::from(a & 0xff0f_0000)), len).unwrap()
        });
        let proto = prop_oneof![
            Just(Protocol::Any),
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Icmp)
        ];
        (cidr, proto, any::<u16>(), any::<u16>()).prop_map(|(cidr, protocol, a, b)| {
            let ports = match protocol {
                Protocol::Any => PortRange::ALL,
                Protocol::Icmp => PortRange {
                    first: a.min(b) % 256,
                    last: (a.max(b) % 256).max(a.min(b) % 256),
                },
                _ => PortRange {
                    first: a.min(b),
                    last: a.max(b),
                },
            };
            Rule {
                cidr,
                protocol,
                ports,
            }
        })
    }

    /// What the list says directly: some rule covers the address, protocol and port.
    fn list_matches(rules: &[Rule], addr: Ipv4Addr, proto: u8, port: u16) -> bool {
        rules.iter().any(|r| {
            let pr = port_rule(r);
            r.cidr.contains(addr.into())
                && (pr.protocol == PROTO_ANY
                    || (pr.protocol == proto && port >= pr.port_lo && port <= pr.port_hi))
        })
    }

    proptest! {
        /// The longest-prefix entry of the compiled trie decides exactly like the rule list.
        #[test]
        fn longest_match_agrees_with_the_list(
            rules in proptest::collection::vec(arb_rule(), 0..12),
            addr in any::<u32>(),
            proto in prop_oneof![Just(PROTO_TCP), Just(PROTO_UDP), Just(PROTO_ICMP), Just(47u8)],
            port in any::<u16>(),
        ) {
            let addr = Ipv4Addr::from(addr & 0xff0f_ffff);
            let mut p = policy();
            p.allow = rules.clone();
            let Ok(c) = compile(&p) else { return Ok(()) };
            let longest = c
                .allow_v4
                .iter()
                .filter(|e| e.cidr.contains(addr.into()))
                .max_by_key(|e| e.cidr.prefix_len());
            let trie = longest.is_some_and(|e| e.rules.matches(proto, port));
            prop_assert_eq!(trie, list_matches(&rules, addr, proto, port));
        }
    }
}
