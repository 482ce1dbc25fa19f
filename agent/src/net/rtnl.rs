//! [`RtnlOps`]: the real [`NetOps`]: rtnetlink for links and addresses, `/dev/net/tun` for TAP
//! devices, `nft` for the NAT table, `/proc/sys` for forwarding.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::Stdio;

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo as LinkInfoNla, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth};
use tokio::io::AsyncWriteExt;

use super::NetError;
use super::alloc::MacAddr;
use super::ops::{LinkInfo, LinkSettings, NetOps, NetnsRef, VethRequest};
use super::tun;

/// The real privileged operations, acting on the network namespace of the thread that called
/// [`RtnlOps::connect`] (the netlink socket is bound to it) and, for `nft` and sysctl, of the
/// thread that runs each call: the agent's own namespace in production.
#[derive(Clone)]
pub struct RtnlOps {
    handle: Handle,
}

impl RtnlOps {
    /// Opens a netlink connection and spawns its task on the current tokio runtime.
    pub fn connect() -> Result<RtnlOps, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
        tokio::spawn(conn);
        Ok(RtnlOps { handle })
    }

    /// The rtnetlink handle (for code that needs a request this type does not offer).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// The errno of a netlink error answer.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => Some(-m.raw_code()),
        _ => None,
    }
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

pub(crate) fn link_info(m: LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: m.header.index,
        name: String::new(),
        kind: None,
        controller: None,
        up: m.header.flags.contains(LinkFlags::Up),
        alias: None,
        mac: None,
    };
    for attr in m.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n,
            LinkAttribute::IfAlias(a) => info.alias = Some(a),
            LinkAttribute::Controller(c) => info.controller = Some(c),
            LinkAttribute::Address(a) => {
                info.mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(MacAddr)
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfoNla::Kind(k) = i {
                        info.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    info
}

pub(crate) async fn get_link(handle: &Handle, name: &str) -> Result<Option<LinkInfo>, NetError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(link_info(m))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink(format!("look up link {name}"))(e)),
    }
}

pub(crate) async fn add_addresses(
    handle: &Handle,
    index: u32,
    addrs: &[(Ipv4Addr, u8)],
) -> Result<(), NetError> {
    for &(addr, len) in addrs {
        match handle
            .address()
            .add(index, IpAddr::V4(addr), len)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(netlink(format!("add {addr}/{len} to link {index}"))(e)),
        }
    }
    Ok(())
}

impl NetOps for RtnlOps {
    async fn links(&self) -> Result<Vec<LinkInfo>, NetError> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(link_info)
            .try_collect()
            .await
            .map_err(netlink("list links"))
    }

    async fn link(&self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        get_link(&self.handle, name).await
    }

    async fn add_bridge(&self, name: &str, mac: MacAddr, mtu: u32) -> Result<(), NetError> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name)
            .address(mac.0.to_vec())
            .mtu(mtu)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(netlink(format!("create bridge {name}")))
    }

    async fn add_addresses(&self, index: u32, addrs: &[(Ipv4Addr, u8)]) -> Result<(), NetError> {
        add_addresses(&self.handle, index, addrs).await
    }

    async fn add_veth(&self, req: &VethRequest<'_>) -> Result<(), NetError> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(req.peer_name)
            .address(req.peer_mac.0.to_vec())
            .mtu(req.mtu);
        let peer = match req.peer_netns {
            NetnsRef::Pid(pid) => peer.setns_by_pid(pid),
            NetnsRef::Fd(fd) => peer.setns_by_fd(fd.as_raw_fd()),
        }
        .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(req.host_name)
            .mtu(req.mtu)
            .controller(req.controller)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(netlink(format!("create veth {}", req.host_name)))?;
        // The kernel ignores IFLA_IFALIAS on creation, so the alias is set afterwards.
        let link = get_link(&self.handle, req.host_name)
            .await?
            .ok_or_else(|| NetError::Vanished(req.host_name.to_owned()))?;
        self.set_link(
            link.index,
            &LinkSettings {
                alias: Some(req.alias),
                ..Default::default()
            },
        )
        .await
    }

    async fn add_tap(&self, name: &str) -> Result<(), NetError> {
        // Two quick ioctls: not worth a blocking-pool thread, which might sit in another
        // network namespace than this one.
        tun::create_persistent_tap(name).map_err(|source| NetError::Tap {
            name: name.to_owned(),
            source,
        })
    }

    async fn set_link(&self, index: u32, s: &LinkSettings<'_>) -> Result<(), NetError> {
        let mut b = LinkUnspec::new_with_index(index);
        if let Some(c) = s.controller {
            b = b.controller(c);
        }
        if let Some(a) = s.alias {
            b = b.alias(a);
        }
        if let Some(m) = s.mtu {
            b = b.mtu(m);
        }
        if s.up {
            b = b.up();
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(netlink(format!("change link {index}")))
    }

    async fn del_link(&self, index: u32) -> Result<(), NetError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(netlink(format!("delete link {index}"))(e)),
        }
    }

    async fn nft(&self, script: &str) -> Result<(), NetError> {
        // Spawned from this thread, so `nft` acts on this thread's network namespace.
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(NetError::Nft)?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(NetError::Nft)?;
        drop(stdin);
        let out = child.wait_with_output().await.map_err(NetError::Nft)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NetError::NftRejected {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                script: script.to_owned(),
            })
        }
    }

    async fn enable_ip_forward(&self) -> Result<(), NetError> {
        // A synchronous write on purpose: /proc/sys/net belongs to the network namespace of the
        // thread that opens it, and a blocking-pool thread might be in another one.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetError::Forwarding)
    }
}
