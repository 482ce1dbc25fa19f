//! The proxy's own answers: a status, a JSON body `{"error": {"code", "message", "instance"}}`
//! and, for instances that are not ready yet, `Retry-After`.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;

/// Why the proxy answered a request itself instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// 400 `no_instance`: neither the header nor the host names an instance.
    NoInstance(String),
    /// 400 `invalid_instance_id`.
    InvalidId(String),
    /// 404 `unknown_instance`: the node has no instance of that id.
    UnknownInstance,
    /// 503 `not_ready` (with `Retry-After`): starting, or not ready yet.
    NotReady,
    /// 503 `instance_stopped`: stopped, and the proxy does not start instances on request.
    Stopped,
    /// 502 `instance_failed`.
    Failed(String),
    /// 502 `start_failed`: a start on request failed.
    StartFailed(String),
    /// 502 `upstream_unreachable`: connecting to the instance failed.
    Unreachable,
    /// 502 `upstream_error`: the connection to the instance broke before a response.
    UpstreamError,
}

impl ProxyError {
    /// Status and machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoInstance(_) => (StatusCode::BAD_REQUEST, "no_instance"),
            ProxyError::InvalidId(_) => (StatusCode::BAD_REQUEST, "invalid_instance_id"),
            ProxyError::UnknownInstance => (StatusCode::NOT_FOUND, "unknown_instance"),
            ProxyError::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ProxyError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "instance_stopped"),
            ProxyError::Failed(_) => (StatusCode::BAD_GATEWAY, "instance_failed"),
            ProxyError::StartFailed(_) => (StatusCode::BAD_GATEWAY, "start_failed"),
            ProxyError::Unreachable => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            ProxyError::UpstreamError => (StatusCode::BAD_GATEWAY, "upstream_error"),
        }
    }

    fn message(&self, id: Option<&str>) -> String {
        let id = id.unwrap_or("");
        match self {
            ProxyError::NoInstance(why) | ProxyError::InvalidId(why) => why.clone(),
            ProxyError::UnknownInstance => format!("No instance {id:?} on this node"),
            ProxyError::NotReady => format!("Instance {id:?} is not ready yet; retry shortly"),
            ProxyError::Stopped => format!("Instance {id:?} is stopped"),
            ProxyError::Failed(reason) => format!("Instance {id:?} failed: {reason}"),
            ProxyError::StartFailed(why) => format!("Starting instance {id:?} failed: {why}"),
            ProxyError::Unreachable => format!("Instance {id:?} did not accept the connection"),
            ProxyError::UpstreamError => {
                format!("The connection to instance {id:?} broke before it answered")
            }
        }
    }

    /// The response; `retry_after_secs` goes into `Retry-After` of `not_ready` answers.
    pub fn response(&self, id: Option<&str>, retry_after_secs: u32) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({
            "error": {
                "code": code,
                "message": self.message(id),
                "instance": id,
            }
        });
        let mut resp = Response::new(
            Full::new(Bytes::from(body.to_string() + "\n"))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if *self == ProxyError::NotReady {
            h.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_with_code_message_and_instance() {
        let resp = ProxyError::NotReady.response(Some("web-1"), 3);
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[RETRY_AFTER], "3");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let body = futures::executor::block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "not_ready");
        assert_eq!(v["error"]["instance"], "web-1");
        assert!(v["error"]["message"].as_str().unwrap().contains("web-1"));

        let resp = ProxyError::UnknownInstance.response(Some("x\"y"), 1);
        assert_eq!(resp.status(), 404);
        assert!(!resp.headers().contains_key(RETRY_AFTER));
        let body = futures::executor::block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["instance"], "x\"y");
    }
}
