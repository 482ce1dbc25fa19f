//! The ingress proxy on loopback with real HTTP clients (hyper, curl) and a real upstream
//! server: routing, activity, error bodies, HTTP/2, upgrades, TLS, start on request, shutdown.
//! `ingress_netns.rs` runs it over the node's bridge and veth.

mod net_fixture;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hearth_agent::ingress::{
    Ingress, IngressConfig, Route, Router, StartError, TlsFiles, UpstreamProtocol,
};
use hearth_testkit::{require, skip};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use net_fixture::{eventually, upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a start on request does.
#[derive(Clone)]
enum Start {
    /// Becomes ready at this address after a short delay.
    ReadyAt(SocketAddr),
    /// Fails with this message.
    Fail(&'static str),
    /// Never finishes.
    Hang,
}

/// The agent's side, in memory.
struct TestRouter {
    routes: Mutex<HashMap<String, Route>>,
    activity: Mutex<HashMap<String, u32>>,
    starts: AtomicU32,
    start: Mutex<Start>,
}

impl TestRouter {
    fn new(routes: &[(&str, Route)]) -> Arc<TestRouter> {
        Arc::new(TestRouter {
            routes: Mutex::new(
                routes
                    .iter()
                    .map(|(id, r)| (id.to_string(), r.clone()))
                    .collect(),
            ),
            activity: Mutex::new(HashMap::new()),
            starts: AtomicU32::new(0),
            start: Mutex::new(Start::Hang),
        })
    }

    fn activity(&self, id: &str) -> u32 {
        self.activity.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

impl Router for TestRouter {
    fn lookup(&self, id: &str) -> Option<Route> {
        self.routes.lock().unwrap().get(id).cloned()
    }

    fn on_activity(&self, id: &str) {
        *self
            .activity
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default() += 1;
    }

    async fn start_on_request(&self, id: &str) -> Result<Route, StartError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        let start = self.start.lock().unwrap().clone();
        match start {
            Start::ReadyAt(addr) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let route = ready(addr);
                self.routes
                    .lock()
                    .unwrap()
                    .insert(id.to_owned(), route.clone());
                Ok(route)
            }
            Start::Fail(why) => Err(StartError::Failed(why.to_owned())),
            Start::Hang => std::future::pending().await,
        }
    }
}

fn ready(addr: SocketAddr) -> Route {
    Route::Ready {
        addr,
        protocol: UpstreamProtocol::Http1,
    }
}

/// A running proxy on 127.0.0.1, stopped on drop.
struct Proxy {
    addr: SocketAddr,
    ingress: Ingress<TestRouter>,
    token: CancellationToken,
    tracker: TaskTracker,
    serve: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(config: IngressConfig, source: IpAddr, router: Arc<TestRouter>) -> Proxy {
        let ingress = Ingress::new(config, source, router).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let serve = tokio::spawn({
            let (ingress, token, tracker) = (ingress.clone(), token.clone(), tracker.clone());
            async move { ingress.serve(listener, token, tracker).await }
        });
        Proxy {
            addr,
            ingress,
            token,
            tracker,
            serve: Some(serve),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn config() -> IngressConfig {
    IngressConfig {
        domain: Some("hearth.test".into()),
        ..Default::default()
    }
}

async fn upstream_on(ip: &str, name: &'static str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    upstream::serve(l, name);
    addr
}

/// Sends one HTTP/1.1 (or, with `h2`, HTTP/2 prior knowledge) request through the proxy.
async fn send(
    proxy: SocketAddr,
    h2: bool,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build_http();
    let mut req = Request::builder()
        .method(if body.is_empty() { "GET" } else { "POST" })
        .uri(format!("http://{proxy}/some/path?q=1"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(req.body(Full::new(body)).unwrap()),
    )
    .await
    .expect("request timed out")
    .expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, headers, json)
}

#[tokio::test]
async fn routes_by_host_or_header_and_counts_every_request() {
    let a = upstream_on("127.0.0.1", "a").await;
    let b = upstream_on("127.0.0.1", "b").await;
    let router = TestRouter::new(&[("web-a", ready(a)), ("web-b", ready(b))]);
    // A source address other than the client's shows that outgoing connections are bound.
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let proxy = Proxy::start(config(), source, router.clone()).await;

    let (status, headers, seen) = send(
        proxy.addr,
        false,
        &[
            ("host", "web-a.hearth.test:8080"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "dropped"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen["name"], "a");
    assert_eq!(seen["path"], "/some/path?q=1");
    assert_eq!(seen["host"], "web-a.hearth.test:8080", "Host is passed on");
    assert_eq!(seen["x_forwarded_for"], "127.0.0.1");
    assert_eq!(seen["x_forwarded_proto"], "http");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert!(
        seen["peer"].as_str().unwrap().starts_with("127.0.0.2:"),
        "{seen}"
    );
    assert!(
        !headers.contains_key("keep-alive"),
        "hop-by-hop response header leaked"
    );

    // The header wins over the host; bodies stream through.
    let body = Bytes::from(vec![7u8; 300 * 1024]);
    let (status, _, seen) = send(
        proxy.addr,
        false,
        &[
            ("host", "web-a.hearth.test"),
            ("x-hearth-instance", "web-b"),
        ],
        body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen["name"], "b");
    assert_eq!(seen["body_len"], 300 * 1024);

    assert_eq!(router.activity("web-a"), 1);
    assert_eq!(router.activity("web-b"), 1);
    let m = proxy.ingress.metrics().snapshot();
    assert_eq!((m.requests, m.proxied), (2, 2));
}

#[tokio::test]
async fn the_proxy_answers_in_json_when_it_cannot_forward() {
    // A port nothing listens on, held (bound, never listening) for the whole test so that no
    // other test's socket can take it: connecting to it is refused.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = held.local_addr().unwrap();
    let router = TestRouter::new(&[
        ("booting", Route::Starting),
        ("asleep", Route::Stopped),
        (
            "broken",
            Route::Failed {
                reason: "exit code 3".into(),
            },
        ),
        ("refusing", ready(closed)),
    ]);
    let config = IngressConfig {
        retry_after_secs: 7,
        ..config()
    };
    let proxy = Proxy::start(config, Ipv4Addr::LOCALHOST.into(), router.clone()).await;

    type Case<'a> = (&'a [(&'a str, &'a str)], u16, &'a str);
    let cases: [Case; 6] = [
        (&[("host", "nope.hearth.test")], 404, "unknown_instance"),
        (&[("host", "booting.hearth.test")], 503, "not_ready"),
        (&[("x-hearth-instance", "asleep")], 503, "instance_stopped"),
        (&[("x-hearth-instance", "broken")], 502, "instance_failed"),
        (
            &[("x-hearth-instance", "refusing")],
            502,
            "upstream_unreachable",
        ),
        (&[("host", "example.com")], 400, "no_instance"),
    ];
    for (headers, want_status, want_code) in cases {
        let (status, h, body) = send(proxy.addr, false, headers, Bytes::new()).await;
        assert_eq!(status.as_u16(), want_status, "{headers:?}: {body}");
        assert_eq!(body["error"]["code"], want_code, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().len() > 5);
        assert_eq!(h["content-type"], "application/json");
        if want_code == "not_ready" {
            assert_eq!(h["retry-after"], "7");
        } else {
            assert!(!h.contains_key("retry-after"), "{want_code}");
        }
    }
    let (_, _, body) = send(
        proxy.addr,
        false,
        &[("host", "broken.hearth.test")],
        Bytes::new(),
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exit code 3")
    );
    assert_eq!(body["error"]["instance"], "broken");

    let m = proxy.ingress.metrics().snapshot();
    assert_eq!(m.unknown_instance, 1);
    assert_eq!(m.not_ready, 2);
    assert_eq!(m.failed, 2);
    assert_eq!(m.upstream_errors, 1);
    assert_eq!(m.bad_request, 1);
    assert_eq!(m.proxied, 0);
    assert_eq!(
        router.activity("booting"),
        1,
        "a request for a known instance is activity"
    );
    assert_eq!(
        router.starts.load(Ordering::SeqCst),
        0,
        "start_on_request is off"
    );
}

#[tokio::test]
async fn http2_clients_and_http2_instances() {
    let h1 = upstream_on("127.0.0.1", "h1").await;
    let h2 = upstream_on("127.0.0.1", "h2").await;
    let router = TestRouter::new(&[
        ("one", ready(h1)),
        (
            "two",
            Route::Ready {
                addr: h2,
                protocol: UpstreamProtocol::Http2,
            },
        ),
    ]);
    let proxy = Proxy::start(config(), Ipv4Addr::LOCALHOST.into(), router).await;

    // An HTTP/2 client (prior knowledge, h2c) to an HTTP/1.1 instance: :authority becomes Host.
    let (status, _, seen) = send(
        proxy.addr,
        true,
        &[("x-hearth-instance", "one")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["host"], proxy.addr.to_string());

    // To an instance that speaks HTTP/2, from either kind of client.
    for client_h2 in [false, true] {
        let (status, _, seen) = send(
            proxy.addr,
            client_h2,
            &[("x-hearth-instance", "two")],
            Bytes::from_static(b"hello"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(seen["name"], "h2");
        assert_eq!(seen["version"], "HTTP/2.0");
        assert_eq!(seen["body_len"], 5);
    }
}

#[tokio::test]
async fn curl_speaks_h2c_to_the_proxy_under_the_domain() {
    require!(skip::program("curl"));
    let up = upstream_on("127.0.0.1", "up").await;
    let router = TestRouter::new(&[("web", ready(up))]);
    let proxy = Proxy::start(config(), Ipv4Addr::LOCALHOST.into(), router.clone()).await;
    let port = proxy.addr.port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "--http2-prior-knowledge"])
        .args(["--resolve", &format!("web.hearth.test:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_version}"])
        .arg(format!("http://web.hearth.test:{port}/x"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, version) = text.rsplit_once('\n').unwrap();
    assert_eq!(version, "2");
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["host"], format!("web.hearth.test:{port}"));
    assert_eq!(router.activity("web"), 1);
}

#[tokio::test]
async fn tls_serves_http2_and_http1_by_alpn() {
    require!(skip::program("curl"), skip::program("openssl"));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let st = tokio::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=hearth.test"])
        .args(["-addext", "subjectAltName=DNS:*.hearth.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .await
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    let up = upstream_on("127.0.0.1", "up").await;
    let router = TestRouter::new(&[("secure", ready(up))]);
    let config = IngressConfig {
        tls: Some(TlsFiles {
            cert: cert.clone(),
            key,
        }),
        ..config()
    };
    let proxy = Proxy::start(config, Ipv4Addr::LOCALHOST.into(), router).await;
    let port = proxy.addr.port();
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "60", flag, "--cacert"])
            .arg(&cert)
            .args(["--resolve", &format!("secure.hearth.test:{port}:127.0.0.1")])
            .args(["-w", "\n%{http_version}"])
            .arg(format!("https://secure.hearth.test:{port}/"))
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, version) = text.rsplit_once('\n').unwrap();
        assert_eq!(version, want);
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(seen["x_forwarded_proto"], "https");
        assert_eq!(seen["version"], "HTTP/1.1");
    }

    // A bad key file is a clear error at construction.
    let bad = IngressConfig {
        tls: Some(TlsFiles {
            cert: cert.clone(),
            key: cert,
        }),
        ..Default::default()
    };
    let err = Ingress::new(bad, Ipv4Addr::LOCALHOST.into(), TestRouter::new(&[]))
        .err()
        .unwrap();
    assert!(err.to_string().contains("no PEM private key"), "{err}");
}

#[tokio::test]
async fn websocket_upgrades_are_spliced_both_ways_and_count_as_activity() {
    let up = upstream_on("127.0.0.1", "ws").await;
    let router = TestRouter::new(&[("chat", ready(up))]);
    let config = IngressConfig {
        tunnel_activity_interval: Duration::from_millis(50),
        ..config()
    };
    let proxy = Proxy::start(config, Ipv4Addr::LOCALHOST.into(), router.clone()).await;

    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(
        b"GET /socket HTTP/1.1\r\nHost: chat.hearth.test\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(60), c.read_exact(&mut byte))
            .await
            .expect("no 101 in time")
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-upstream: ws"), "{head}");

    for round in 0..5u8 {
        let msg = [round; 1000];
        c.write_all(&msg).await.unwrap();
        let mut back = [0u8; 1000];
        tokio::time::timeout(Duration::from_secs(60), c.read_exact(&mut back))
            .await
            .expect("echo timed out")
            .unwrap();
        assert_eq!(back, msg);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let m = proxy.ingress.metrics().snapshot();
    assert_eq!((m.upgrades, m.tunnels_open), (1, 1));
    // The request itself, plus at least one tick that saw data.
    eventually(60, async || (router.activity("chat") >= 2).then_some(())).await;
    drop(c);
    eventually(60, async || {
        (proxy.ingress.metrics().snapshot().tunnels_open == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stopped_instance_is_started_on_request() {
    let up = upstream_on("127.0.0.1", "late").await;
    let router = TestRouter::new(&[
        ("sleepy", Route::Stopped),
        ("doomed", Route::Stopped),
        ("slow", Route::Starting),
    ]);
    *router.start.lock().unwrap() = Start::ReadyAt(up);
    let config = IngressConfig {
        start_on_request: true,
        start_timeout: Duration::from_millis(500),
        ..config()
    };
    let proxy = Proxy::start(config, Ipv4Addr::LOCALHOST.into(), router.clone()).await;

    let (status, _, seen) = send(
        proxy.addr,
        false,
        &[("host", "sleepy.hearth.test")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen["name"], "late");
    assert_eq!(router.starts.load(Ordering::SeqCst), 1);
    // Now ready: no second start.
    let (status, _, _) = send(
        proxy.addr,
        false,
        &[("host", "sleepy.hearth.test")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(router.starts.load(Ordering::SeqCst), 1);

    *router.start.lock().unwrap() = Start::Fail("image gone");
    let (status, _, body) = send(
        proxy.addr,
        false,
        &[("host", "doomed.hearth.test")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "start_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("image gone")
    );

    *router.start.lock().unwrap() = Start::Hang;
    let (status, h, body) = send(
        proxy.addr,
        false,
        &[("host", "slow.hearth.test")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_ready");
    assert!(h.contains_key("retry-after"));
    assert_eq!(proxy.ingress.metrics().snapshot().starts_on_request, 3);
}

#[tokio::test]
async fn cancelling_stops_accepting_and_lets_the_tracker_drain() {
    let up = upstream_on("127.0.0.1", "up").await;
    let router = TestRouter::new(&[("web", ready(up))]);
    let mut proxy = Proxy::start(config(), Ipv4Addr::LOCALHOST.into(), router).await;
    let (status, _, _) = send(
        proxy.addr,
        false,
        &[("host", "web.hearth.test")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 200);

    proxy.token.cancel();
    tokio::time::timeout(Duration::from_secs(60), proxy.serve.take().unwrap())
        .await
        .expect("serve did not return")
        .unwrap();
    proxy.tracker.close();
    tokio::time::timeout(Duration::from_secs(60), proxy.tracker.wait())
        .await
        .expect("connections did not drain");
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "the listener is closed"
    );
    assert_eq!(proxy.ingress.metrics().snapshot().connections_open, 0);
}
