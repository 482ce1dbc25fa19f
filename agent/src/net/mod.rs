//! Node networking: the node bridge and subnet, one address per instance, the instance's
//! host-side interface (a veth pair for the sandbox, a TAP device for the microVM), egress NAT
//! and re-adoption after an agent restart. `docs/networking.md` describes the addressing plan.
//!
//! # Layout
//!
//! - [`config`]: [`NetConfig`] (what the operator writes, with the defaults) and [`NodePlan`]
//!   (the resolved addresses and names).
//! - [`alloc`]: [`AddressPool`] (instance id → address, with a storable [`PoolState`]) and
//!   [`InstanceNet`] (everything derived from an instance's address: interface name, MAC, the
//!   network section of hearth-init's spec).
//! - [`nat`]: the nftables scripts for the agent's own NAT table.
//! - [`ops`]: [`NetOps`], the privileged operations as a trait, so that [`Network`]'s logic is
//!   unit-tested with a fake.
//! - [`rtnl`]: [`RtnlOps`], the real [`NetOps`] (rtnetlink, `nft`, sysctl).
//! - `tun`: persistent TAP creation through `/dev/net/tun` (the module's only `unsafe`).
//! - [`inside`]: configuring the instance's end of a veth from the host (sandbox, tests).
//!
//! # Use (for the agent)
//!
//! ```no_run
//! # async fn f(netns: std::os::fd::BorrowedFd<'_>) -> Result<(), hearth_agent::net::NetError> {
//! use hearth_agent::net::{AddressPool, NetConfig, NetnsRef, Network};
//! let plan = NetConfig::default().plan()?;
//! let net = Network::connect(plan.clone())?; // inside a tokio runtime
//! net.setup_node().await?; // bridge + addresses + NAT table; idempotent
//! let mut pool = AddressPool::new(&plan); // or AddressPool::from_state(&plan, &stored)
//! let inst = pool.allocate("my-instance")?; // store pool.state() with the instance
//! net.attach_veth(&inst, NetnsRef::Fd(netns)).await?; // sandbox; attach_tap(&inst) for a VM
//! net.set_internet(&inst, true).await?; // egress NAT per the instance's policy
//! // ... eBPF attaches to inst.host_ifname; hearth-init gets inst.init_network() ...
//! net.detach(&inst).await?;
//! pool.release(&inst.id);
//! # Ok(()) }
//! ```

pub mod alloc;
pub mod config;
pub mod inside;
pub mod nat;
pub mod ops;
pub mod rtnl;
mod tun;

use std::sync::atomic::{AtomicBool, Ordering};

pub use alloc::{AddressPool, INSTANCE_IFNAME, InstanceNet, MacAddr, PoolState};
pub use config::{Ipv4Cidr, NetConfig, NodePlan};
pub use ops::{LinkInfo, LinkSettings, NetOps, NetnsRef, VethRequest};
pub use rtnl::RtnlOps;

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The network config is invalid.
    #[error("Invalid network config: {0}")]
    Config(String),
    /// Stored or discovered address state does not fit the node plan.
    #[error("Inconsistent address state: {0}")]
    State(String),
    /// Every instance address of the subnet is taken.
    #[error("The node subnet {subnet} has no free instance address")]
    Exhausted {
        /// The subnet.
        subnet: String,
    },
    /// The netlink socket could not be opened.
    #[error("Opening a netlink socket failed")]
    Connect(#[source] std::io::Error),
    /// The kernel refused a netlink request.
    #[error("Netlink request failed: {what}")]
    Netlink {
        /// What was asked.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A TAP device could not be created.
    #[error("Creating TAP device {name} failed")]
    Tap {
        /// The device name.
        name: String,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
    /// `nft` could not be run.
    #[error("Running nft failed")]
    Nft(#[source] std::io::Error),
    /// `nft` refused a script.
    #[error("nft refused the NAT rules ({status}): {stderr}\nscript:\n{script}")]
    NftRejected {
        /// nft's exit status.
        status: String,
        /// What nft said.
        stderr: String,
        /// The script.
        script: String,
    },
    /// `net.ipv4.ip_forward` could not be set.
    #[error("Enabling net.ipv4.ip_forward failed")]
    Forwarding(#[source] std::io::Error),
    /// A network namespace could not be opened or entered.
    #[error("Entering the instance's network namespace failed")]
    Netns(#[source] std::io::Error),
    /// A link that was just created or looked up is gone.
    #[error("Link {0} disappeared while it was being set up")]
    Vanished(String),
    /// A link has the name Hearth wants but is something else.
    #[error("Link {name} exists but is a {kind} link, not a {want}")]
    Conflict {
        /// The link's name.
        name: String,
        /// What it is.
        kind: String,
        /// What Hearth expected.
        want: &'static str,
    },
    /// The node bridge is missing ([`Network::setup_node`] was not run, or it was deleted).
    #[error("The node bridge {0} does not exist")]
    NoBridge(String),
}

/// The kind of an instance's host-side interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterfaceKind {
    /// Host end of a veth pair (sandbox).
    Veth,
    /// TAP device (microVM).
    Tap,
}

impl InterfaceKind {
    fn from_link_kind(kind: Option<&str>) -> Option<InterfaceKind> {
        match kind {
            Some("veth") => Some(InterfaceKind::Veth),
            Some("tun") => Some(InterfaceKind::Tap),
            _ => None,
        }
    }
}

/// An instance interface found on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The interface's name.
    pub ifname: String,
    /// Its kind.
    pub kind: InterfaceKind,
    /// The address its name encodes.
    pub address: std::net::Ipv4Addr,
    /// The instance id from the interface's alias (`None` if the agent stopped between creating
    /// the interface and labelling it).
    pub id: Option<String>,
}

/// What [`Network::adopt`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// The interface exists and is set up as the plan says (repaired where it was not).
    Adopted(InterfaceKind),
    /// There is no interface: the instance has to be attached again.
    Missing,
}

/// The node's network: bridge, instance interfaces, NAT. Cheap to share behind an `Arc`.
pub struct Network<O: NetOps = RtnlOps> {
    plan: NodePlan,
    ops: O,
    forwarding: AtomicBool,
}

impl Network<RtnlOps> {
    /// The node network on the real kernel, in the calling thread's network namespace (needs a
    /// tokio runtime).
    pub fn connect(plan: NodePlan) -> Result<Network<RtnlOps>, NetError> {
        Ok(Network::new(plan, RtnlOps::connect()?))
    }
}

impl<O: NetOps> Network<O> {
    /// The node network with the given operations.
    pub fn new(plan: NodePlan, ops: O) -> Network<O> {
        Network {
            plan,
            ops,
            forwarding: AtomicBool::new(false),
        }
    }

    /// The node plan.
    pub fn plan(&self) -> &NodePlan {
        &self.plan
    }

    /// The operations (for tests).
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Creates the bridge (or adopts the existing one), gives it the gateway and ingress
    /// addresses, brings it up, and installs the NAT table (members of its set are kept).
    /// Idempotent; run at every agent start. Does not enable forwarding.
    pub async fn setup_node(&self) -> Result<(), NetError> {
        let p = &self.plan;
        let bridge = match self.ops.link(&p.bridge).await? {
            Some(l) if l.kind.as_deref() == Some("bridge") => l,
            Some(l) => {
                return Err(NetError::Conflict {
                    name: l.name,
                    kind: l.kind.unwrap_or_else(|| "plain".into()),
                    want: "bridge",
                });
            }
            None => {
                tracing::info!(bridge = %p.bridge, "creating the node bridge");
                self.ops.add_bridge(&p.bridge, p.bridge_mac, p.mtu).await?;
                self.ops
                    .link(&p.bridge)
                    .await?
                    .ok_or_else(|| NetError::Vanished(p.bridge.clone()))?
            }
        };
        let len = p.subnet.prefix_len();
        self.ops
            .add_addresses(bridge.index, &[(p.gateway, len), (p.ingress_address, len)])
            .await?;
        self.ops
            .set_link(
                bridge.index,
                &LinkSettings {
                    mtu: Some(p.mtu),
                    up: true,
                    ..Default::default()
                },
            )
            .await?;
        self.ops.nft(&nat::node_script(p)).await
    }

    /// Deletes the bridge and the NAT table (for uninstall and tests). Instance interfaces
    /// should be detached first; `net.ipv4.ip_forward` is left as it is.
    pub async fn teardown_node(&self) -> Result<(), NetError> {
        if let Some(bridge) = self.ops.link(&self.plan.bridge).await? {
            self.ops.del_link(bridge.index).await?;
        }
        self.ops.nft(&nat::remove_table_script(&self.plan)).await
    }

    async fn bridge_index(&self) -> Result<u32, NetError> {
        match self.ops.link(&self.plan.bridge).await? {
            Some(l) if l.kind.as_deref() == Some("bridge") => Ok(l.index),
            _ => Err(NetError::NoBridge(self.plan.bridge.clone())),
        }
    }

    /// Deletes a leftover link of the instance's name (from a previous incarnation that was not
    /// detached): the name encodes an address the pool has given to this instance now.
    async fn remove_stale(&self, inst: &InstanceNet) -> Result<(), NetError> {
        if let Some(stale) = self.ops.link(&inst.host_ifname).await? {
            tracing::warn!(
                ifname = %stale.name,
                old_id = ?stale.alias,
                id = %inst.id,
                "deleting a stale instance interface"
            );
            self.ops.del_link(stale.index).await?;
        }
        Ok(())
    }

    /// Sandbox: creates a veth pair whose host end (`inst.host_ifname`) is up on the bridge and
    /// whose other end is created inside `netns` as `eth0` with the instance's MAC (down and
    /// unaddressed: hearth-init, or [`inside::configure_inside`], configures it).
    pub async fn attach_veth(
        &self,
        inst: &InstanceNet,
        netns: NetnsRef<'_>,
    ) -> Result<(), NetError> {
        let bridge = self.bridge_index().await?;
        self.remove_stale(inst).await?;
        self.ops
            .add_veth(&VethRequest {
                host_name: &inst.host_ifname,
                alias: &inst.id,
                controller: bridge,
                mtu: inst.mtu,
                peer_name: INSTANCE_IFNAME,
                peer_mac: inst.mac,
                peer_netns: netns,
            })
            .await?;
        tracing::debug!(id = %inst.id, ifname = %inst.host_ifname, "veth attached");
        Ok(())
    }

    /// MicroVM: creates the persistent TAP device `inst.host_ifname`, up on the bridge, for
    /// hearth-vmm to open by name (give the guest `inst.mac`).
    pub async fn attach_tap(&self, inst: &InstanceNet) -> Result<(), NetError> {
        let bridge = self.bridge_index().await?;
        self.remove_stale(inst).await?;
        self.ops.add_tap(&inst.host_ifname).await?;
        let tap = self
            .ops
            .link(&inst.host_ifname)
            .await?
            .ok_or_else(|| NetError::Vanished(inst.host_ifname.clone()))?;
        self.ops
            .set_link(
                tap.index,
                &LinkSettings {
                    controller: Some(bridge),
                    alias: Some(&inst.id),
                    mtu: Some(inst.mtu),
                    up: true,
                },
            )
            .await?;
        tracing::debug!(id = %inst.id, ifname = %inst.host_ifname, "TAP attached");
        Ok(())
    }

    /// Turns egress NAT (masquerade toward anything not on the bridge) on or off for the
    /// instance. The first time it is turned on, sets `net.ipv4.ip_forward` to 1.
    pub async fn set_internet(&self, inst: &InstanceNet, allowed: bool) -> Result<(), NetError> {
        if allowed {
            if !self.forwarding.load(Ordering::Acquire) {
                self.ops.enable_ip_forward().await?;
                self.forwarding.store(true, Ordering::Release);
            }
            self.ops
                .nft(&nat::allow_script(&self.plan, inst.address))
                .await
        } else {
            self.ops
                .nft(&nat::deny_script(&self.plan, inst.address))
                .await
        }
    }

    /// After an agent restart: checks that the instance's interface exists, puts it back on the
    /// bridge, up and labelled if it is not, and sets NAT as `internet` says.
    pub async fn adopt(&self, inst: &InstanceNet, internet: bool) -> Result<Adoption, NetError> {
        let Some(link) = self.ops.link(&inst.host_ifname).await? else {
            return Ok(Adoption::Missing);
        };
        let kind = InterfaceKind::from_link_kind(link.kind.as_deref()).ok_or_else(|| {
            NetError::Conflict {
                name: link.name.clone(),
                kind: link.kind.clone().unwrap_or_else(|| "plain".into()),
                want: "veth or tun",
            }
        })?;
        let bridge = self.bridge_index().await?;
        if link.controller != Some(bridge) || !link.up || link.alias.as_deref() != Some(&inst.id) {
            tracing::warn!(ifname = %link.name, id = %inst.id, "repairing an instance interface");
            self.ops
                .set_link(
                    link.index,
                    &LinkSettings {
                        controller: Some(bridge),
                        alias: Some(&inst.id),
                        mtu: None,
                        up: true,
                    },
                )
                .await?;
        }
        self.set_internet(inst, internet).await?;
        Ok(Adoption::Adopted(kind))
    }

    /// A warm-pool member's interface passes to an instance (the member's address became the
    /// instance's): labels it with the instance id (NAT is the caller's, [`Self::set_internet`]).
    pub async fn hand_over(&self, inst: &InstanceNet) -> Result<(), NetError> {
        let link = self
            .ops
            .link(&inst.host_ifname)
            .await?
            .ok_or_else(|| NetError::Vanished(inst.host_ifname.clone()))?;
        let bridge = self.bridge_index().await?;
        self.ops
            .set_link(
                link.index,
                &LinkSettings {
                    controller: Some(bridge),
                    alias: Some(&inst.id),
                    mtu: None,
                    up: true,
                },
            )
            .await
    }

    /// The instance interfaces on the node (names `<prefix><index>` of kind veth or tun), with
    /// the id each is labelled with: rebuilds a lost [`PoolState`] and finds orphans.
    pub async fn discover(&self) -> Result<Vec<Discovered>, NetError> {
        let mut found: Vec<Discovered> = self
            .ops
            .links()
            .await?
            .into_iter()
            .filter_map(|l| {
                let index = alloc::index_from_ifname(&self.plan, &l.name)?;
                let kind = InterfaceKind::from_link_kind(l.kind.as_deref())?;
                Some(Discovered {
                    address: self.plan.subnet.nth(index)?,
                    ifname: l.name,
                    kind,
                    id: l.alias.filter(|a| !a.is_empty()),
                })
            })
            .collect();
        found.sort_by_key(|d| d.address);
        Ok(found)
    }

    /// Removes the instance's NAT membership and deletes its host-side interface (which takes
    /// the veth's other end with it). Idempotent.
    pub async fn detach(&self, inst: &InstanceNet) -> Result<(), NetError> {
        if let Some(link) = self.ops.link(&inst.host_ifname).await? {
            self.ops.del_link(link.index).await?;
        }
        self.set_internet(inst, false).await?;
        tracing::debug!(id = %inst.id, ifname = %inst.host_ifname, "detached");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
