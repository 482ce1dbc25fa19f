//! The [`Router`] trait: how the proxy asks the agent where an instance is, tells it about
//! activity, and has it start a stopped instance.

use std::future::Future;
use std::net::SocketAddr;

/// The protocol the proxy speaks to an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, whatever the client spoke (the default: every HTTP server understands it).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), e.g. for gRPC workloads.
    Http2,
}

/// Where a request for an instance can go right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Running and ready: forward to `addr` (the instance's address and default port).
    Ready {
        /// Instance address and default port.
        addr: SocketAddr,
        /// Protocol to speak to it.
        protocol: UpstreamProtocol,
    },
    /// Being created or started, or running but not ready yet: 503 with `Retry-After`.
    Starting,
    /// Stopped (or stopping): 503, or started when `start_on_request` is on.
    Stopped,
    /// Failed: 502.
    Failed {
        /// Why, for the error body (no secrets: the client sees it).
        reason: String,
    },
}

/// Why [`Router::start_on_request`] did not produce a ready instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The instance does not exist (any more).
    #[error("No such instance")]
    Unknown,
    /// The start failed; the message goes into the 502 body.
    #[error("Starting the instance failed: {0}")]
    Failed(String),
}

/// What the proxy needs from the agent. The agent implements it over its instance table.
///
/// `lookup` and `on_activity` are called on every request, on the proxy's tasks: keep them
/// quick and non-blocking (a map lookup, an atomic store).
pub trait Router: Send + Sync + 'static {
    /// The instance's current route; `None` when the node has no instance of that id (404).
    fn lookup(&self, id: &str) -> Option<Route>;

    /// Records activity for the instance (each request, and periodically while an upgraded
    /// connection carries data), which pushes back its `sleep_after` expiry.
    fn on_activity(&self, id: &str);

    /// Starts a stopped instance (or waits for a starting one) and resolves once it is ready,
    /// with its route. Only called when the proxy's `start_on_request` is on; the proxy bounds
    /// the wait with `start_timeout` (then 503) and may call this concurrently for one id.
    fn start_on_request(&self, id: &str) -> impl Future<Output = Result<Route, StartError>> + Send;
}
