//! The ingress proxy in a node namespace, forwarding over the node bridge and a veth to an
//! HTTP server inside an instance namespace; the instance sees the node's ingress address as
//! the source (the address the eBPF ingress program admits).

mod net_fixture;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
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

/// `web` is the instance behind the veth; `gone` has an address nobody answers on.
struct TwoInstances {
    web: SocketAddr,
    gone: SocketAddr,
    activity: AtomicU32,
}

impl Router for TwoInstances {
    fn lookup(&self, id: &str) -> Option<Route> {
        let addr = match id {
            "web" => self.web,
            "gone" => self.gone,
            _ => return None,
        };
        Some(Route::Ready {
            addr,
            protocol: UpstreamProtocol::Http1,
        })
    }

    fn on_activity(&self, _id: &str) {
        self.activity.fetch_add(1, Ordering::SeqCst);
    }

    async fn start_on_request(&self, _id: &str) -> Result<Route, StartError> {
        Err(StartError::Unknown)
    }
}

async fn get(proxy: SocketAddr, host: &str) -> (u16, serde_json::Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("http://{proxy}/hello"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .expect("request timed out")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[test]
fn requests_reach_the_instance_from_the_ingress_address() {
    require!(skip::root(), skip::program("ip"), skip::program("nft"));
    let node = Netns::new();
    let inst_ns = Netns::new();
    node.block_on(|| async {
        let (plan, net) = net_fixture::node_network(NetConfig {
            subnet: "10.82.0.0/16".parse().unwrap(),
            ..Default::default()
        })
        .await;
        let mut pool = AddressPool::new(&plan);
        let inst = pool.allocate("web").unwrap();
        let gone = pool.allocate("gone").unwrap();
        net_fixture::attach_instance(&net, &inst, &inst_ns).await;

        let app = TcpListener::from_std(inst_ns.listen(SocketAddr::new(inst.address.into(), 8080)))
            .unwrap();
        upstream::serve(app, "in-netns");

        let router = Arc::new(TwoInstances {
            web: SocketAddr::new(inst.address.into(), 8080),
            gone: SocketAddr::new(gone.address.into(), 8080),
            activity: AtomicU32::new(0),
        });
        let config = IngressConfig {
            domain: Some("hearth.test".into()),
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let ingress = Ingress::new(config, plan.ingress_address.into(), router.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        tokio::spawn({
            let (ingress, token, tracker) = (ingress.clone(), token.clone(), tracker.clone());
            async move { ingress.serve(listener, token, tracker).await }
        });

        let (status, seen) = get(proxy, "web.hearth.test").await;
        assert_eq!(status, 200, "{seen}");
        assert_eq!(seen["name"], "in-netns");
        assert_eq!(seen["host"], "web.hearth.test");
        let peer: SocketAddr = seen["peer"].as_str().unwrap().parse().unwrap();
        assert_eq!(peer.ip(), plan.ingress_address);
        assert_eq!(router.activity.load(Ordering::SeqCst), 1);

        // An instance whose interface is missing: nobody answers ARP for its address, and the
        // proxy says it is unreachable once the connect timeout ends.
        let (status, body) = get(proxy, "gone.hearth.test").await;
        assert_eq!(status, 502, "{body}");
        assert_eq!(body["error"]["code"], "upstream_unreachable");
        net.detach(&inst).await.unwrap();

        token.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(60), tracker.wait())
            .await
            .expect("drain");
    });
}
