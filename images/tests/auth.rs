//! Authentication and transport security against a real `docker-registry`: basic auth,
//! bearer tokens from a token service this test runs, and HTTPS with a test CA.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use bytes::Bytes;
use common::{chain, quiet, r, runtime};
use hearth_images::{CacheConfig, Credentials, ImageCache, RegistryConfig};
use hearth_testkit::{
    oci,
    pki::{self, KeyPair, TestCa},
    registry::{Auth, Registry, RegistryOptions, TokenAuth},
    require, skip,
};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

fn checks() -> Option<String> {
    skip::root()
        .or_else(|| skip::program("docker-registry"))
        .or_else(|| skip::program("skopeo"))
        .or_else(|| skip::program("openssl"))
}

fn cache(dir: &std::path::Path, registry: &Registry, rc: RegistryConfig) -> ImageCache {
    let mut c = CacheConfig::new(dir).registry(registry.host(), rc);
    c.backoff = std::time::Duration::from_millis(20);
    c.attempts = 2;
    ImageCache::open(c).unwrap()
}

fn creds(u: &str, p: &str) -> Option<Credentials> {
    Some(Credentials {
        username: u.into(),
        password: p.into(),
    })
}

#[test]
fn basic_auth_needs_the_right_password() {
    require!(checks());
    let registry = Registry::start_with(RegistryOptions {
        auth: Auth::Basic {
            username: "alice".into(),
            password: "s3cret".into(),
        },
        ..Default::default()
    });
    let reference = oci::busybox_image().push(&registry, "hearth/private", "v1");
    let rt = runtime();
    let insecure = |c| RegistryConfig {
        insecure: true,
        credentials: c,
        ..Default::default()
    };

    let dir = tempfile::tempdir().unwrap();
    let anon = cache(dir.path(), &registry, insecure(None));
    let err = rt
        .block_on(anon.prefetch(&r(&reference), &quiet))
        .unwrap_err();
    assert!(
        chain(&err).contains("no credentials are configured"),
        "{}",
        chain(&err)
    );
    drop(anon);

    let wrong = cache(dir.path(), &registry, insecure(creds("alice", "wrong")));
    let err = rt
        .block_on(wrong.prefetch(&r(&reference), &quiet))
        .unwrap_err();
    assert!(chain(&err).contains("not accepted"), "{}", chain(&err));
    assert!(wrong.list().is_empty());
    drop(wrong);

    let right = cache(dir.path(), &registry, insecure(creds("alice", "s3cret")));
    let img = rt
        .block_on(right.prefetch(&r(&reference), &quiet))
        .expect("pull with credentials");
    assert_eq!(img.config.cmd, ["/bin/sh"]);
}

/// A token service: checks basic credentials and issues ES256 JWTs for the scopes asked,
/// signed with a key whose certificate the registry trusts.
struct TokenService {
    addr: SocketAddr,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

const SERVICE: &str = "hearth-test-registry";
const ISSUER: &str = "hearth-test-issuer";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn jwt(signer: &EcdsaKeyPair, cert_der: &[u8], subject: &str, scopes: &[String]) -> String {
    let header = serde_json::json!({
        "typ": "JWT", "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)],
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 60,
        "iat": now, "jti": format!("{now}-{}", scopes.len()), "access": access,
    });
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let rng = ring::rand::SystemRandom::new();
    let sig = signer.sign(&rng, input.as_bytes()).expect("sign token");
    format!("{input}.{}", b64(sig.as_ref()))
}

impl TokenService {
    async fn start(key: &KeyPair, users: HashMap<String, String>) -> Self {
        let pkcs8 = std::fs::read(&key.key_pkcs8_der).unwrap();
        let signer = Arc::new(
            EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &pkcs8,
                &ring::rand::SystemRandom::new(),
            )
            .unwrap(),
        );
        let cert = Arc::new(std::fs::read(&key.cert_der).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (issued, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let users = Arc::new(users);
        let (i2, r2) = (issued.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut rx => return,
                };
                let (signer, cert, users, issued, refused) = (
                    signer.clone(),
                    cert.clone(),
                    users.clone(),
                    i2.clone(),
                    r2.clone(),
                );
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (signer, cert, users, issued, refused) = (
                            signer.clone(),
                            cert.clone(),
                            users.clone(),
                            issued.clone(),
                            refused.clone(),
                        );
                        async move {
                            let user = req
                                .headers()
                                .get("authorization")
                                .and_then(|h| h.to_str().ok())
                                .and_then(|h| h.strip_prefix("Basic "))
                                .and_then(|b| {
                                    base64::engine::general_purpose::STANDARD.decode(b).ok()
                                })
                                .and_then(|b| String::from_utf8(b).ok())
                                .and_then(|up| {
                                    let (u, p) = up.split_once(':')?;
                                    (users.get(u).map(String::as_str) == Some(p))
                                        .then(|| u.to_owned())
                                });
                            let Some(user) = user else {
                                refused.fetch_add(1, Ordering::SeqCst);
                                return Ok::<_, hyper::Error>(
                                    Response::builder()
                                        .status(StatusCode::UNAUTHORIZED)
                                        .body(Full::new(Bytes::from_static(b"{}")))
                                        .unwrap(),
                                );
                            };
                            let query = req.uri().query().unwrap_or("");
                            let scopes: Vec<String> = query
                                .split('&')
                                .filter_map(|kv| kv.strip_prefix("scope="))
                                .map(|s| {
                                    s.replace("%3A", ":")
                                        .replace("%2F", "/")
                                        .replace("%2C", ",")
                                })
                                .collect();
                            let token = jwt(&signer, &cert, &user, &scopes);
                            issued.fetch_add(1, Ordering::SeqCst);
                            let body = serde_json::json!({"token": token, "expires_in": 300});
                            Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            issued,
            refused,
            _shutdown: tx,
        }
    }
}

#[test]
fn bearer_token_auth_through_a_token_service() {
    require!(checks());
    let keys = tempfile::tempdir().unwrap();
    let signing = pki::self_signed(keys.path(), "token", "hearth token issuer");
    let rt = runtime();
    let users: HashMap<String, String> = [
        ("pusher".to_owned(), "push".to_owned()),
        ("bob".to_owned(), "hunter2".to_owned()),
    ]
    .into();
    let tokens = rt.block_on(TokenService::start(&signing, users));
    let registry = Registry::start_with(RegistryOptions {
        auth: Auth::Token(TokenAuth {
            realm: format!("http://{}/token", tokens.addr),
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_cert_bundle: signing.cert_pem.clone(),
        }),
        ..Default::default()
    });
    let reference = oci::httpd_image().push(&registry, "hearth/tokened", "v1");
    let dir = tempfile::tempdir().unwrap();
    let config = |c| RegistryConfig {
        insecure: true,
        credentials: c,
        ..Default::default()
    };

    let wrong = cache(dir.path(), &registry, config(creds("bob", "nope")));
    let err = rt
        .block_on(wrong.prefetch(&r(&reference), &quiet))
        .unwrap_err();
    assert!(
        chain(&err).contains("token service refused"),
        "{}",
        chain(&err)
    );
    assert!(tokens.refused.load(Ordering::SeqCst) >= 1);
    drop(wrong);

    let before = tokens.issued.load(Ordering::SeqCst);
    let good = cache(dir.path(), &registry, config(creds("bob", "hunter2")));
    let img = rt
        .block_on(good.prefetch(&r(&reference), &quiet))
        .expect("pull with a token");
    assert_eq!(img.config.entrypoint, ["/bin/httpd"]);
    assert!(
        tokens.issued.load(Ordering::SeqCst) > before,
        "a token was issued"
    );
    // Our requests were first refused, then authorised with the token.
    let log = registry.log();
    let ours: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hearth-images/"))
        .collect();
    assert!(
        ours.iter()
            .any(|l| l.contains("authorization token required"))
    );
    assert!(
        ours.iter()
            .any(|l| l.contains("msg=\"authorized request\"") && l.contains("/blobs/")),
        "the registry did not authorise a blob request with the token"
    );
}

#[test]
fn https_with_a_test_ca() {
    require!(checks());
    let pki_dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(pki_dir.path());
    let server = ca.server_cert("registry");
    let registry = Registry::start_with(RegistryOptions {
        tls: Some(server),
        ..Default::default()
    });
    assert!(registry.url().starts_with("https://"));
    let reference = oci::busybox_image().push(&registry, "hearth/tls", "v1");
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();

    // Without the CA the server's certificate is not trusted.
    let untrusted = cache(dir.path(), &registry, RegistryConfig::default());
    let err = rt
        .block_on(untrusted.prefetch(&r(&reference), &quiet))
        .unwrap_err();
    let msg = chain(&err);
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    drop(untrusted);

    // Plain HTTP is only spoken to registries configured as insecure, and this one is HTTPS.
    let plain = cache(
        dir.path(),
        &registry,
        RegistryConfig {
            insecure: true,
            ..Default::default()
        },
    );
    assert!(rt.block_on(plain.prefetch(&r(&reference), &quiet)).is_err());
    drop(plain);

    let trusted = cache(
        dir.path(),
        &registry,
        RegistryConfig {
            ca_file: Some(ca.ca.cert_pem.clone()),
            ..Default::default()
        },
    );
    let img = rt
        .block_on(trusted.prefetch(&r(&reference), &quiet))
        .expect("pull over HTTPS");
    assert_eq!(img.config.cmd, ["/bin/sh"]);

    // A CA file that holds no certificate is a clear configuration error.
    let bad = pki_dir.path().join("empty.pem");
    std::fs::write(&bad, "").unwrap();
    drop(trusted);
    let c = cache(
        dir.path(),
        &registry,
        RegistryConfig {
            ca_file: Some(bad),
            ..Default::default()
        },
    );
    let err = rt.block_on(c.prefetch(&r(&reference), &quiet)).unwrap_err();
    assert!(chain(&err).contains("no certificate"), "{}", chain(&err));
}
