//! A test upstream: an HTTP server (HTTP/1.1 and h2c) that answers every request with a JSON
//! description of what it received, and answers `Upgrade` requests with 101 and then echoes
//! whatever bytes arrive on the upgraded connection.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `listener` until the returned task is aborted (or the runtime ends).
pub fn serve(listener: TcpListener, name: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(req, peer, name));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    name: &'static str,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if req.headers().contains_key("upgrade") {
        let protocol = header("upgrade").unwrap_or_default();
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", protocol)
            .header("x-upstream", name)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let info = serde_json::json!({
        "name": name,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()),
        "version": format!("{:?}", req.version()),
        "host": header("host"),
        "x_forwarded_for": header("x-forwarded-for"),
        "x_forwarded_proto": header("x-forwarded-proto"),
        "connection": header("connection"),
        "keep_alive": header("keep-alive"),
        "peer": peer.to_string(),
    });
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let mut info = info;
    info["body_len"] = body.into();
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("keep-alive", "timeout=5")
        .body(Full::new(Bytes::from(info.to_string())))
        .unwrap())
}
