//! The pieces together: an instance attached by the net module, the eBPF filter on its veth's
//! host end with the addresses the net plan gives, and the ingress proxy. HTTP through the proxy
//! (source: the ingress address) reaches the instance; the same port from any other node address
//! is dropped by the filter.

mod net_fixture;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hearth_agent::ebpf::{
    Direction, DropReason, Filter, LoadOptions, NodeAddr, PassReason, PinRoot, Policy,
};
use hearth_agent::ingress::{Ingress, IngressConfig, Route, Router, StartError, UpstreamProtocol};
use hearth_agent::net::{AddressPool, NetConfig};
use hearth_testkit::{require, skip};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use net_fixture::{Netns, upstream};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const HTTP_PORT: u16 = 8080;

/// A private bpffs mounted on a fresh directory; unmounted (pins and all) on drop.
struct BpfDir(PathBuf);

impl BpfDir {
    fn new() -> BpfDir {
        let dir =
            std::env::temp_dir().join(format!("hearth-agentnet-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        BpfDir(dir)
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path; a lazy unmount of the mount this test made.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}

struct Web(SocketAddr);

impl Router for Web {
    fn lookup(&self, id: &str) -> Option<Route> {
        (id == "web").then_some(Route::Ready {
            addr: self.0,
            protocol: UpstreamProtocol::Http1,
        })
    }

    fn on_activity(&self, _id: &str) {}

    async fn start_on_request(&self, _id: &str) -> Result<Route, StartError> {
        Err(StartError::Unknown)
    }
}

#[test]
fn only_the_proxy_reaches_the_instance_through_the_filter() {
    require!(skip::root(), skip::program("ip"), skip::program("nft"));
    let node = Netns::new();
    let inst_ns = Netns::new();
    let bpf = BpfDir::new();
    node.block_on(|| async {
        let (plan, net) = net_fixture::node_network(NetConfig {
            subnet: "10.83.0.0/16".parse().unwrap(),
            ..Default::default()
        })
        .await;
        let inst = AddressPool::new(&plan).allocate("web").unwrap();
        net_fixture::attach_instance(&net, &inst, &inst_ns).await;
        let app = inst_ns.listen(SocketAddr::new(inst.address.into(), HTTP_PORT));
        upstream::serve(TcpListener::from_std(app).unwrap(), "filtered");

        // The policy's addresses, as docs/networking.md maps them from the net plan.
        let mut policy = Policy::new(inst.mac.0);
        policy.instance_ipv4 = Some(inst.address);
        policy.gateway = NodeAddr::v4(plan.gateway);
        policy.dns = NodeAddr::v4(plan.resolver);
        policy.ingress_proxy = NodeAddr::v4(plan.ingress_address);
        policy.http_ports = vec![HTTP_PORT];
        policy.internet = false;
        let root = PinRoot::mounting(&bpf.0, bpf.0.join("hearth")).unwrap();
        // This thread is in the node namespace, where the interface is.
        let filter = Filter::load_and_attach(
            &root,
            "web",
            &inst.host_ifname,
            &policy,
            &LoadOptions::default(),
        )
        .unwrap();

        let router = Arc::new(Web(SocketAddr::new(inst.address.into(), HTTP_PORT)));
        let config = IngressConfig {
            domain: Some("hearth.test".into()),
            ..Default::default()
        };
        let ingress = Ingress::new(config, plan.ingress_address.into(), router).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        tokio::spawn({
            let (ingress, token, tracker) = (ingress.clone(), token.clone(), tracker.clone());
            async move { ingress.serve(listener, token, tracker).await }
        });

        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = http::Request::get(format!("http://{proxy}/"))
            .header("host", "web.hearth.test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
            .await
            .expect("request timed out")
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["name"], "filtered");
        let c = filter.counters().unwrap();
        assert!(c.passed_for(Direction::Ingress, PassReason::Http).packets >= 3);

        // The same port from the gateway address (any node process that did not bind the
        // ingress address) gets nothing back.
        let before = filter.counters().unwrap();
        let sock = node.tcp_socket(SocketAddr::new(plan.gateway.into(), 0));
        let attempt = tokio::time::timeout(
            Duration::from_secs(3),
            sock.connect(SocketAddr::new(inst.address.into(), HTTP_PORT)),
        )
        .await;
        assert!(
            !matches!(attempt, Ok(Ok(_))),
            "a connection not from the ingress address got through"
        );
        let after = filter.counters().unwrap();
        let dropped = |c: &hearth_agent::ebpf::Counters| {
            c.dropped_for(Direction::Ingress, DropReason::NotFromProxy)
                .packets
        };
        assert!(
            dropped(&after) > dropped(&before),
            "the filter counted the drop"
        );

        token.cancel();
        tracker.close();
        tracker.wait().await;
        filter.remove().unwrap();
        net.detach(&inst).await.unwrap();
    });
}
