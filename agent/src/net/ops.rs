//! The privileged operations node networking needs, as a trait: [`RtnlOps`](super::RtnlOps)
//! does them for real (netlink, `/dev/net/tun`, `nft`, sysctl); unit tests use a fake.

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;

use super::NetError;
use super::alloc::MacAddr;

/// A network namespace to put an interface in.
#[derive(Debug, Clone, Copy)]
pub enum NetnsRef<'a> {
    /// The namespace of the process with this pid.
    Pid(u32),
    /// An open `/proc/<pid>/ns/net` (or bind-mounted namespace) file.
    Fd(BorrowedFd<'a>),
}

/// What the module needs to know about an existing link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND` ("bridge", "veth", "tun", ...), if any.
    pub kind: Option<String>,
    /// Index of the bridge the link is a port of.
    pub controller: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// `IFLA_IFALIAS`: Hearth stores the instance id there.
    pub alias: Option<String>,
    /// Hardware address.
    pub mac: Option<MacAddr>,
}

/// A veth pair to create: the host end on the node bridge, the peer created directly inside the
/// instance's namespace under its final name.
#[derive(Debug, Clone)]
pub struct VethRequest<'a> {
    /// Host end's name.
    pub host_name: &'a str,
    /// Host end's alias (the instance id).
    pub alias: &'a str,
    /// Bridge to attach the host end to.
    pub controller: u32,
    /// MTU of both ends.
    pub mtu: u32,
    /// Peer's name inside the namespace.
    pub peer_name: &'a str,
    /// Peer's MAC.
    pub peer_mac: MacAddr,
    /// The namespace the peer is created in.
    pub peer_netns: NetnsRef<'a>,
}

/// Settings applied to an existing link; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct LinkSettings<'a> {
    /// Bridge to attach to.
    pub controller: Option<u32>,
    /// Alias.
    pub alias: Option<&'a str>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Bring the link up.
    pub up: bool,
}

/// Privileged network operations. Every method acts on the network namespace the
/// implementation was created in.
pub trait NetOps: Send + Sync {
    /// Every link.
    fn links(&self) -> impl Future<Output = Result<Vec<LinkInfo>, NetError>> + Send;

    /// The link named `name`, if there is one.
    fn link(&self, name: &str) -> impl Future<Output = Result<Option<LinkInfo>, NetError>> + Send;

    /// Creates a bridge (down, no ports).
    fn add_bridge(
        &self,
        name: &str,
        mac: MacAddr,
        mtu: u32,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Adds IPv4 addresses to a link; addresses it has already are left alone.
    fn add_addresses(
        &self,
        index: u32,
        addrs: &[(Ipv4Addr, u8)],
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Creates a veth pair as described.
    fn add_veth(&self, req: &VethRequest<'_>) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Creates a persistent TAP device (`IFF_TAP | IFF_NO_PI`, single queue).
    fn add_tap(&self, name: &str) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Changes an existing link.
    fn set_link(
        &self,
        index: u32,
        settings: &LinkSettings<'_>,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Deletes a link; a link that is already gone is not an error.
    fn del_link(&self, index: u32) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Runs an nftables script as one transaction.
    fn nft(&self, script: &str) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Sets `net.ipv4.ip_forward` to 1.
    fn enable_ip_forward(&self) -> impl Future<Output = Result<(), NetError>> + Send;
}
