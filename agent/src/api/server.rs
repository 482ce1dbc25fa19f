//! The API listeners: a Unix socket (mode from the config), and optionally TCP with TLS and
//! client-certificate authentication. Both take their listener and a shutdown token, so tests
//! bind a temp socket or `127.0.0.1:0`. On shutdown the server stops accepting, open streams
//! end, and in-flight calls finish (the caller bounds that with the drain timeout).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::AgentService;
use crate::config::TcpApiConfig;

/// Why an API listener failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("Cannot listen on {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// The socket's group does not exist.
    #[error("Unknown group {0:?} for the API socket")]
    Group(String),
    /// A TLS file could not be read.
    #[error("Cannot read TLS file {0}")]
    TlsFile(PathBuf, #[source] std::io::Error),
    /// The TLS setup or the server failed.
    #[error("The gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds the API's Unix socket (replacing a stale one) with `mode`, owned by `group` when one
/// is named.
pub fn bind_unix(path: &Path, mode: u32, group: &str) -> Result<UnixListener, ApiError> {
    let err = |e| ApiError::Bind(path.to_owned(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    if !group.is_empty() {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| ApiError::Group(group.to_owned()))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| ApiError::Bind(path.to_owned(), e.into()))?;
    }
    Ok(l)
}

/// Serves the API on a Unix socket until `shutdown`.
pub async fn serve_unix(
    listener: UnixListener,
    svc: AgentService,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    Server::builder()
        .add_service(svc.into_server())
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, ApiError> {
    std::fs::read(path).map_err(|e| ApiError::TlsFile(path.to_owned(), e))
}

/// The TLS config: the server identity, and client certificates required and checked against
/// the client CA.
pub fn tls_config(cfg: &TcpApiConfig) -> Result<ServerTlsConfig, ApiError> {
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&cfg.cert)?, read(&cfg.key)?))
        .client_ca_root(Certificate::from_pem(read(&cfg.client_ca)?))
        .client_auth_optional(false))
}

/// Serves the API on TCP with TLS and client-certificate authentication until `shutdown`.
pub async fn serve_tls(
    listener: TcpListener,
    cfg: &TcpApiConfig,
    svc: AgentService,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    Server::builder()
        .tls_config(tls_config(cfg)?)?
        .add_service(svc.into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[tokio::test]
    async fn socket_gets_its_mode_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _l = bind_unix(&path, 0o660, "root").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 0);
        // Binding again replaces the stale socket.
        drop(_l);
        let _l = bind_unix(&path, 0o600, "").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let err = bind_unix(&dir.path().join("b.sock"), 0o660, "no-such-group-xyz").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Unknown group \"no-such-group-xyz\" for the API socket"
        );
    }
}
