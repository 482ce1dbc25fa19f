//! Types shared by Hearth's eBPF programs (`hearth-ebpf`) and the agent's loader.
//!
//! Everything here is `#[repr(C)]` plain data with a layout both sides agree on (explicit padding,
//! sizes checked at compile time); the `user` feature adds `aya::Pod` impls for the agent.
//!
//! # Layout
//!
//! - [`Direction`], [`PassReason`], [`DropReason`], [`Verdict`]: what a program decided and why;
//!   [`Verdict::slot`] is the index into the per-CPU counter map.
//! - [`Counter`]: one per-CPU counter slot.
//! - [`Config`]: the per-instance configuration (addresses, flags, HTTP ports, flow timeouts),
//!   double-buffered with [`ACTIVE`](MAP_ACTIVE) naming the live half.
//! - [`RuleSet`], [`PortRule`], [`LpmV4`], [`LpmV6`]: the allow/deny CIDR tries.
//! - [`FlowKey`], [`FlowValue`]: the flow table shared by both programs.
//! - [`Meta`]: what the loader records about an attachment (never read by the programs).
//! - map and program names, so the loader and the programs cannot disagree on them.
//!
//! # How a policy is switched without a gap
//!
//! The config array and both CIDR tries hold two halves. A policy *version* `v` lives in half
//! `v & 1`: the trie keys start with that half byte, and `CONFIG[v & 1]` is its config. The loader
//! writes the inactive half completely, then stores the new version in `ACTIVE[0]` (one 4-byte
//! write): each packet sees either the old policy or the new one, never a mix.

#![no_std]
#![deny(missing_docs)]

/// Name of the classifier on the instance interface's tc ingress hook (packets the instance sends).
pub const PROG_EGRESS: &str = "hearth_egress";
/// Name of the classifier on the instance interface's tc egress hook (packets going to the instance).
pub const PROG_INGRESS: &str = "hearth_ingress";

/// Per-CPU array of [`Counter`]s indexed by [`Verdict::slot`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Array of two [`Config`]s (the two halves).
pub const MAP_CONFIG: &str = "CONFIG";
/// Array of one `u32`: the live policy version (0: none yet, everything is dropped).
pub const MAP_ACTIVE: &str = "ACTIVE";
/// LPM trie `Key<LpmV4>` → [`RuleSet`]: allowed IPv4 destinations.
pub const MAP_ALLOW_V4: &str = "ALLOW_V4";
/// LPM trie `Key<LpmV6>` → [`RuleSet`]: allowed IPv6 destinations.
pub const MAP_ALLOW_V6: &str = "ALLOW_V6";
/// LPM trie `Key<LpmV4>` → [`RuleSet`]: denied IPv4 destinations (win over every allow).
pub const MAP_DENY_V4: &str = "DENY_V4";
/// LPM trie `Key<LpmV6>` → [`RuleSet`]: denied IPv6 destinations.
pub const MAP_DENY_V6: &str = "DENY_V6";
/// LPM trie `Key<[u8; 4]>` → `u32`: IPv4 ranges that are not "the internet".
pub const MAP_SPECIAL_V4: &str = "SPECIAL_V4";
/// LPM trie `Key<[u8; 16]>` → `u32`: IPv6 ranges that are not "the internet".
pub const MAP_SPECIAL_V6: &str = "SPECIAL_V6";
/// LRU hash [`FlowKey`] → [`FlowValue`]: flows either side was allowed to open.
pub const MAP_FLOWS: &str = "FLOWS";
/// Array of one [`Meta`].
pub const MAP_META: &str = "META";

/// Every map, in the order the loader pins them.
pub const MAPS: [&str; 11] = [
    MAP_META,
    MAP_COUNTERS,
    MAP_CONFIG,
    MAP_ACTIVE,
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
    MAP_DENY_V4,
    MAP_DENY_V6,
    MAP_SPECIAL_V4,
    MAP_SPECIAL_V6,
    MAP_FLOWS,
];

/// Entries of each allow/deny trie: both halves of [`MAX_CIDRS`] prefixes.
pub const LPM_MAX_ENTRIES: u32 = 2 * MAX_CIDRS;
/// Most distinct CIDRs one allow or deny list may hold per address family.
pub const MAX_CIDRS: u32 = 256;
/// Entries of each special-range trie.
pub const SPECIAL_MAX_ENTRIES: u32 = 64;
/// Default size of the flow table (the loader can choose another at load time).
pub const FLOW_TABLE_DEFAULT: u32 = 4096;
/// Most port rules one CIDR carries (its own plus those of the CIDRs containing it).
pub const MAX_RULES: usize = 16;
/// Most IPv6 addresses of one instance (link-local included).
pub const MAX_INSTANCE_V6: usize = 8;
/// Most HTTP ports of one instance.
pub const MAX_HTTP_PORTS: usize = 8;
/// Version of the layout of everything in this crate. An agent refuses to adopt pinned state of
/// another layout.
pub const LAYOUT_VERSION: u32 = 1;

/// Which way a packet goes, seen from the instance.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Sent by the instance (the interface's tc ingress hook).
    Egress = 0,
    /// Going to the instance (the interface's tc egress hook).
    Ingress = 1,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::Egress, Direction::Ingress];

    /// A stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

/// Why a packet was let through.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PassReason {
    /// ARP for the instance's own IPv4 address.
    Arp = 0,
    /// Neighbour discovery for the instance's own IPv6 addresses.
    Ndp = 1,
    /// Part of a flow the other side was allowed to open: a reply to the instance's allowed
    /// egress, or the instance's answer to the ingress proxy.
    Reply = 2,
    /// An ICMP error about a flow the instance opened (e.g. "packet too big").
    Related = 3,
    /// An allowed CIDR with a matching protocol and port.
    Rule = 4,
    /// Internet access is on and the destination is not a special-purpose range.
    Internet = 5,
    /// DNS (port 53) to the node's resolver.
    Dns = 6,
    /// ICMP echo to the node's gateway.
    Gateway = 7,
    /// TCP from the ingress proxy to one of the instance's HTTP ports.
    Http = 8,
}

impl PassReason {
    /// Number of reasons.
    pub const COUNT: usize = 9;
    /// Every reason, in index order.
    pub const ALL: [PassReason; Self::COUNT] = [
        PassReason::Arp,
        PassReason::Ndp,
        PassReason::Reply,
        PassReason::Related,
        PassReason::Rule,
        PassReason::Internet,
        PassReason::Dns,
        PassReason::Gateway,
        PassReason::Http,
    ];

    /// A stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            PassReason::Arp => "arp",
            PassReason::Ndp => "ndp",
            PassReason::Reply => "reply",
            PassReason::Related => "related",
            PassReason::Rule => "rule",
            PassReason::Internet => "internet",
            PassReason::Dns => "dns",
            PassReason::Gateway => "gateway",
            PassReason::Http => "http",
        }
    }
}

/// Why a packet was dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// No policy has been written yet (fail closed).
    NoPolicy = 0,
    /// A header is truncated or inconsistent.
    Malformed = 1,
    /// An ethertype other than IPv4, IPv6 and ARP.
    Ethertype = 2,
    /// A VLAN-tagged frame.
    Vlan = 3,
    /// Sent by the instance with a source MAC that is not its own.
    SpoofedMac = 4,
    /// Sent by the instance with a source IP that is not its own.
    SpoofedIp = 5,
    /// ARP that is not about the instance's own IPv4 address.
    Arp = 6,
    /// Neighbour discovery that is not about the instance's own addresses (or a router
    /// advertisement, a redirect, a hop limit other than 255).
    Ndp = 7,
    /// An IP fragment (its ports cannot be matched).
    Fragment = 8,
    /// IPv4 options or IPv6 extension headers.
    IpOptions = 9,
    /// A denied CIDR matched.
    Denied = 10,
    /// Nothing in the egress policy allows it.
    NotAllowed = 11,
    /// Addressed to a MAC or IP that is not the instance's.
    NotForInstance = 12,
    /// TCP to an HTTP port, but not from the ingress proxy.
    NotFromProxy = 13,
    /// TCP from the ingress proxy, but not to an HTTP port.
    NotHttpPort = 14,
    /// Neither HTTP from the proxy nor part of a flow the instance opened.
    Unsolicited = 15,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 16;
    /// Every reason, in index order.
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::NoPolicy,
        DropReason::Malformed,
        DropReason::Ethertype,
        DropReason::Vlan,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::Arp,
        DropReason::Ndp,
        DropReason::Fragment,
        DropReason::IpOptions,
        DropReason::Denied,
        DropReason::NotAllowed,
        DropReason::NotForInstance,
        DropReason::NotFromProxy,
        DropReason::NotHttpPort,
        DropReason::Unsolicited,
    ];

    /// A stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoPolicy => "no_policy",
            DropReason::Malformed => "malformed",
            DropReason::Ethertype => "ethertype",
            DropReason::Vlan => "vlan",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::Arp => "arp",
            DropReason::Ndp => "ndp",
            DropReason::Fragment => "fragment",
            DropReason::IpOptions => "ip_options",
            DropReason::Denied => "denied",
            DropReason::NotAllowed => "not_allowed",
            DropReason::NotForInstance => "not_for_instance",
            DropReason::NotFromProxy => "not_from_proxy",
            DropReason::NotHttpPort => "not_http_port",
            DropReason::Unsolicited => "unsolicited",
        }
    }
}

/// What a program decided about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Let through.
    Pass(PassReason),
    /// Dropped.
    Drop(DropReason),
}

/// Counter slots per direction: passes in `0..16`, drops in `16..32`.
pub const SLOTS_PER_DIRECTION: u32 = 32;
/// Size of the counter map.
pub const COUNTER_SLOTS: u32 = 2 * SLOTS_PER_DIRECTION;
const DROP_BASE: u32 = SLOTS_PER_DIRECTION / 2;
const _: () = assert!(PassReason::COUNT as u32 <= DROP_BASE);
const _: () = assert!(DropReason::COUNT as u32 <= SLOTS_PER_DIRECTION - DROP_BASE);

impl Verdict {
    /// The counter slot for this verdict in `direction`.
    #[inline(always)]
    pub const fn slot(self, direction: Direction) -> u32 {
        let base = direction as u32 * SLOTS_PER_DIRECTION;
        match self {
            Verdict::Pass(r) => base + r as u32,
            Verdict::Drop(r) => base + DROP_BASE + r as u32,
        }
    }

    /// Whether the packet was let through.
    pub const fn is_pass(self) -> bool {
        matches!(self, Verdict::Pass(_))
    }

    /// A stable name for metrics labels (the reason's name).
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass(r) => r.name(),
            Verdict::Drop(r) => r.name(),
        }
    }
}

/// Packets and bytes seen for one [`Verdict`] on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (whole frames, link-layer header included; a GSO packet counts once with
    /// all its bytes).
    pub bytes: u64,
}

impl core::ops::AddAssign for Counter {
    fn add_assign(&mut self, other: Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

/// [`Config::flags`]: internet access is on.
pub const FLAG_INTERNET: u32 = 1 << 0;
/// [`Config::flags`]: DNS to the node's resolver is allowed.
pub const FLAG_DNS: u32 = 1 << 1;
/// [`Config::flags`]: ICMP echo to the node's gateway is allowed.
pub const FLAG_GATEWAY_PING: u32 = 1 << 2;
/// [`Config::flags`]: the instance has an IPv4 address.
pub const FLAG_HAS_V4: u32 = 1 << 3;
/// [`Config::flags`]: [`Config::gateway_v4`] is set.
pub const FLAG_GATEWAY_V4: u32 = 1 << 4;
/// [`Config::flags`]: [`Config::dns_v4`] is set.
pub const FLAG_DNS_V4: u32 = 1 << 5;
/// [`Config::flags`]: [`Config::proxy_v4`] is set.
pub const FLAG_PROXY_V4: u32 = 1 << 6;
/// [`Config::flags`]: [`Config::gateway_v6`] is set.
pub const FLAG_GATEWAY_V6: u32 = 1 << 7;
/// [`Config::flags`]: [`Config::dns_v6`] is set.
pub const FLAG_DNS_V6: u32 = 1 << 8;
/// [`Config::flags`]: [`Config::proxy_v6`] is set.
pub const FLAG_PROXY_V6: u32 = 1 << 9;

/// One instance's configuration. Addresses are kept in network byte order (an IPv4 address is
/// the `u32` whose in-memory bytes are the address's octets); ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `FLAG_*` bits.
    pub flags: u32,
    /// The instance's MAC address.
    pub instance_mac: [u8; 6],
    /// Padding (zero).
    pub _pad0: [u8; 2],
    /// The instance's IPv4 address (if [`FLAG_HAS_V4`]).
    pub instance_v4: u32,
    /// The node's gateway (if [`FLAG_GATEWAY_V4`]).
    pub gateway_v4: u32,
    /// The node's DNS resolver (if [`FLAG_DNS_V4`]).
    pub dns_v4: u32,
    /// The ingress proxy's address (if [`FLAG_PROXY_V4`]).
    pub proxy_v4: u32,
    /// The instance's IPv6 addresses; the first [`Config::n_instance_v6`] are valid.
    pub instance_v6: [[u32; 4]; MAX_INSTANCE_V6],
    /// Number of valid [`Config::instance_v6`] entries.
    pub n_instance_v6: u32,
    /// The node's IPv6 gateway (if [`FLAG_GATEWAY_V6`]).
    pub gateway_v6: [u32; 4],
    /// The node's IPv6 DNS resolver (if [`FLAG_DNS_V6`]).
    pub dns_v6: [u32; 4],
    /// The ingress proxy's IPv6 address (if [`FLAG_PROXY_V6`]).
    pub proxy_v6: [u32; 4],
    /// The instance's HTTP ports; the first [`Config::n_http_ports`] are valid.
    pub http_ports: [u16; MAX_HTTP_PORTS],
    /// Number of valid [`Config::http_ports`] entries.
    pub n_http_ports: u32,
    /// Padding (zero).
    pub _pad1: u32,
    /// A TCP flow idle this long (nanoseconds) is forgotten.
    pub tcp_timeout_ns: u64,
    /// A UDP or ICMP flow idle this long (nanoseconds) is forgotten.
    pub other_timeout_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 248);

/// A protocol that matches every IP protocol, in [`PortRule::protocol`].
pub const PROTO_ANY: u8 = 0;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// One protocol + port range. For ICMP the "port" is the ICMP type; for [`PROTO_ANY`] the range
/// is ignored.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRule {
    /// First port of the range.
    pub port_lo: u16,
    /// Last port of the range (inclusive).
    pub port_hi: u16,
    /// IP protocol number, or [`PROTO_ANY`].
    pub protocol: u8,
    /// Padding (zero).
    pub _pad: [u8; 3],
}

/// The rules attached to one CIDR in an allow or deny trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    /// Number of valid [`RuleSet::rules`].
    pub count: u32,
    /// The rules; the first [`RuleSet::count`] are valid.
    pub rules: [PortRule; MAX_RULES],
}

impl RuleSet {
    /// Whether a packet of `protocol` to `port` matches one of the rules.
    #[inline(always)]
    pub fn matches(&self, protocol: u8, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_RULES {
            if i as u32 >= self.count {
                return false;
            }
            let r = &self.rules[i];
            if r.protocol == PROTO_ANY
                || (r.protocol == protocol && port >= r.port_lo && port <= r.port_hi)
            {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Data of an IPv4 allow/deny trie key: the half byte, then the address.
pub type LpmV4 = [u8; 5];
/// Data of an IPv6 allow/deny trie key: the half byte, then the address.
pub type LpmV6 = [u8; 17];
/// Bits of the half byte in front of an allow/deny trie key.
pub const HALF_BITS: u32 = 8;

/// [`FlowValue::origin`]: the instance opened the flow (egress).
pub const ORIGIN_EGRESS: u8 = 0;
/// [`FlowValue::origin`]: the ingress proxy opened the flow.
pub const ORIGIN_INGRESS: u8 = 1;

/// A flow, always written from the instance's side: its address and port, the remote's, the IP
/// protocol. IPv4 addresses use the first word. For ICMP echo the instance port is the echo
/// identifier and the remote port is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The instance's address.
    pub instance_addr: [u32; 4],
    /// The remote address.
    pub remote_addr: [u32; 4],
    /// The instance's port (host byte order).
    pub instance_port: u16,
    /// The remote port (host byte order).
    pub remote_port: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// 4 or 6.
    pub family: u8,
    /// Padding (zero).
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// What the flow table knows about a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_ns` when a packet of the flow was last seen.
    pub last_seen_ns: u64,
    /// The policy version under which the flow was last found allowed.
    pub policy_version: u32,
    /// The "port" the egress policy matched (remote port, or ICMP type).
    pub policy_port: u16,
    /// [`ORIGIN_EGRESS`] or [`ORIGIN_INGRESS`].
    pub origin: u8,
    /// The [`PassReason`] of the packet that opened it.
    pub reason: u8,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 16);

/// What the loader records about an attachment, for adoption after a restart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// [`LAYOUT_VERSION`] of the loader that created the maps.
    pub layout_version: u32,
    /// The interface index the programs were attached to.
    pub ifindex: u32,
    /// The interface name (NUL-padded).
    pub ifname: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (for every impl below): each type is `#[repr(C)]`, `Copy`, made only of integers
    // and integer arrays with explicit padding fields (so no implicit padding), and valid for
    // any bit pattern, which is what `aya::Pod` requires.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PortRule {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RuleSet {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Meta {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_in_range() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for d in Direction::ALL {
            for r in PassReason::ALL {
                let s = Verdict::Pass(r).slot(d) as usize;
                assert!(!seen[s]);
                seen[s] = true;
            }
            for r in DropReason::ALL {
                let s = Verdict::Drop(r).slot(d) as usize;
                assert!(!seen[s]);
                seen[s] = true;
            }
        }
        for (i, r) in PassReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn rule_set_matching() {
        let mut set = RuleSet::default();
        assert!(!set.matches(PROTO_TCP, 80));
        set.rules[0] = PortRule {
            port_lo: 80,
            port_hi: 443,
            protocol: PROTO_TCP,
            _pad: [0; 3],
        };
        set.count = 1;
        assert!(set.matches(PROTO_TCP, 80));
        assert!(set.matches(PROTO_TCP, 443));
        assert!(!set.matches(PROTO_TCP, 444));
        assert!(!set.matches(PROTO_UDP, 80));
        set.rules[1].protocol = PROTO_ANY;
        set.count = 2;
        assert!(set.matches(PROTO_UDP, 9));
    }
}
