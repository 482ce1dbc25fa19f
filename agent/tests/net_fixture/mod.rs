//! Test fixture for the networking and ingress tests, on top of `hearth_testkit::netns`.
//!
//! Each test builds its "node" inside a [`Netns`] of its own (a uniquely named namespace,
//! deleted on drop, also when a test panics), so bridges, NAT tables and
//! `net.ipv4.ip_forward` never touch the host's namespace and concurrent tests cannot collide.
//!
//! Code runs inside a namespace on a thread of its own ([`Netns::run`], [`Netns::block_on`]):
//! `setns` changes only the calling thread, and sockets stay bound to the namespace they were
//! created in, so a listener made with `run` can be served from any runtime.

#![allow(dead_code)]

pub mod upstream;

use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Child, Command};

use hearth_testkit::netns::NetNs;

/// A network namespace with `lo` up, and an open handle to it (for `setns` and for handing it
/// to the code under test as a namespace fd).
pub struct Netns {
    file: File,
    ns: NetNs,
}

impl Netns {
    /// A new namespace.
    pub fn new() -> Netns {
        let ns = NetNs::new("agentnet").expect("create a network namespace");
        let file = File::open(ns.path()).expect("open the namespace");
        Netns { file, ns }
    }

    /// The namespace file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run(f)
    }

    /// Runs the future `make` returns on a current-thread runtime inside the namespace: every
    /// socket, netlink connection, `nft` and sysctl write of it acts on this namespace.
    pub fn block_on<F, T>(&self, make: impl FnOnce() -> F + Send) -> T
    where
        F: Future<Output = T>,
        T: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(make())
        })
    }

    /// Runs a command inside the namespace and returns its stdout; panics when it fails.
    pub fn cmd(&self, args: &[&str]) -> String {
        let out = self.run(|| {
            Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("spawn")
        });
        assert!(
            out.status.success(),
            "{args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process inside the namespace; it is killed on drop.
    pub fn spawn(&self, args: &[&str]) -> KillOnDrop {
        KillOnDrop(self.run(|| {
            Command::new(args[0])
                .args(&args[1..])
                .spawn()
                .expect("spawn")
        }))
    }

    /// An unconnected TCP socket created inside the namespace and bound to `addr`; connect it
    /// from any runtime (traffic stays in this namespace).
    pub fn tcp_socket(&self, addr: std::net::SocketAddr) -> tokio::net::TcpSocket {
        self.run(|| {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind(addr).expect("bind");
            s
        })
    }

    /// A std TCP listener bound inside the namespace.
    pub fn listen(&self, addr: std::net::SocketAddr) -> std::net::TcpListener {
        let l = self.run(|| std::net::TcpListener::bind(addr).expect("bind"));
        l.set_nonblocking(true).unwrap();
        l
    }
}

/// A child process killed and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T>(secs: u64, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {secs} s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Sets up a node network from `config` in the calling thread's namespace (call it inside
/// [`Netns::block_on`]): bridge, addresses and NAT, as the agent does at start.
pub async fn node_network(
    config: hearth_agent::net::NetConfig,
) -> (
    hearth_agent::net::NodePlan,
    hearth_agent::net::Network<hearth_agent::net::RtnlOps>,
) {
    let plan = config.plan_with_resolv_conf("").unwrap();
    let net = hearth_agent::net::Network::connect(plan.clone()).unwrap();
    net.setup_node().await.unwrap();
    (plan, net)
}

/// Connects `inst` to the node's bridge with a veth whose far end becomes `eth0` in `inst_ns`,
/// configured there (address, route) as hearth-init would.
pub async fn attach_instance(
    net: &hearth_agent::net::Network<hearth_agent::net::RtnlOps>,
    inst: &hearth_agent::net::InstanceNet,
    inst_ns: &Netns,
) {
    use hearth_agent::net::NetnsRef;
    net.attach_veth(inst, NetnsRef::Fd(inst_ns.fd()))
        .await
        .unwrap();
    hearth_agent::net::inside::configure_inside(NetnsRef::Fd(inst_ns.fd()), inst)
        .await
        .unwrap();
}
