//! A real OCI registry for tests and the demo: Debian's `docker-registry` on 127.0.0.1 with a
//! free port and a temp storage directory, optionally behind basic auth (htpasswd), bearer-token
//! auth, or HTTPS. It stops (and its storage goes) when the [`Registry`] is dropped.
//!
//! ```no_run
//! use hearth_testkit::{oci, registry::Registry};
//! let registry = Registry::start();
//! // A busybox httpd image serving /www on port 8080:
//! let reference = oci::httpd_image().push(&registry, "hearth/httpd", "v1");
//! assert_eq!(reference, format!("{}/hearth/httpd:v1", registry.host()));
//! ```
//!
//! Requests are logged to a file; [`Registry::blob_downloads`] counts successful blob GETs
//! from that log (e.g. to show that a blob was downloaded once).

use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::pki::KeyPair;

/// How the registry authenticates clients.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    /// Anyone may pull and push.
    #[default]
    None,
    /// HTTP basic auth against one user.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// Bearer tokens from a token service (the distribution token protocol).
    Token(TokenAuth),
}

/// Settings for bearer-token auth: the registry sends clients to `realm` and accepts JWTs
/// signed by a key whose certificate is in `root_cert_bundle`, issued by `issuer` for
/// `service`.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// URL of the token endpoint.
    pub realm: String,
    /// Service name (the token's audience).
    pub service: String,
    /// Issuer name (the token's `iss`).
    pub issuer: String,
    /// PEM certificates of the token signing keys.
    pub root_cert_bundle: PathBuf,
}

/// Options for [`Registry::start_with`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Authentication (default: none).
    pub auth: Auth,
    /// Serve HTTPS with this server certificate (see [`crate::pki::TestCa::server_cert`]).
    pub tls: Option<KeyPair>,
}

/// A running `docker-registry`.
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    options: RegistryOptions,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

impl Registry {
    /// Starts an anonymous plain-HTTP registry.
    pub fn start() -> Self {
        Self::start_with(RegistryOptions::default())
    }

    /// Starts a registry with `options`.
    pub fn start_with(options: RegistryOptions) -> Self {
        // The port is free when chosen but may be taken before the registry binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut reg = Self {
                child: None,
                dir: tempfile::Builder::new()
                    .prefix("hearth-registry-")
                    .tempdir()
                    .expect("create registry temp dir"),
                port,
                options: options.clone(),
            };
            if reg.spawn() {
                return reg;
            }
        }
        panic!("docker-registry did not start on any of 5 ports");
    }

    fn config(&self) -> String {
        let mut c = String::new();
        let storage = self.dir.path().join("storage");
        writeln!(
            c,
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{}\n  secret: hearth-test-secret",
            storage.display(),
            self.port
        )
        .unwrap();
        if let Some(tls) = &self.options.tls {
            writeln!(
                c,
                "  tls:\n    certificate: {}\n    key: {}",
                tls.cert_pem.display(),
                tls.key_pem.display()
            )
            .unwrap();
        }
        match &self.options.auth {
            Auth::None => {}
            Auth::Basic { username, password } => {
                let hash = bcrypt::hash(password, 5).expect("bcrypt");
                let path = self.dir.path().join("htpasswd");
                fs::write(&path, format!("{username}:{hash}\n")).expect("write htpasswd");
                writeln!(
                    c,
                    "auth:\n  htpasswd:\n    realm: hearth-test\n    path: {}",
                    path.display()
                )
                .unwrap();
            }
            Auth::Token(t) => {
                writeln!(
                    c,
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}",
                    t.realm,
                    t.service,
                    t.issuer,
                    t.root_cert_bundle.display()
                )
                .unwrap();
            }
        }
        c
    }

    /// Starts the process and waits until it accepts connections; false if it exited.
    fn spawn(&mut self) -> bool {
        let config = self.dir.path().join("config.yml");
        fs::write(&config, self.config()).expect("write registry config");
        let log = fs::File::create(self.log_path()).expect("create registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start docker-registry (cargo xtask setup installs it): {e}")
            });
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "docker-registry did not listen on {addr} within 30 s: {}",
            self.log()
        );
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// True when the registry serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.options.tls.is_some()
    }

    /// Base URL (`http://127.0.0.1:PORT` or `https://…`).
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.is_tls() { "https" } else { "http" },
            self.host()
        )
    }

    /// The registry's storage directory.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry stores the content of a blob (to corrupt it in tests).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Everything the registry logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Successful (200) GETs of `/v2/<repository>/blobs/<digest>` so far, from the access log.
    pub fn blob_downloads(&self, repository: &str, digest: &str) -> usize {
        let needle = format!("\"GET /v2/{repository}/blobs/{digest} HTTP/1.1\" 200 ");
        self.log().matches(&needle).count()
    }

    /// Stops the registry (simulates it going down); [`Registry::restart`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the registry again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "docker-registry did not restart: {}",
            self.log()
        );
    }

    /// Pushes an OCI layout (every manifest in it, with `--all`) with skopeo as
    /// `<host>/<repository>:<tag>`; returns that reference.
    pub fn push_layout(
        &self,
        layout: &Path,
        layout_tag: &str,
        repository: &str,
        tag: &str,
    ) -> String {
        let reference = format!("{}/{repository}:{tag}", self.host());
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
        match &self.options.auth {
            Auth::Basic { username, password } => {
                cmd.arg(format!("--dest-creds={username}:{password}"));
            }
            Auth::Token(_) => {
                cmd.arg("--dest-creds=pusher:push");
            }
            Auth::None => {}
        }
        cmd.arg(format!("oci:{}:{layout_tag}", layout.display()))
            .arg(format!("docker://{reference}"));
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run skopeo (cargo xtask setup installs it): {e}"));
        assert!(
            out.status.success(),
            "skopeo push of {reference} failed: {}\nregistry log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
