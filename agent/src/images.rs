//! The image cache as the agent sees it: an [`ImageCache`] trait over `hearth-images`, so the
//! lifecycle does not depend on how images are pulled and stored.

use std::path::PathBuf;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::model::pb;

/// The parts of an image's OCI config that hearth-init needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// ENV, `KEY=VALUE`.
    pub env: Vec<String>,
    /// WORKDIR.
    pub working_dir: String,
    /// USER.
    pub user: String,
    /// EXPOSED ports (TCP).
    pub exposed_ports: Vec<u32>,
}

/// An image ready to boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedImage {
    /// The reference it was resolved from.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// The read-only root filesystem image file.
    pub rootfs: PathBuf,
    /// Its filesystem type ("erofs" or "ext4").
    pub fstype: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// The config.
    pub config: ImageConfig,
}

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The registry does not have it (or it is not in the cache, for a lookup-only call).
    #[error("Image {0} not found")]
    NotFound(String),
    /// The reference is malformed.
    #[error("Invalid image reference {0:?}")]
    Invalid(String),
    /// An instance uses it.
    #[error("Image {0} is in use by an instance")]
    InUse(String),
    /// The pull or build failed.
    #[error("Pulling image {reference} failed")]
    Pull {
        /// The image.
        reference: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The cache itself failed.
    #[error("Image cache failed")]
    Cache(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Progress messages of a pull, in the API's shape.
pub type ProgressSender = mpsc::UnboundedSender<pb::PullProgress>;

/// An image cache.
pub trait ImageCache: Send + Sync {
    /// The cached image for `reference`, without any network access.
    fn lookup(&self, reference: &str) -> Result<Option<ResolvedImage>, ImageError>;
    /// Pulls (or finds) `reference`, sending progress while it runs.
    fn pull<'a>(
        &'a self,
        reference: &'a str,
        progress: Option<ProgressSender>,
    ) -> BoxFuture<'a, Result<ResolvedImage, ImageError>>;
    /// Every cached image.
    fn list(&self) -> Result<Vec<pb::ImageInfo>, ImageError>;
    /// Removes an image (fails with [`ImageError::InUse`] while pinned).
    fn remove(&self, reference: &str) -> Result<(), ImageError>;
    /// Keeps an image from eviction and removal (one pin per instance using it).
    fn pin(&self, digest: &str) -> Result<(), ImageError>;
    /// Releases one pin.
    fn unpin(&self, digest: &str) -> Result<(), ImageError>;
}

/// [`ImageCache`] over the `hearth-images` cache.
pub struct HearthImages {
    cache: hearth_images::ImageCache,
    // One lease per instance using an image: the cache never evicts or removes it meanwhile.
    leases: std::sync::Mutex<std::collections::HashMap<String, Vec<hearth_images::ImageLease>>>,
}

impl std::fmt::Debug for HearthImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HearthImages").finish_non_exhaustive()
    }
}

fn parse_ref(reference: &str) -> Result<hearth_images::Reference, ImageError> {
    reference
        .parse()
        .map_err(|_| ImageError::Invalid(reference.to_owned()))
}

fn nanos_of(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn resolved(reference: &str, img: &hearth_images::CachedImage) -> ResolvedImage {
    let c = &img.config;
    ResolvedImage {
        reference: reference.to_owned(),
        digest: img.manifest_digest.to_string(),
        rootfs: img.rootfs_path.clone(),
        fstype: match img.rootfs_format {
            hearth_images::RootfsFormat::Erofs => "erofs".into(),
            hearth_images::RootfsFormat::Ext4 => "ext4".into(),
        },
        size_bytes: img.rootfs_size,
        config: ImageConfig {
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
            exposed_ports: c
                .exposed_ports
                .iter()
                .filter(|p| p.protocol == hearth_images::Protocol::Tcp)
                .map(|p| u32::from(p.port))
                .collect(),
        },
    }
}

fn is_not_found(e: &hearth_images::PullError) -> bool {
    use hearth_images::registry::RegistryError as R;
    match e {
        hearth_images::PullError::Registry(R::NotFound { .. }) => true,
        hearth_images::PullError::Registry(R::Status { status, .. }) => status.as_u16() == 404,
        _ => false,
    }
}

impl HearthImages {
    /// Opens the cache from the agent's config.
    pub fn open(cfg: &crate::config::Config) -> Result<Self, ImageError> {
        let mut c = hearth_images::CacheConfig::new(cfg.images_dir());
        c.disk_budget_bytes = cfg.images.budget_bytes;
        c.staging_tmpfs =
            Some(cfg.images.staging_tmpfs.clone()).filter(|p| !p.as_os_str().is_empty());
        c.staging_tmpfs_max_bytes = cfg.images.staging_tmpfs_max_bytes;
        c.layer_tree_cache_bytes = cfg.images.layer_tree_cache_bytes;
        for r in &cfg.images.insecure_registries {
            c = c.registry(
                r.clone(),
                hearth_images::RegistryConfig {
                    insecure: true,
                    ..Default::default()
                },
            );
        }
        let cache =
            hearth_images::ImageCache::open(c).map_err(|e| ImageError::Cache(Box::new(e)))?;
        Ok(Self {
            cache,
            leases: Default::default(),
        })
    }
}

/// Turns the cache's pull events into the API's progress messages.
struct ProgressMapper {
    reference: String,
    layers: Vec<pb::LayerProgress>,
}

impl ProgressMapper {
    fn map(&mut self, ev: hearth_images::PullEvent) -> pb::PullProgress {
        use hearth_images::PullEvent as E;
        let layer = |l: &hearth_images::LayerProgress| pb::LayerProgress {
            digest: l.digest.to_string(),
            done_bytes: l.done,
            total_bytes: l.total,
            complete: l.done >= l.total,
        };
        let phase = match &ev {
            E::Resolved { layers, .. } => {
                self.layers = layers.iter().map(layer).collect();
                "resolving"
            }
            E::Bytes {
                layer: i, progress, ..
            } => {
                if let Some(l) = self.layers.get_mut(*i) {
                    *l = layer(progress);
                }
                "downloading"
            }
            E::Unpacking { .. } => "unpacking",
            E::BuildingRootfs => "building",
            E::Ready { .. } => "ready",
        };
        pb::PullProgress {
            reference: self.reference.clone(),
            phase: phase.into(),
            layers: self.layers.clone(),
            done_bytes: self.layers.iter().map(|l| l.done_bytes).sum(),
            total_bytes: self.layers.iter().map(|l| l.total_bytes).sum(),
            done: false,
            image: None,
        }
    }
}

impl ImageCache for HearthImages {
    fn lookup(&self, reference: &str) -> Result<Option<ResolvedImage>, ImageError> {
        let r = parse_ref(reference)?;
        Ok(self.cache.lookup(&r).map(|i| resolved(reference, &i)))
    }

    fn pull<'a>(
        &'a self,
        reference: &'a str,
        progress: Option<ProgressSender>,
    ) -> BoxFuture<'a, Result<ResolvedImage, ImageError>> {
        Box::pin(async move {
            let r = parse_ref(reference)?;
            let mapper = std::sync::Mutex::new(ProgressMapper {
                reference: reference.to_owned(),
                layers: Vec::new(),
            });
            let cb = move |ev: hearth_images::PullEvent| {
                if let Some(tx) = &progress {
                    let msg = mapper.lock().unwrap_or_else(|e| e.into_inner()).map(ev);
                    let _ = tx.send(msg);
                }
            };
            match self.cache.prefetch(&r, &cb).await {
                Ok(img) => Ok(resolved(reference, &img)),
                Err(e) if is_not_found(&e) => Err(ImageError::NotFound(reference.to_owned())),
                Err(e) => Err(ImageError::Pull {
                    reference: reference.to_owned(),
                    source: Box::new(e),
                }),
            }
        })
    }

    fn list(&self) -> Result<Vec<pb::ImageInfo>, ImageError> {
        Ok(self
            .cache
            .list()
            .into_iter()
            .map(|i| pb::ImageInfo {
                reference: i.references.first().cloned().unwrap_or_default(),
                digest: i.manifest_digest.to_string(),
                size_bytes: i.rootfs_size + i.compressed_size,
                last_used_unix_nanos: nanos_of(i.last_used),
                pinned: i.pinned,
                in_use: i.in_use as u32,
            })
            .collect())
    }

    fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let r = parse_ref(reference)?;
        self.cache.remove(&r).map_err(|e| match e {
            hearth_images::RemoveError::NotFound(_) => ImageError::NotFound(reference.to_owned()),
            hearth_images::RemoveError::InUse { .. } => ImageError::InUse(reference.to_owned()),
            e => ImageError::Cache(Box::new(e)),
        })
    }

    fn pin(&self, digest: &str) -> Result<(), ImageError> {
        let d: hearth_images::Digest = digest
            .parse()
            .map_err(|_| ImageError::Invalid(digest.to_owned()))?;
        let lease = self
            .cache
            .acquire(&d)
            .ok_or_else(|| ImageError::NotFound(digest.to_owned()))?;
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.to_owned())
            .or_default()
            .push(lease);
        Ok(())
    }

    fn unpin(&self, digest: &str) -> Result<(), ImageError> {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = leases.get_mut(digest) {
            v.pop();
            if v.is_empty() {
                leases.remove(digest);
            }
        }
        Ok(())
    }
}
