//! A client for the OCI distribution API: manifests and blobs over HTTP(S), with basic and
//! bearer-token auth, redirects and bounded retries with exponential backoff.
//!
//! The client only moves bytes; checking them against their digests is the caller's job
//! ([`crate::store`] hashes blobs while they stream, [`RegistryClient::manifest`] hashes
//! manifests).

pub mod auth;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::{
    config::{CacheConfig, Credentials, RegistryConfig},
    digest::Digest,
    manifest::{self, ACCEPT, MAX_MANIFEST_BYTES},
};
use auth::Challenge;

/// Redirects followed per request (registries redirect blobs to object storage).
const MAX_REDIRECTS: usize = 5;
/// Bytes of an error body quoted in errors.
const ERROR_BODY_QUOTE: usize = 300;

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No connection could be made (after every retry).
    #[error("Cannot reach registry {registry} ({attempts} attempts)")]
    Unreachable {
        /// The registry.
        registry: String,
        /// Attempts made.
        attempts: u32,
        /// The last connection error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The registry answered with an error status (after retries for 5xx and 429).
    #[error("{method} {url} answered {status}: {body}")]
    Status {
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// Status code.
        status: StatusCode,
        /// The start of the answer's body.
        body: String,
    },
    /// Authentication was required and failed (no credentials, wrong ones, or no token).
    #[error("Registry {registry} refused access to {repository}: {reason}")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
        /// What went wrong.
        reason: String,
    },
    /// The token service failed.
    #[error("Token service {realm} failed: {reason}")]
    Token {
        /// Token endpoint.
        realm: String,
        /// What went wrong.
        reason: String,
    },
    /// The manifest or blob does not exist.
    #[error("{what} not found in {registry}/{repository}")]
    NotFound {
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
        /// Tag or digest.
        what: String,
    },
    /// Reading a response body failed or stalled.
    #[error("Reading the answer of {url} failed")]
    Body {
        /// Request URL.
        url: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A manifest is larger than accepted.
    #[error("Manifest {0} is larger than {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge(String),
    /// A manifest's content does not match its digest.
    #[error("Manifest {reference} has digest {actual}, expected {expected}")]
    ManifestDigest {
        /// What was asked for.
        reference: String,
        /// Its expected digest.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// A manifest cannot be used.
    #[error("Manifest {reference} from {registry} is unusable")]
    Manifest {
        /// The registry.
        registry: String,
        /// The tag or digest.
        reference: String,
        /// Why.
        #[source]
        source: manifest::ManifestError,
    },
    /// The TLS settings (CA file) are unusable.
    #[error("TLS setup for registry {registry} failed: {reason}")]
    Tls {
        /// The registry.
        registry: String,
        /// What went wrong.
        reason: String,
    },
    /// A URL could not be built (a bad redirect, realm or name).
    #[error("Invalid URL {0:?}")]
    Url(String),
}

impl RegistryError {
    /// True when retrying later might help (network trouble, server errors).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Body { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// How requests to a registry are authorised right now.
#[derive(Clone, Default)]
enum AuthState {
    /// No challenge seen yet.
    #[default]
    None,
    /// Basic auth with the configured credentials.
    Basic(String),
    /// A bearer token (for the scope it was issued for).
    Bearer { scope: String, header: String },
}

/// A client for one registry.
pub struct RegistryClient {
    registry: String,
    scheme: &'static str,
    http: HttpClient,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    attempts: u32,
    backoff: Duration,
    /// How long a response body may stall before the request counts as failed.
    stall_timeout: Duration,
}

/// A fetched manifest document.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Its digest (of the exact bytes).
    pub digest: Digest,
    /// The `Content-Type` the registry sent.
    pub content_type: String,
    /// The bytes.
    pub bytes: Bytes,
}

fn tls_config(
    registry: &str,
    config: &RegistryConfig,
) -> Result<rustls::ClientConfig, RegistryError> {
    let tls = |reason: String| RegistryError::Tls {
        registry: registry.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    // The system store may be partly unreadable; what loads is still trusted.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| tls(format!("cannot read CA file {}: {e}", path.display())))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| tls(format!("bad PEM in {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| tls(format!("bad certificate in {}: {e}", path.display())))?;
            n += 1;
        }
        if n == 0 {
            return Err(tls(format!("no certificate in {}", path.display())));
        }
    }
    // The workspace uses ring (no aws-lc build); rustls deprecates it only for lacking
    // post-quantum key exchange, which registries do not require.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

impl RegistryClient {
    /// A client for `registry` (`host[:port]`) with the cache's settings for it.
    pub fn new(registry: &str, cache: &CacheConfig) -> Result<Self, RegistryError> {
        let config = cache.registries.get(registry).cloned().unwrap_or_default();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cache.connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(registry, &config)?)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            registry: registry.to_owned(),
            scheme: if config.insecure { "http" } else { "https" },
            http,
            credentials: config.credentials,
            auth: Mutex::new(AuthState::None),
            attempts: cache.attempts.max(1),
            backoff: cache.backoff,
            stall_timeout: Duration::from_secs(60),
        })
    }

    /// The registry this client talks to.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    fn url(&self, repository: &str, kind: &str, what: &str) -> String {
        format!(
            "{}://{}/v2/{repository}/{kind}/{what}",
            self.scheme, self.registry
        )
    }

    /// Fetches a manifest by tag or digest. When `what` is a digest, the bytes are checked
    /// against it; either way the returned digest is that of the bytes.
    pub async fn manifest(
        &self,
        repository: &str,
        what: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = self.url(repository, "manifests", what);
        let resp = self.get(repository, &url, Some(ACCEPT)).await?;
        let resp = self.expect_ok(repository, what, &url, resp).await?;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = read_limited(
            resp.into_body(),
            MAX_MANIFEST_BYTES,
            &url,
            self.stall_timeout,
        )
        .await?
        .ok_or_else(|| RegistryError::ManifestTooLarge(what.to_owned()))?;
        let digest = Digest::of(&bytes);
        if let Ok(expected) = what.parse::<Digest>()
            && expected != digest
        {
            return Err(RegistryError::ManifestDigest {
                reference: format!("{}/{repository}@{what}", self.registry),
                expected,
                actual: digest,
            });
        }
        Ok(FetchedManifest {
            digest,
            content_type,
            bytes,
        })
    }

    /// Starts downloading a blob; the caller streams (and verifies) the body.
    pub async fn blob(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<(String, Response<Incoming>), RegistryError> {
        let url = self.url(repository, "blobs", digest.as_str());
        let resp = self.get(repository, &url, None).await?;
        let resp = self
            .expect_ok(repository, digest.as_str(), &url, resp)
            .await?;
        Ok((url, resp))
    }

    /// How long a body may stall before it counts as failed.
    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }

    async fn expect_ok(
        &self,
        repository: &str,
        what: &str,
        url: &str,
        resp: Response<Incoming>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                registry: self.registry.clone(),
                repository: repository.to_owned(),
                what: what.to_owned(),
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: self.registry.clone(),
                repository: repository.to_owned(),
                reason: if self.credentials.is_some() {
                    format!("the credentials were not accepted ({status})")
                } else {
                    format!("credentials are needed and none are configured ({status})")
                },
            });
        }
        let body = read_limited(resp.into_body(), ERROR_BODY_QUOTE, url, self.stall_timeout)
            .await
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .unwrap_or_default();
        Err(RegistryError::Status {
            method: "GET".into(),
            url: url.to_owned(),
            status,
            body,
        })
    }

    /// GET with auth, redirects and retries. Returns the final response, whatever its status
    /// (except that 5xx/429 are retried and 401 leads to one authentication round).
    async fn get(
        &self,
        repository: &str,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let scope = format!("repository:{repository}:pull");
        let mut authenticated = false;
        loop {
            let auth = self.auth_header(&scope);
            let resp = self.get_following(url, accept, auth.as_deref()).await?;
            if resp.status() != StatusCode::UNAUTHORIZED || authenticated {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(auth::parse_challenge)
                .next();
            match challenge {
                Some(c) => self.authenticate(repository, &scope, c).await?,
                None => return Ok(resp),
            }
            authenticated = true;
        }
    }

    fn auth_header(&self, scope: &str) -> Option<String> {
        match &*self.auth.lock().unwrap_or_else(|e| e.into_inner()) {
            AuthState::None => None,
            AuthState::Basic(h) => Some(h.clone()),
            AuthState::Bearer { scope: s, header } if s == scope => Some(header.clone()),
            AuthState::Bearer { .. } => None,
        }
    }

    fn basic(&self) -> Option<String> {
        self.credentials.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }

    async fn authenticate(
        &self,
        repository: &str,
        scope: &str,
        challenge: Challenge,
    ) -> Result<(), RegistryError> {
        let state = match challenge {
            Challenge::Basic => match self.basic() {
                Some(h) => AuthState::Basic(h),
                None => {
                    return Err(RegistryError::Unauthorized {
                        registry: self.registry.clone(),
                        repository: repository.to_owned(),
                        reason: "basic auth is required and no credentials are configured".into(),
                    });
                }
            },
            Challenge::Bearer { realm, service, .. } => {
                let token = self.fetch_token(&realm, service.as_deref(), scope).await?;
                AuthState::Bearer {
                    scope: scope.to_owned(),
                    header: format!("Bearer {token}"),
                }
            }
        };
        *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = state;
        Ok(())
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, RegistryError> {
        let token_err = |reason: String| RegistryError::Token {
            realm: realm.to_owned(),
            reason,
        };
        let mut url = String::from(realm);
        url.push(if realm.contains('?') { '&' } else { '?' });
        if let Some(s) = service {
            url.push_str(&format!("service={}&", encode_query(s)));
        }
        url.push_str(&format!("scope={}", encode_query(scope)));
        let basic = self.basic();
        let resp = self.get_following(&url, None, basic.as_deref()).await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: self.registry.clone(),
                repository: scope.to_owned(),
                reason: format!("the token service refused the credentials ({status})"),
            });
        }
        if !status.is_success() {
            return Err(token_err(format!("answered {status}")));
        }
        let body = read_limited(resp.into_body(), 1 << 20, &url, self.stall_timeout)
            .await?
            .ok_or_else(|| token_err("answer larger than 1 MiB".into()))?;
        auth::parse_token(&body).ok_or_else(|| token_err("the answer holds no token".into()))
    }

    /// One GET with retries for connection errors, 5xx and 429, following redirects.
    async fn get_following(
        &self,
        url: &str,
        accept: Option<&str>,
        auth: Option<&str>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut url: Uri = url
            .parse()
            .map_err(|_| RegistryError::Url(url.to_owned()))?;
        let origin = url.authority().cloned();
        for _ in 0..=MAX_REDIRECTS {
            // Credentials go only to the host they are for, never to a redirect target.
            let auth = auth.filter(|_| url.authority() == origin.as_ref());
            let resp = self.get_retrying(&url, accept, auth).await?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(location) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
            else {
                return Ok(resp);
            };
            url = resolve_location(&url, location)?;
        }
        Err(RegistryError::Url(format!("{url} (too many redirects)")))
    }

    async fn get_retrying(
        &self,
        url: &Uri,
        accept: Option<&str>,
        auth: Option<&str>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut delay = self.backoff;
        let mut attempt = 1;
        loop {
            let mut req = Request::get(url.clone());
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            if let Some(a) = auth
                && let Ok(v) = HeaderValue::from_str(a)
            {
                req = req.header(header::AUTHORIZATION, v);
            }
            req = req.header(header::USER_AGENT, "hearth-images/0.1");
            let req = req
                .body(Empty::new())
                .map_err(|_| RegistryError::Url(url.to_string()))?;
            let result = self.http.request(req).await;
            let retry = match &result {
                Err(_) => true,
                Ok(r) => {
                    r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS
                }
            };
            if !retry || attempt >= self.attempts {
                return result.map_err(|source| RegistryError::Unreachable {
                    registry: self.registry.clone(),
                    attempts: attempt,
                    source,
                });
            }
            match &result {
                Err(e) => {
                    tracing::debug!(%url, attempt, error = %e, "registry request failed, retrying")
                }
                Ok(r) => {
                    tracing::debug!(%url, attempt, status = %r.status(), "registry busy, retrying")
                }
            }
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
    }
}

fn resolve_location(base: &Uri, location: &str) -> Result<Uri, RegistryError> {
    let bad = || RegistryError::Url(location.to_owned());
    if location.contains("://") {
        return location.parse().map_err(|_| bad());
    }
    let mut parts = base.clone().into_parts();
    let pq = if location.starts_with('/') {
        location.to_owned()
    } else {
        let path = base.path();
        format!(
            "{}{location}",
            &path[..path.rfind('/').map_or(0, |i| i + 1)]
        )
    };
    parts.path_and_query = Some(pq.parse().map_err(|_| bad())?);
    Uri::from_parts(parts).map_err(|_| bad())
}

fn encode_query(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads a whole body; `None` when it is longer than `limit`.
async fn read_limited(
    mut body: Incoming,
    limit: usize,
    url: &str,
    stall: Duration,
) -> Result<Option<Bytes>, RegistryError> {
    let mut out = Vec::new();
    loop {
        let frame = tokio::time::timeout(stall, body.frame())
            .await
            .map_err(|_| RegistryError::Body {
                url: url.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "the answer stalled"),
            })?;
        let Some(frame) = frame else {
            return Ok(Some(out.into()));
        };
        let frame = frame.map_err(|e| RegistryError::Body {
            url: url.to_owned(),
            source: std::io::Error::other(e),
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Ok(None);
            }
            out.extend_from_slice(&data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_redirects_and_encodes() {
        let base: Uri = "http://r:5000/v2/a/blobs/x".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "/other?x=1").unwrap().to_string(),
            "http://r:5000/other?x=1"
        );
        assert_eq!(
            resolve_location(&base, "https://s3/obj")
                .unwrap()
                .to_string(),
            "https://s3/obj"
        );
        assert_eq!(
            encode_query("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
