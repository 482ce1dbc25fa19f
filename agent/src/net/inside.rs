//! Configuring the instance's side of a veth from the host: `lo` and `eth0` up, the address,
//! the default route. hearth-init does the same from inside (from
//! [`InstanceNet::init_network`]); this is for the sandbox runtime when the agent wants the
//! interface ready before init starts, and for tests.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use nix::sched::CloneFlags;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use super::NetError;
use super::alloc::{INSTANCE_IFNAME, InstanceNet};
use super::ops::NetnsRef;
use super::rtnl::{add_addresses, errno, get_link};

/// Opens a namespace reference as an owned file descriptor.
pub fn open_netns(netns: NetnsRef<'_>) -> Result<OwnedFd, NetError> {
    match netns {
        NetnsRef::Pid(pid) => File::open(format!("/proc/{pid}/ns/net"))
            .map(OwnedFd::from)
            .map_err(NetError::Netns),
        NetnsRef::Fd(fd) => fd.try_clone_to_owned().map_err(NetError::Netns),
    }
}

/// Brings up `lo` and `eth0` in `netns` with the instance's address and default route.
/// Idempotent.
pub async fn configure_inside(netns: NetnsRef<'_>, inst: &InstanceNet) -> Result<(), NetError> {
    let fd = open_netns(netns)?;
    let inst = inst.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // setns() changes only the calling thread, so the work happens on a thread of its own that
    // ends with it; the netlink socket it opens is bound to the instance's namespace.
    std::thread::Builder::new()
        .name("hearth-netns".into())
        .spawn(move || {
            let result = (|| {
                nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetError::Netns(e.into()))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(NetError::Netns)?;
                rt.block_on(configure_here(&inst))
            })();
            let _ = tx.send(result);
        })
        .map_err(NetError::Netns)?;
    rx.await.unwrap_or_else(|_| {
        Err(NetError::Netns(std::io::Error::other(
            "netns thread panicked",
        )))
    })
}

async fn configure_here(inst: &InstanceNet) -> Result<(), NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
    tokio::spawn(conn);
    for name in ["lo", INSTANCE_IFNAME] {
        let link = get_link(&handle, name)
            .await?
            .ok_or_else(|| NetError::Vanished(name.to_owned()))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                what: format!("bring up {name} in the instance"),
                source,
            })?;
        if name == INSTANCE_IFNAME {
            add_addresses(&handle, link.index, &[(inst.address, inst.prefix_len)]).await?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(inst.gateway)
                .output_interface(link.index)
                .build();
            match handle.route().add(route).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(NetError::Netlink {
                        what: format!("add the default route via {}", inst.gateway),
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}
