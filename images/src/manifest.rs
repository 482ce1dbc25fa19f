//! OCI and Docker schema 2 manifests, image indexes and image configs: parsing and checks.
//!
//! Everything here parses bytes a registry sent, so it never panics on bad input (there is a
//! fuzz target, `images/fuzz/fuzz_targets/manifest.rs`) and rejects what the cache cannot use
//! with a [`ManifestError`] that says why.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (an index).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header for manifest requests: everything [`parse_manifest`] understands.
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest or config accepted (registries cap manifests at 4 MiB too).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Why a manifest, index or config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("Malformed {what}")]
    Json {
        /// Which document.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The document is larger than [`MAX_MANIFEST_BYTES`].
    #[error("{what} is {size} bytes, more than the {MAX_MANIFEST_BYTES} accepted")]
    TooLarge {
        /// Which document.
        what: &'static str,
        /// Its size.
        size: usize,
    },
    /// A media type this cache does not handle (e.g. Docker schema 1).
    #[error("Unsupported manifest media type {0:?}")]
    MediaType(String),
    /// A layer media type this cache cannot unpack.
    #[error("Unsupported layer media type {0:?}")]
    LayerMediaType(String),
    /// `schemaVersion` is not 2.
    #[error("Unsupported schemaVersion {0}")]
    SchemaVersion(u32),
    /// An index has no linux/amd64 entry.
    #[error("The image index has no linux/amd64 manifest (it has: {0})")]
    NoPlatform(String),
    /// A size that cannot be right.
    #[error("Descriptor {0} has a negative or absurd size")]
    Size(Digest),
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: i64,
    /// Platform (in indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// Platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, …).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// Architecture variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2; the shapes agree on what we use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Must be 2.
    pub schema_version: u32,
    /// Media type, when the document states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// Layers, base first.
    pub layers: Vec<Descriptor>,
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Must be 2.
    pub schema_version: u32,
    /// Media type, when the document states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// One manifest per platform.
    pub manifests: Vec<Descriptor>,
}

/// A parsed manifest document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A single-platform image manifest.
    Manifest(Manifest),
    /// A multi-platform index.
    Index(Index),
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type declares.
    pub fn from_media_type(media_type: &str) -> Result<Self, ManifestError> {
        Ok(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Self::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Self::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Self::Zstd,
            other => return Err(ManifestError::LayerMediaType(other.to_owned())),
        })
    }

    /// Guesses from the first bytes (some registries mislabel layers).
    pub fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Self::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Self::Zstd)
        } else {
            None
        }
    }
}

fn json<'a, T: Deserialize<'a>>(what: &'static str, bytes: &'a [u8]) -> Result<T, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            what,
            size: bytes.len(),
        });
    }
    serde_json::from_slice(bytes).map_err(|source| ManifestError::Json { what, source })
}

fn check_descriptor(d: &Descriptor) -> Result<(), ManifestError> {
    // 1 TiB is far beyond any real blob; the bound keeps arithmetic on sizes safe.
    if d.size < 0 || d.size > (1 << 40) {
        return Err(ManifestError::Size(d.digest.clone()));
    }
    Ok(())
}

/// Parses a manifest document; `content_type` is the registry's `Content-Type` header (the
/// document's own `mediaType` field wins when present).
pub fn parse_manifest(content_type: &str, bytes: &[u8]) -> Result<Parsed, ManifestError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde::de::IgnoredAny>,
    }
    let probe: Probe = json("manifest", bytes)?;
    let content_type = content_type.split(';').next().unwrap_or("").trim();
    let media_type = match probe.media_type.as_deref() {
        Some(m) => m,
        // OCI documents may omit mediaType; an index is recognised by its `manifests`.
        None if probe.manifests.is_some() => OCI_INDEX,
        None if content_type.is_empty() || content_type == "application/json" => OCI_MANIFEST,
        None => content_type,
    };
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let m: Manifest = json("manifest", bytes)?;
            if m.schema_version != 2 {
                return Err(ManifestError::SchemaVersion(m.schema_version));
            }
            check_descriptor(&m.config)?;
            for l in &m.layers {
                check_descriptor(l)?;
                Compression::from_media_type(&l.media_type)?;
            }
            Ok(Parsed::Manifest(m))
        }
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            let i: Index = json("image index", bytes)?;
            if i.schema_version != 2 {
                return Err(ManifestError::SchemaVersion(i.schema_version));
            }
            for d in &i.manifests {
                check_descriptor(d)?;
            }
            Ok(Parsed::Index(i))
        }
        other => Err(ManifestError::MediaType(other.to_owned())),
    }
}

impl Index {
    /// The linux/amd64 entry (the only platform Hearth runs).
    pub fn amd64(&self) -> Result<&Descriptor, ManifestError> {
        self.manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| {
                let have: Vec<String> = self
                    .manifests
                    .iter()
                    .map(|d| match &d.platform {
                        Some(p) => format!("{}/{}", p.os, p.architecture),
                        None => "unknown".to_owned(),
                    })
                    .collect();
                ManifestError::NoPlatform(have.join(", "))
            })
    }
}

/// What an instance needs from the image config to start the workload; handed to hearth-init.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `ENTRYPOINT`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `CMD` (arguments to the entrypoint, or the command when there is none).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `ENV` as `KEY=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WORKDIR` (empty: `/`).
    #[serde(default)]
    pub working_dir: String,
    /// `USER` (`name`, `uid`, `uid:gid`, …; empty: root).
    #[serde(default)]
    pub user: String,
    /// `EXPOSE`d ports.
    #[serde(default)]
    pub exposed_ports: Vec<ExposedPort>,
    /// `STOPSIGNAL`, when set.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Platform architecture the config states.
    #[serde(default)]
    pub architecture: String,
    /// Platform OS the config states.
    #[serde(default)]
    pub os: String,
    /// The layers' uncompressed digests (`rootfs.diff_ids`), base first.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// One `EXPOSE`d port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedPort {
    /// Port number.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
}

/// Transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Parses an OCI/Docker image config blob into what Hearth uses.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, ManifestError> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase", default)]
    struct Runtime {
        entrypoint: Option<Vec<String>>,
        cmd: Option<Vec<String>>,
        env: Option<Vec<String>>,
        working_dir: Option<String>,
        user: Option<String>,
        exposed_ports: Option<BTreeMap<String, serde::de::IgnoredAny>>,
        stop_signal: Option<String>,
        labels: Option<BTreeMap<String, String>>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct RootFs {
        diff_ids: Vec<Digest>,
    }
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        os: String,
        #[serde(default)]
        config: Option<Runtime>,
        #[serde(default)]
        rootfs: RootFs,
    }
    let raw: Raw = json("image config", bytes)?;
    let rt = raw.config.unwrap_or_default();
    let mut exposed_ports = Vec::new();
    for key in rt.exposed_ports.unwrap_or_default().into_keys() {
        let (port, proto) = key.split_once('/').unwrap_or((&key, "tcp"));
        let protocol = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            // SCTP and friends cannot reach an instance through Hearth's ingress: ignore.
            _ => continue,
        };
        if let Ok(port) = port.parse() {
            exposed_ports.push(ExposedPort { port, protocol });
        }
    }
    Ok(ImageConfig {
        entrypoint: rt.entrypoint.unwrap_or_default(),
        cmd: rt.cmd.unwrap_or_default(),
        env: rt.env.unwrap_or_default(),
        working_dir: rt.working_dir.unwrap_or_default(),
        user: rt.user.unwrap_or_default(),
        exposed_ports,
        stop_signal: rt.stop_signal.filter(|s| !s.is_empty()),
        labels: rt.labels.unwrap_or_default(),
        architecture: raw.architecture,
        os: raw.os,
        diff_ids: raw.rootfs.diff_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_manifest_and_index() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":10}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{D}","size":5}}]}}"#
        );
        assert!(matches!(
            parse_manifest("", m.as_bytes()),
            Ok(Parsed::Manifest(_))
        ));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Ok(Parsed::Index(i)) = parse_manifest(OCI_INDEX, i.as_bytes()) else {
            panic!("not an index")
        };
        assert_eq!(i.amd64().unwrap().size, 2);
    }

    #[test]
    fn rejects_schema1_and_odd_layers() {
        let s1 = r#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#;
        assert!(matches!(
            parse_manifest("", s1.as_bytes()),
            Err(ManifestError::MediaType(_))
        ));
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{D}","size":1}},
            "layers":[{{"mediaType":"application/x-weird","digest":"{D}","size":5}}]}}"#
        );
        assert!(matches!(
            parse_manifest(OCI_MANIFEST, m.as_bytes()),
            Err(ManifestError::LayerMediaType(_))
        ));
    }

    #[test]
    fn parses_config() {
        let c = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/httpd"],
            "Cmd":["-f"],"Env":["A=b"],"WorkingDir":"/www","User":"1000:1000",
            "ExposedPorts":{"8080/tcp":{},"53/udp":{},"9/sctp":{}},"StopSignal":"SIGQUIT"},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = parse_config(c).unwrap();
        assert_eq!(c.entrypoint, ["/bin/httpd"]);
        assert_eq!(c.exposed_ports.len(), 2);
        assert_eq!(c.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(parse_config(b"{}").unwrap(), ImageConfig::default());
    }
}
