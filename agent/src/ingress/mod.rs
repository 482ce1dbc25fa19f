//! The node's HTTP ingress proxy: one listener per node; requests for `<id>.<domain>` (or with
//! an `x-hearth-instance: <id>` header) go to that instance's default port. HTTP/1.1, HTTP/2
//! (h2c with prior knowledge, or over TLS by ALPN) and upgrades (WebSocket) are served; every
//! request counts as activity; the proxy answers itself, in JSON, when it cannot forward.
//! `docs/networking.md` lists the routing rules and error bodies.
//!
//! # Layout
//!
//! - [`router`]: [`Router`], what the agent implements (lookup, activity, start on request).
//! - [`routing`]: the instance id of a request (header, host).
//! - [`config`]: [`IngressConfig`] with its defaults, and the TLS files.
//! - [`errors`]: the proxy's own answers ([`ProxyError`]: status, JSON body, `Retry-After`).
//! - [`metrics`]: counters ([`IngressMetrics`]) and the log limiter.
//! - `proxy`: request handling, forwarding, upgrades.
//!
//! # Use (for the agent)
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn f<R: hearth_agent::ingress::Router>(router: Arc<R>, plan: hearth_agent::net::NodePlan)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use hearth_agent::ingress::{Ingress, IngressConfig};
//! use tokio_util::{sync::CancellationToken, task::TaskTracker};
//! let config = IngressConfig { domain: Some("hearth.localhost".into()), ..Default::default() };
//! // Outgoing connections come from the node's ingress address (the eBPF ingress rule).
//! let ingress = Ingress::new(config, plan.ingress_address.into(), router)?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
//! tracker.spawn({
//!     let (ingress, token, tracker) = (ingress.clone(), token.clone(), tracker.clone());
//!     async move { ingress.serve(listener, token, tracker).await }
//! });
//! // ... on shutdown:
//! token.cancel();
//! tracker.close();
//! tracker.wait().await;
//! # Ok(()) }
//! ```

pub mod config;
pub mod errors;
pub mod metrics;
mod proxy;
pub mod router;
pub mod routing;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{IngressConfig, TlsFiles};
pub use errors::ProxyError;
pub use metrics::{IngressMetrics, IngressSnapshot};
pub use router::{Route, Router, StartError, UpstreamProtocol};

use metrics::LogLimiter;
use proxy::{Conn, Shared};

/// The body type of every response the proxy sends.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Why the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// A TLS file could not be read.
    #[error("Reading TLS file {path} failed")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("TLS certificate file {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    /// The key file holds no private key.
    #[error("TLS key file {0} holds no PEM private key")]
    NoKey(PathBuf),
    /// rustls refused the certificate or key.
    #[error("Invalid TLS certificate or key")]
    Tls(#[source] rustls::Error),
}

static ACCEPT_WARNINGS: LogLimiter = LogLimiter::new(5);

/// How long a client may take to send a request head (HTTP/1).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The ingress proxy. Cheap to clone (one shared state).
pub struct Ingress<R: Router> {
    shared: Arc<Shared<R>>,
    tls: Option<TlsAcceptor>,
}

impl<R: Router> Clone for Ingress<R> {
    fn clone(&self) -> Self {
        Ingress {
            shared: self.shared.clone(),
            tls: self.tls.clone(),
        }
    }
}

impl<R: Router> Ingress<R> {
    /// A proxy whose connections toward instances come from `source` (the node's ingress
    /// address, [`NodePlan::ingress_address`](crate::net::NodePlan::ingress_address)); reads
    /// the TLS files when configured.
    pub fn new(
        config: IngressConfig,
        source: IpAddr,
        router: Arc<R>,
    ) -> Result<Self, IngressError> {
        let tls = match &config.tls {
            Some(files) => Some(TlsAcceptor::from(files.server_config()?)),
            None => None,
        };
        Ok(Ingress {
            shared: Arc::new(Shared::new(config, source, router)),
            tls,
        })
    }

    /// The proxy's counters.
    pub fn metrics(&self) -> &IngressMetrics {
        &self.shared.metrics
    }

    /// Accepts connections on `listener` until `token` is cancelled; each connection runs on
    /// `tracker`. On cancellation, open connections finish their requests (at most
    /// `shutdown_grace`) and upgraded connections are closed.
    pub async fn serve(
        &self,
        listener: TcpListener,
        token: CancellationToken,
        tracker: TaskTracker,
    ) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, tls = self.tls.is_some(), "ingress proxy listening");
        }
        loop {
            let (stream, peer) = tokio::select! {
                _ = token.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        if ACCEPT_WARNINGS.allow() {
                            tracing::warn!(error = %e, "accepting a connection failed");
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                shared: self.shared.clone(),
                peer,
                https: self.tls.is_some(),
                token: token.clone(),
                tracker: tracker.clone(),
            };
            let tls = self.tls.clone();
            tracker.spawn(async move {
                let m = &conn.shared.metrics;
                IngressMetrics::inc(&m.connections);
                m.connections_open.fetch_add(1, Ordering::Relaxed);
                match tls {
                    None => serve_connection(conn.clone(), stream).await,
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(
                            conn.shared
                                .config
                                .connect_timeout
                                .max(std::time::Duration::from_secs(10)),
                            acceptor.accept(stream),
                        );
                        match handshake.await {
                            Ok(Ok(tls)) => serve_connection(conn.clone(), tls).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
                conn.shared
                    .metrics
                    .connections_open
                    .fetch_sub(1, Ordering::Relaxed);
            });
        }
        tracing::info!("ingress proxy stopped accepting");
    }
}

async fn serve_connection<R, I>(conn: Conn<R>, io: I)
where
    R: Router,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer: SocketAddr = conn.peer;
    let token = conn.token.clone();
    let grace = conn.shared.config.shutdown_grace;
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that trickles its request head must not hold a connection forever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = token.cancelled() => {
            served.as_mut().graceful_shutdown();
            match tokio::time::timeout(grace, served.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "ingress connection ended with an error");
    }
}
