//! Request handling: route, count activity, start on request, forward (HTTP/1.1 or h2c toward
//! the instance, from the node's ingress address), and splice upgraded connections.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Body;
use super::config::IngressConfig;
use super::errors::ProxyError;
use super::metrics::{IngressMetrics, LogLimiter};
use super::router::{Route, Router, StartError, UpstreamProtocol};
use super::routing::{self, RoutingError};

static UPSTREAM_WARNINGS: LogLimiter = LogLimiter::new(10);

/// How long an idle connection to an instance stays pooled.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Shared by every connection of one proxy.
pub(crate) struct Shared<R> {
    pub(crate) config: IngressConfig,
    pub(crate) router: Arc<R>,
    pub(crate) metrics: IngressMetrics,
    http1: Client<HttpConnector, Incoming>,
    http2: Client<HttpConnector, Incoming>,
}

impl<R: Router> Shared<R> {
    pub(crate) fn new(
        config: IngressConfig,
        source: std::net::IpAddr,
        router: Arc<R>,
    ) -> Shared<R> {
        let mut connector = HttpConnector::new();
        // The eBPF ingress program admits TCP to an instance's HTTP port only from this address.
        connector.set_local_address(Some(source));
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        // Idle pooled connections to an instance that vanished (its interface deleted, no RST
        // ever comes) are found dead by keepalive probes and dropped from the pool.
        connector.set_keepalive(Some(Duration::from_secs(10)));
        connector.set_keepalive_interval(Some(Duration::from_secs(2)));
        connector.set_keepalive_retries(Some(3));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .http2_only(true)
            .build(connector);
        Shared {
            config,
            router,
            metrics: IngressMetrics::default(),
            http1,
            http2,
        }
    }
}

/// One accepted connection's view: the shared state plus who the client is.
pub(crate) struct Conn<R> {
    pub(crate) shared: Arc<Shared<R>>,
    pub(crate) peer: SocketAddr,
    pub(crate) https: bool,
    pub(crate) token: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

impl<R> Clone for Conn<R> {
    fn clone(&self) -> Self {
        Conn {
            shared: self.shared.clone(),
            peer: self.peer,
            https: self.https,
            token: self.token.clone(),
            tracker: self.tracker.clone(),
        }
    }
}

impl<R: Router> Conn<R> {
    fn fail(&self, err: ProxyError, id: Option<&str>) -> Response<Body> {
        let m = &self.shared.metrics;
        IngressMetrics::inc(match err {
            ProxyError::NoInstance(_) | ProxyError::InvalidId(_) => &m.bad_request,
            ProxyError::UnknownInstance => &m.unknown_instance,
            ProxyError::NotReady | ProxyError::Stopped => &m.not_ready,
            ProxyError::Failed(_) | ProxyError::StartFailed(_) => &m.failed,
            ProxyError::Unreachable | ProxyError::UpstreamError => &m.upstream_errors,
        });
        err.response(id, self.shared.config.retry_after_secs)
    }

    /// Answers one request.
    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let shared = &self.shared;
        IngressMetrics::inc(&shared.metrics.requests);
        let config = &shared.config;
        let header = req
            .headers()
            .get(config.instance_header.as_str())
            .and_then(|v| v.to_str().ok());
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        let id = match routing::instance_id(
            &config.instance_header,
            header,
            host,
            config.domain.as_deref(),
        ) {
            Ok(id) => id.to_owned(),
            Err(e @ RoutingError::NoInstance { .. }) => {
                return self.fail(ProxyError::NoInstance(e.to_string()), None);
            }
            Err(e @ RoutingError::InvalidId(_)) => {
                return self.fail(ProxyError::InvalidId(e.to_string()), None);
            }
        };
        let Some(mut route) = shared.router.lookup(&id) else {
            return self.fail(ProxyError::UnknownInstance, Some(&id));
        };
        shared.router.on_activity(&id);
        if config.start_on_request && matches!(route, Route::Stopped | Route::Starting) {
            IngressMetrics::inc(&shared.metrics.starts_on_request);
            tracing::debug!(%id, "starting instance on request");
            route = match tokio::time::timeout(
                config.start_timeout,
                shared.router.start_on_request(&id),
            )
            .await
            {
                Ok(Ok(route)) => route,
                Ok(Err(StartError::Unknown)) => {
                    return self.fail(ProxyError::UnknownInstance, Some(&id));
                }
                Ok(Err(StartError::Failed(why))) => {
                    return self.fail(ProxyError::StartFailed(why), Some(&id));
                }
                Err(_) => return self.fail(ProxyError::NotReady, Some(&id)),
            };
        }
        match route {
            Route::Ready { addr, protocol } => self.forward(req, &id, addr, protocol).await,
            Route::Starting => self.fail(ProxyError::NotReady, Some(&id)),
            Route::Stopped => self.fail(ProxyError::Stopped, Some(&id)),
            Route::Failed { reason } => self.fail(ProxyError::Failed(reason), Some(&id)),
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        id: &str,
        addr: SocketAddr,
        protocol: UpstreamProtocol,
    ) -> Response<Body> {
        let upgrade = wants_upgrade(&req);
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        // HTTP/2 clients send no Host, only :authority; HTTP/1.1 instances want a Host.
        if !parts.headers.contains_key(header::HOST)
            && let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, v);
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = match Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(uri) => uri,
            Err(_) => return self.fail(ProxyError::UpstreamError, Some(id)),
        };
        strip_hop_by_hop(
            &mut parts.headers,
            upgrade,
            protocol == UpstreamProtocol::Http2,
        );
        self.add_forwarded(&mut parts.headers);
        parts.version = match protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::Http2 => Version::HTTP_2,
        };
        let client = match protocol {
            UpstreamProtocol::Http1 => &self.shared.http1,
            UpstreamProtocol::Http2 => &self.shared.http2,
        };
        let mut resp = match client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp,
            Err(e) => {
                let err = if e.is_connect() {
                    ProxyError::Unreachable
                } else {
                    ProxyError::UpstreamError
                };
                if UPSTREAM_WARNINGS.allow() {
                    tracing::warn!(%id, %addr, error = %error_chain(&e), "forwarding failed");
                }
                return self.fail(err, Some(id));
            }
        };
        IngressMetrics::inc(&self.shared.metrics.proxied);

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = client_side
        {
            let upstream_side = hyper::upgrade::on(&mut resp);
            self.splice(id.to_owned(), client_side, upstream_side);
            return resp.map(|_| empty());
        }
        strip_hop_by_hop(resp.headers_mut(), false, false);
        resp.map(|b| b.map_err(Into::into).boxed())
    }

    fn add_forwarded(&self, headers: &mut HeaderMap) {
        let ip = self.peer.ip().to_string();
        let xff = HeaderName::from_static("x-forwarded-for");
        let value = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(xff, v);
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(if self.https { "https" } else { "http" }),
        );
    }

    /// Copies bytes both ways between the upgraded client and instance connections, counting
    /// activity while data flows, until either side closes or the proxy shuts down.
    fn splice(
        &self,
        id: String,
        client: hyper::upgrade::OnUpgrade,
        upstream: hyper::upgrade::OnUpgrade,
    ) {
        let this = self.clone();
        self.tracker.spawn(async move {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(%id, error = %e, "upgrade did not complete");
                    return;
                }
            };
            let m = &this.shared.metrics;
            IngressMetrics::inc(&m.upgrades);
            m.tunnels_open.fetch_add(1, Ordering::Relaxed);
            let moved = Arc::new(AtomicBool::new(false));
            let mut client = Watched::new(TokioIo::new(client), moved.clone());
            let mut upstream = Watched::new(TokioIo::new(upstream), moved.clone());
            let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
            tokio::pin!(copy);
            let mut tick = tokio::time::interval(this.shared.config.tunnel_activity_interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    r = &mut copy => {
                        if let Err(e) = r {
                            tracing::debug!(%id, error = %e, "upgraded connection ended");
                        }
                        break;
                    }
                    _ = tick.tick() => {
                        if moved.swap(false, Ordering::Relaxed) {
                            this.shared.router.on_activity(&id);
                        }
                    }
                    _ = this.token.cancelled() => break,
                }
            }
            if moved.load(Ordering::Relaxed) {
                this.shared.router.on_activity(&id);
            }
            m.tunnels_open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// An HTTP/1.x request asking to switch protocols (`Connection: upgrade` + `Upgrade`).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the headers that belong to one hop (RFC 9110 7.6.1), including those the
/// `Connection` header names. For an upgrade, `Connection: upgrade` and `Upgrade` stay; toward
/// an HTTP/2 instance `TE: trailers` stays (gRPC needs it).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool, keep_te_trailers: bool) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    let te_trailers = keep_te_trailers
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// An IO that notes when bytes were read from it.
struct Watched<T> {
    io: T,
    moved: Arc<AtomicBool>,
}

impl<T> Watched<T> {
    fn new(io: T, moved: Arc<AtomicBool>) -> Self {
        Watched { io, moved }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "secret"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn upgrades_keep_upgrade_and_h2_keeps_te_trailers() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true, false);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");

        let mut h = headers(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut h, false, true);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn upgrade_needs_both_headers_and_http1() {
        let req = |conn: &str, up: Option<&str>, v: Version| {
            let mut b = Request::builder().version(v).header("connection", conn);
            if let Some(u) = up {
                b = b.header("upgrade", u);
            }
            b.body(()).unwrap()
        };
        assert!(wants_upgrade(&req(
            "keep-alive, Upgrade",
            Some("websocket"),
            Version::HTTP_11
        )));
        assert!(!wants_upgrade(&req(
            "keep-alive",
            Some("websocket"),
            Version::HTTP_11
        )));
        assert!(!wants_upgrade(&req("upgrade", None, Version::HTTP_11)));
        assert!(!wants_upgrade(&req(
            "upgrade",
            Some("websocket"),
            Version::HTTP_2
        )));
    }
}
