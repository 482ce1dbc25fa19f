//! The ingress proxy's configuration (`[ingress]` in the agent's config) and its TLS files.
//!
//! Defaults (documented here and nowhere else):
//!
//! | field | default |
//! |---|---|
//! | `domain` | none: only the `x-hearth-instance` header routes |
//! | `instance_header` | `x-hearth-instance` |
//! | `start_on_request` | `false` |
//! | `start_timeout` | `60s` |
//! | `connect_timeout` | `5s` |
//! | `retry_after_secs` | `1` |
//! | `tunnel_activity_interval` | `30s` |
//! | `shutdown_grace` | `10s` |
//! | `tls` | none (plain HTTP/1.1 and h2c) |

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::IngressError;

/// The ingress proxy's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Requests for `<id>.<domain>` go to instance `<id>`.
    pub domain: Option<String>,
    /// Header naming the instance; wins over the host.
    pub instance_header: String,
    /// Start a stopped instance when a request for it arrives, and hold the request until it
    /// is ready (at most `start_timeout`).
    pub start_on_request: bool,
    /// How long a request waits for a start on request.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// How long connecting to an instance may take before the request fails with 502.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `Retry-After` of 503 answers for instances that are not ready yet.
    pub retry_after_secs: u32,
    /// How often an upgraded connection (WebSocket) that carried data counts as activity.
    #[serde(with = "humantime_serde")]
    pub tunnel_activity_interval: Duration,
    /// On shutdown, how long open connections get to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) instead of plain HTTP.
    pub tls: Option<TlsFiles>,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            domain: None,
            instance_header: "x-hearth-instance".to_owned(),
            start_on_request: false,
            start_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            retry_after_secs: 1,
            tunnel_activity_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// PEM files of the proxy's TLS certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain (leaf first).
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// A rustls server config with ALPN `h2` and `http/1.1`.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IngressError> {
        let open = |p: &Path| {
            File::open(p)
                .map(BufReader::new)
                .map_err(|source| IngressError::TlsFile {
                    path: p.to_owned(),
                    source,
                })
        };
        let certs = rustls_pemfile::certs(&mut open(&self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| IngressError::TlsFile {
                path: self.cert.clone(),
                source,
            })?;
        if certs.is_empty() {
            return Err(IngressError::NoCertificate(self.cert.clone()));
        }
        let key = rustls_pemfile::private_key(&mut open(&self.key)?)
            .map_err(|source| IngressError::TlsFile {
                path: self.key.clone(),
                source,
            })?
            .ok_or_else(|| IngressError::NoKey(self.key.clone()))?;
        // An explicit provider: other crates of the agent may enable a second one, and then
        // rustls cannot pick a process default by itself. ring is the workspace's pinned
        // backend (deprecated in 0.23.48 for lacking post-quantum key exchange, still
        // supported).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(IngressError::Tls)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(IngressError::Tls)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}
