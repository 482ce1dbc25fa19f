//! The instance's network, over rtnetlink: loopback up; the interface's addresses, MTU and
//! default routes.
//!
//! [`NetPlan`] is the validated intent (pure, unit-tested); [`configure`] applies it. The
//! interface may not exist yet when init gets its spec (the agent moves the veth into the
//! sandbox's namespace, or the virtio-net device is still probing), so init waits for it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use hearth_proto::init::Network;
use rtnetlink::{
    AddressMessageBuilder, LinkUnspec, RouteMessageBuilder,
    packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage},
    packet_route::RouteNetlinkMessage,
    sys as netlink_sys,
};

use crate::spec::defaults;

/// Why the network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An address is not `ADDRESS/PREFIX`.
    #[error("{0:?} is not ADDRESS/PREFIX")]
    BadCidr(String),
    /// The netlink socket could not be opened.
    #[error("Cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    /// The interface did not appear in time.
    #[error("Interface {name} did not appear within {waited:?}")]
    NoInterface {
        /// Interface name.
        name: String,
        /// How long init waited.
        waited: Duration,
    },
    /// A netlink request failed.
    #[error("Cannot {what}")]
    Netlink {
        /// What init tried.
        what: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
}

/// Parses `ADDRESS/PREFIX`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), NetError> {
    let bad = || NetError::BadCidr(s.to_owned());
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// What to configure on the instance's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// Interface name.
    pub interface: String,
    /// Addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// IPv4 default gateway.
    pub gateway_v4: Option<Ipv4Addr>,
    /// IPv6 default gateway.
    pub gateway_v6: Option<Ipv6Addr>,
    /// MTU, when set.
    pub mtu: Option<u32>,
}

impl NetPlan {
    /// The plan for a spec's `Network` (validated by [`crate::spec::validate`]).
    pub fn from_spec(net: &Network) -> Result<Self, NetError> {
        let interface = if net.interface.is_empty() {
            defaults::INTERFACE.to_owned()
        } else {
            net.interface.clone()
        };
        let addresses = net
            .addresses
            .iter()
            .map(|a| parse_cidr(a))
            .collect::<Result<_, _>>()?;
        let gw = |s: &str| -> Result<Option<IpAddr>, NetError> {
            if s.is_empty() {
                Ok(None)
            } else {
                s.parse()
                    .map(Some)
                    .map_err(|_| NetError::BadCidr(s.to_owned()))
            }
        };
        let gateway_v4 = match gw(&net.gateway_v4)? {
            Some(IpAddr::V4(a)) => Some(a),
            None => None,
            Some(IpAddr::V6(_)) => return Err(NetError::BadCidr(net.gateway_v4.clone())),
        };
        let gateway_v6 = match gw(&net.gateway_v6)? {
            Some(IpAddr::V6(a)) => Some(a),
            None => None,
            Some(IpAddr::V4(_)) => return Err(NetError::BadCidr(net.gateway_v6.clone())),
        };
        Ok(Self {
            interface,
            addresses,
            gateway_v4,
            gateway_v6,
            mtu: (net.mtu != 0).then_some(net.mtu),
        })
    }

    /// The first address of the interface (for `/etc/hosts` and readiness).
    pub fn first_address(&self) -> Option<IpAddr> {
        self.addresses.first().map(|(a, _)| *a)
    }
}

/// A synchronous rtnetlink client for the few requests init makes.
///
/// Messages are built with rtnetlink's builders and sent on a plain netlink socket; only the
/// kernel's acknowledgements are read (by hand), so the binary carries no netlink response
/// parsers (most of rtnetlink's size).
struct Netlink {
    socket: netlink_sys::Socket,
    seq: u32,
}

const NLMSG_ERROR: u16 = 2;

impl Netlink {
    fn open() -> Result<Self, NetError> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .map_err(NetError::Socket)?;
        socket.bind_auto().map_err(NetError::Socket)?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(NetError::Socket)?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(
        &mut self,
        what: impl Into<String>,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetError> {
        let fail = |what: String, source: std::io::Error| NetError::Netlink { what, source };
        let what = what.into();
        self.seq = self.seq.wrapping_add(1);
        let mut nl = NetlinkMessage::from(msg);
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        nl.header.sequence_number = self.seq;
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|e| fail(what.clone(), e))?;
        loop {
            let mut reply: Vec<u8> = Vec::with_capacity(16 * 1024);
            let n = self
                .socket
                .recv(&mut reply, 0)
                .map_err(|e| fail(what.clone(), e))?;
            if let Some(code) = ack_code(&reply[..n.min(reply.len())], self.seq) {
                return match code {
                    0 => Ok(()),
                    c => Err(fail(what, std::io::Error::from_raw_os_error(-c))),
                };
            }
        }
    }
}

/// The error code of the acknowledgement for `seq` among the messages in `buf`, if any.
fn ack_code(mut buf: &[u8], seq: u32) -> Option<i32> {
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let msg_seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
        if len < 16 || len > buf.len() {
            return None;
        }
        if kind == NLMSG_ERROR && msg_seq == seq && len >= 20 {
            return Some(i32::from_ne_bytes(buf[16..20].try_into().ok()?));
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        buf = buf.get(next..)?;
    }
    None
}

fn link_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// Brings loopback up and, with a plan, configures the interface; waits up to `wait` for the
/// interface to appear.
pub async fn configure(plan: Option<&NetPlan>, wait: Duration) -> Result<(), NetError> {
    let mut nl = Netlink::open()?;
    let lo = link_index("lo").ok_or(NetError::NoInterface {
        name: "lo".into(),
        waited: Duration::ZERO,
    })?;
    nl.request(
        "bring lo up",
        RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(lo).up().build()),
        0,
    )?;
    let Some(plan) = plan else {
        return Ok(());
    };
    let name = &plan.interface;
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(1);
    let index = loop {
        if let Some(i) = link_index(name) {
            break i;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NetError::NoInterface {
                name: name.clone(),
                waited: wait,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    };
    if let Some(mtu) = plan.mtu {
        nl.request(
            format!("set the MTU of {name} to {mtu}"),
            RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).mtu(mtu).build()),
            0,
        )?;
    }
    for (addr, prefix) in &plan.addresses {
        let msg = match addr {
            IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(*a, *prefix)
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(*a, *prefix)
                .build(),
        };
        nl.request(
            format!("add {addr}/{prefix} to {name}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
    }
    nl.request(
        format!("bring {name} up"),
        RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).up().build()),
        0,
    )?;
    if let Some(gw) = plan.gateway_v4 {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        nl.request(
            format!("add the default route via {gw}"),
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
    }
    if let Some(gw) = plan.gateway_v6 {
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        nl.request(
            format!("add the default route via {gw}"),
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
    }
    Ok(())
}

/// `/etc/hosts` for the instance.
pub fn hosts_file(hostname: &str, plan: Option<&NetPlan>, extra: &[String]) -> String {
    let mut s = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    match plan.and_then(NetPlan::first_address) {
        Some(addr) => s.push_str(&format!("{addr}\t{hostname}\n")),
        None => s.push_str(&format!("127.0.1.1\t{hostname}\n")),
    }
    for line in extra {
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// `/etc/resolv.conf` for the instance, or `None` to keep the image's (no DNS servers given).
pub fn resolv_conf(net: &Network) -> Option<String> {
    if net.dns_servers.is_empty() {
        return None;
    }
    let mut s = String::new();
    for d in &net.dns_servers {
        s.push_str(&format!("nameserver {d}\n"));
    }
    if !net.dns_search.is_empty() {
        s.push_str(&format!("search {}\n", net.dns_search.join(" ")));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.2/24").unwrap(),
            ("10.0.0.2".parse().unwrap(), 24)
        );
        assert_eq!(parse_cidr("fd00::2/64").unwrap().1, 64);
        for bad in [
            "10.0.0.2",
            "10.0.0.2/33",
            "fd00::/129",
            "x/1",
            "10.0.0.2/-1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_and_files() {
        let net = Network {
            addresses: vec!["10.0.0.2/24".into()],
            gateway_v4: "10.0.0.1".into(),
            gateway_v6: "fd00::1".into(),
            dns_servers: vec!["10.0.0.1".into(), "1.1.1.1".into()],
            dns_search: vec!["svc.local".into()],
            mtu: 1400,
            hosts: vec!["10.0.0.9 db".into()],
            ..Default::default()
        };
        let plan = NetPlan::from_spec(&net).unwrap();
        assert_eq!(plan.interface, "eth0");
        assert_eq!(plan.mtu, Some(1400));
        assert_eq!(plan.gateway_v4, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(plan.gateway_v6.is_some());
        let hosts = hosts_file("web", Some(&plan), &net.hosts);
        assert!(hosts.contains("10.0.0.2\tweb\n") && hosts.ends_with("10.0.0.9 db\n"));
        assert_eq!(
            resolv_conf(&net).unwrap(),
            "nameserver 10.0.0.1\nnameserver 1.1.1.1\nsearch svc.local\n"
        );
        assert!(resolv_conf(&Network::default()).is_none());
        assert!(hosts_file("web", None, &[]).contains("127.0.1.1\tweb"));
    }

    #[test]
    fn acks_are_found_by_seq() {
        let mut buf = Vec::new();
        // A NEWLINK notification (ignored), then the error message for seq 7 (EEXIST).
        buf.extend_from_slice(&20u32.to_ne_bytes());
        buf.extend_from_slice(&16u16.to_ne_bytes());
        buf.extend_from_slice(&[0; 2]);
        buf.extend_from_slice(&7u32.to_ne_bytes());
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(&36u32.to_ne_bytes());
        buf.extend_from_slice(&2u16.to_ne_bytes());
        buf.extend_from_slice(&[0; 2]);
        buf.extend_from_slice(&7u32.to_ne_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&(-libc::EEXIST).to_ne_bytes());
        buf.extend_from_slice(&[0; 16]);
        assert_eq!(ack_code(&buf, 7), Some(-libc::EEXIST));
        assert_eq!(ack_code(&buf, 8), None);
        assert_eq!(ack_code(&buf[..10], 7), None);
        assert_eq!(ack_code(&[0xff; 40], 7), None);
    }
}
