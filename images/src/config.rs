//! The cache's configuration. Every default is documented here, in one place.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Configuration of an [`ImageCache`](crate::ImageCache).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory the cache owns (created when missing). Nothing else may write there.
    pub root: PathBuf,
    /// Disk budget in bytes for blobs plus rootfs images; `0` means no limit. Default: 0.
    #[serde(default)]
    pub disk_budget_bytes: u64,
    /// File system of the rootfs block images. Default: erofs.
    #[serde(default)]
    pub rootfs_format: RootfsFormat,
    /// Layers downloaded at once per pull. Default: 4.
    #[serde(default = "default_concurrent_layers")]
    pub concurrent_layers: usize,
    /// Attempts per registry request before giving up (network errors, 5xx, 429). Default: 4.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Delay before the first retry; doubles each time. Default: 200 ms.
    #[serde(default = "default_backoff", with = "duration_ms")]
    pub backoff: Duration,
    /// Timeout for connecting to a registry. Default: 10 s.
    #[serde(default = "default_connect_timeout", with = "duration_ms")]
    pub connect_timeout: Duration,
    /// Per-registry settings, keyed by `host[:port]` as written in references.
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
    /// A tmpfs to unpack layers in before mkfs (the cache's own subdirectory of it, cleared
    /// when the cache opens and closes). The unpacked tree only lives until mkfs has read it,
    /// and thousands of files on a disk file system cost inode allocation and writeback. Used
    /// when it is a tmpfs and the image's estimated unpacked size (4 × compressed) fits
    /// `staging_tmpfs_max_bytes`, the tmpfs's free space and half the available memory;
    /// otherwise, and when it fills up during a pull, layers are unpacked in the cache's
    /// `tmp/`. `null` always uses `tmp/`. Default: `/dev/shm`.
    #[serde(default = "default_staging_tmpfs")]
    pub staging_tmpfs: Option<PathBuf>,
    /// Largest estimated unpacked image staged on the tmpfs. Default: 4 GiB.
    #[serde(default = "default_staging_tmpfs_max_bytes")]
    pub staging_tmpfs_max_bytes: u64,
    /// Bytes of unpacked layer-chain trees kept (next to the staging trees, so on the tmpfs
    /// when that is used) for later pulls of images that share those base layers;
    /// least recently used go first; `0` keeps none. Default: 1 GiB.
    #[serde(default = "default_layer_tree_cache_bytes")]
    pub layer_tree_cache_bytes: u64,
}

/// Settings for one registry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Use plain HTTP. Only for registries configured here as insecure; default: false (HTTPS).
    #[serde(default)]
    pub insecure: bool,
    /// Extra PEM CA certificates trusted for this registry (on top of the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Credentials for basic auth and for the token service of bearer auth.
    #[serde(default)]
    pub credentials: Option<Credentials>,
}

/// A user name and password.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, e.g. in a config dump.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// File system of rootfs block images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsFormat {
    /// `mkfs.erofs DIR` (read-only, compact; the default).
    #[default]
    Erofs,
    /// `mkfs.ext4 -d DIR`.
    Ext4,
}

impl RootfsFormat {
    /// File name of the image inside an image's cache directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Erofs => "rootfs.erofs",
            Self::Ext4 => "rootfs.ext4",
        }
    }
}

fn default_concurrent_layers() -> usize {
    4
}
fn default_attempts() -> u32 {
    4
}
fn default_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_staging_tmpfs() -> Option<PathBuf> {
    Some(PathBuf::from("/dev/shm"))
}
fn default_staging_tmpfs_max_bytes() -> u64 {
    4 << 30
}
fn default_layer_tree_cache_bytes() -> u64 {
    1 << 30
}

impl CacheConfig {
    /// A configuration with every default, rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            disk_budget_bytes: 0,
            rootfs_format: RootfsFormat::default(),
            concurrent_layers: default_concurrent_layers(),
            attempts: default_attempts(),
            backoff: default_backoff(),
            connect_timeout: default_connect_timeout(),
            registries: BTreeMap::new(),
            staging_tmpfs: default_staging_tmpfs(),
            staging_tmpfs_max_bytes: default_staging_tmpfs_max_bytes(),
            layer_tree_cache_bytes: default_layer_tree_cache_bytes(),
        }
    }

    /// Adds settings for `registry` (`host[:port]`).
    pub fn registry(mut self, registry: impl Into<String>, config: RegistryConfig) -> Self {
        self.registries.insert(registry.into(), config);
        self
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: CacheConfig = serde_json::from_str(r#"{"root":"/var/lib/hearth/images"}"#).unwrap();
        assert_eq!(c.concurrent_layers, 4);
        assert_eq!(c.rootfs_format, RootfsFormat::Erofs);
        assert_eq!(
            c.staging_tmpfs.as_deref(),
            Some(std::path::Path::new("/dev/shm"))
        );
        let c: CacheConfig = serde_json::from_str(r#"{"root":"/x","staging_tmpfs":null}"#).unwrap();
        assert_eq!(c.staging_tmpfs, None);
        assert!(serde_json::from_str::<CacheConfig>(r#"{"root":"/x","bogus":1}"#).is_err());
        let creds = Credentials {
            username: "u".into(),
            password: "secret".into(),
        };
        assert!(!format!("{creds:?}").contains("secret"));
    }
}
