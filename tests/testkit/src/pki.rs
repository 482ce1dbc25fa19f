//! Test certificates made with the `openssl` command: a CA with server certificates for
//! 127.0.0.1 (HTTPS tests), and self-signed signing keys (e.g. a registry token issuer).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key pair with its certificate, as files.
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// Certificate, PEM.
    pub cert_pem: PathBuf,
    /// Private key, PEM (PKCS#8).
    pub key_pem: PathBuf,
    /// Private key, DER (PKCS#8) — what `ring` loads.
    pub key_pkcs8_der: PathBuf,
    /// Certificate, DER.
    pub cert_der: PathBuf,
}

fn finish(dir: &Path, name: &str) -> KeyPair {
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &format!("{name}.key"),
            "-outform",
            "DER",
            "-out",
            &format!("{name}.key.der"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-in",
            &format!("{name}.crt"),
            "-outform",
            "DER",
            "-out",
            &format!("{name}.crt.der"),
        ],
    );
    KeyPair {
        cert_pem: dir.join(format!("{name}.crt")),
        key_pem: dir.join(format!("{name}.key")),
        key_pkcs8_der: dir.join(format!("{name}.key.der")),
        cert_der: dir.join(format!("{name}.crt.der")),
    }
}

/// A self-signed ECDSA P-256 certificate named `name` in `dir` (files `<name>.crt`, …).
pub fn self_signed(dir: &Path, name: &str, common_name: &str) -> KeyPair {
    self_signed_with(dir, name, common_name, &[])
}

/// `self_signed` with extra `openssl req` arguments (extensions).
fn self_signed_with(dir: &Path, name: &str, common_name: &str, extra: &[&str]) -> KeyPair {
    let subject = format!("/CN={common_name}");
    let (key, cert) = (format!("{name}.key"), format!("{name}.crt"));
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &subject,
        "-keyout",
        &key,
        "-out",
        &cert,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
    finish(dir, name)
}

/// A test certificate authority.
#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
    /// The CA's own key pair; `cert_pem` is what clients trust.
    pub ca: KeyPair,
}

impl TestCa {
    /// Creates a CA in `dir` (files `ca.crt`, `ca.key`, …).
    pub fn new(dir: &Path) -> Self {
        let ca = self_signed_with(
            dir,
            "ca",
            "Hearth Test CA",
            &[
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Self {
            dir: dir.to_owned(),
            ca,
        }
    }

    /// Issues a server certificate for 127.0.0.1 and `localhost` (files `<name>.crt`, …).
    pub fn server_cert(&self, name: &str) -> KeyPair {
        self.issue(
            name,
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n\
             basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
        )
    }

    /// Issues a client certificate (TLS client authentication) named `name`.
    pub fn client_cert(&self, name: &str) -> KeyPair {
        self.issue(
            name,
            name,
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
        )
    }

    /// A P-256 key and a certificate for `common_name` signed by the CA, with the extensions
    /// `ext` (an openssl extension file's text).
    fn issue(&self, name: &str, common_name: &str, ext: &str) -> KeyPair {
        std::fs::write(self.dir.join(format!("{name}.ext")), ext)
            .expect("write openssl extension file");
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={common_name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
        finish(&self.dir, name)
    }
}
