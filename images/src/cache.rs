//! The image cache: the library API the agent uses (prefetch, lookup, list, remove, pin/unpin,
//! leases for images in use, eviction).
//!
//! A prefetch resolves the reference (an index to its linux/amd64 manifest), downloads the
//! config and layers concurrently into the blob store (each blob verified while it streams,
//! and downloaded once however many pulls want it at the same time), applies the layers in
//! order as they arrive (in a staging tree on a tmpfs when there is room, starting from the
//! kept tree of the longest prefix of its layers another pull unpacked: see `staging`), builds
//! the rootfs block image, and records the image in the index.
//! The image's directory appears by one rename and its index record by one transaction, after
//! everything it needs is on disk: a crash at any point leaves either no trace or a complete
//! image.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::BodyExt as _;
use tokio::sync::{Semaphore, watch};

use crate::{
    config::{CacheConfig, RootfsFormat},
    digest::Digest,
    evict,
    index::{ImageRecord, Index, IndexError, LayerRecord},
    manifest::{self, Compression, Descriptor, ImageConfig, ManifestError, Parsed},
    progress::{LayerProgress, PullEvent},
    reference::Reference,
    registry::{RegistryClient, RegistryError},
    rootfs::{self, RootfsError},
    staging::{self, Area, Staging},
    store::{self, BlobStore, StoreError},
    sys,
    unpack::{self, UnpackError, UnpackOptions},
};

/// How often progress is reported while bytes flow.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Bytes between updates of a download's shared state.
const PUBLISH_EVERY: u64 = 256 << 10;
/// Name of the image config file next to the rootfs image.
const CONFIG_FILE: &str = "config.json";

/// Why the cache could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process has the cache directory open.
    #[error("Image cache {} is in use by another process", .0.display())]
    Locked(PathBuf, #[source] std::io::Error),
    /// A file operation failed.
    #[error("Cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The blob store could not be opened.
    #[error("Cannot open the blob store")]
    Store(#[from] StoreError),
    /// The index could not be opened.
    #[error("Cannot open the image index")]
    Index(#[from] IndexError),
}

/// Why a prefetch failed. Nothing partial is left behind by a failed pull.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Talking to the registry failed.
    #[error("Registry request failed")]
    Registry(#[from] RegistryError),
    /// A manifest or config is unusable.
    #[error("Image {reference} is unusable")]
    Manifest {
        /// The reference.
        reference: String,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// The image is not for linux/amd64.
    #[error("Image {reference} is for {os}/{architecture}; Hearth runs linux/amd64")]
    Platform {
        /// The reference.
        reference: String,
        /// Its OS.
        os: String,
        /// Its architecture.
        architecture: String,
    },
    /// Storing a blob failed (including digest and size mismatches).
    #[error("Blob {digest} was not stored")]
    Blob {
        /// The blob.
        digest: Digest,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// A download another pull started (and this one waited for) failed.
    #[error("Download of blob {digest} failed")]
    Download {
        /// The blob.
        digest: Digest,
        /// The download's error.
        #[source]
        source: Arc<PullError>,
    },
    /// Applying a layer failed.
    #[error("Layer {layer} ({digest}) cannot be applied")]
    Unpack {
        /// Index of the layer (base = 0).
        layer: usize,
        /// Its digest.
        digest: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// Building the rootfs image failed.
    #[error("Building the rootfs image failed")]
    Rootfs(#[from] RootfsError),
    /// The index could not be updated.
    #[error("Recording the image failed")]
    Index(#[from] IndexError),
    /// A file operation failed.
    #[error("Cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A worker task died (a bug).
    #[error("A pull worker failed: {0}")]
    Worker(String),
}

impl PullError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Registry(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Why removing, pinning or unpinning failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// No such image or reference in the cache.
    #[error("{0} is not in the image cache")]
    NotFound(String),
    /// The image is pinned or used by an instance.
    #[error("Image {digest} is {why}; it cannot be removed")]
    InUse {
        /// The image.
        digest: Digest,
        /// `pinned` or `in use by N instances`.
        why: String,
    },
    /// The index could not be updated.
    #[error("Updating the image index failed")]
    Index(#[from] IndexError),
    /// Deleting files failed.
    #[error("Cannot delete {}", path.display())]
    Io {
        /// What could not be deleted.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Why eviction failed.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// Listing or deleting blobs failed.
    #[error("Blob store failed during eviction")]
    Store(#[from] StoreError),
    /// The index could not be updated.
    #[error("Updating the image index failed")]
    Index(#[from] IndexError),
}

/// A cached image, ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    /// Manifest digest (for an index: of the linux/amd64 manifest).
    pub manifest_digest: Digest,
    /// Config blob digest.
    pub config_digest: Digest,
    /// References that resolve to it.
    pub references: Vec<String>,
    /// Layers, base first.
    pub layers: Vec<LayerRecord>,
    /// What the workload needs: entrypoint, cmd, env, workdir, user, exposed ports, …
    pub config: ImageConfig,
    /// The read-only rootfs block image.
    pub rootfs_path: PathBuf,
    /// Its file system.
    pub rootfs_format: RootfsFormat,
    /// Its size in bytes.
    pub rootfs_size: u64,
    /// Sum of the compressed layer sizes.
    pub compressed_size: u64,
    /// When it was pulled.
    pub pulled_at: SystemTime,
    /// Last prefetch, lookup or lease.
    pub last_used: SystemTime,
    /// Pinned (e.g. by the warm pool): never evicted.
    pub pinned: bool,
    /// Leases held by instances: never evicted while > 0.
    pub in_use: usize,
}

/// Counters of what the cache did since it opened.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Blob downloads started (retries count again).
    pub blob_downloads: AtomicU64,
    /// Blob bytes received.
    pub bytes_downloaded: AtomicU64,
    /// Prefetches that built an image.
    pub images_built: AtomicU64,
    /// Prefetches answered from the cache.
    pub cache_hits: AtomicU64,
    /// Images evicted.
    pub images_evicted: AtomicU64,
}

/// What an eviction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    /// Images removed.
    pub images: Vec<Digest>,
    /// Blobs removed.
    pub blobs: Vec<Digest>,
    /// Bytes in use before.
    pub before: u64,
    /// Bytes in use after.
    pub after: u64,
}

/// State of one blob download, shared by every pull that needs the blob.
#[derive(Clone)]
enum FetchState {
    Running { done: u64 },
    Done { cached: bool },
    Failed(Arc<PullError>),
}

struct Entry {
    record: ImageRecord,
    in_use: usize,
    /// `last_used_ms` changed in memory since it was last written to the index.
    dirty: bool,
}

#[derive(Default)]
struct State {
    images: HashMap<Digest, Entry>,
    refs: HashMap<String, Digest>,
    /// Blobs pulls in progress need, with how many pulls need each.
    busy_blobs: HashMap<Digest, usize>,
}

struct Inner {
    config: CacheConfig,
    tmp: PathBuf,
    images_dir: PathBuf,
    blobs: BlobStore,
    staging: Staging,
    index: Index,
    state: Mutex<State>,
    clients: Mutex<HashMap<String, Arc<RegistryClient>>>,
    downloads: Mutex<HashMap<Digest, watch::Receiver<FetchState>>>,
    builds: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    stats: CacheStats,
    _lock: fs::File,
}

/// The image cache. Cheap to clone; one per cache directory per host.
#[derive(Clone)]
pub struct ImageCache {
    inner: Arc<Inner>,
}

/// An image in use by an instance: while a lease is held the image is never evicted or
/// removed. Leases live in memory; after an agent restart, take them again for the instances
/// that still run.
pub struct ImageLease {
    inner: Arc<Inner>,
    image: CachedImage,
}

impl ImageLease {
    /// The leased image.
    pub fn image(&self) -> &CachedImage {
        &self.image
    }
}

impl Drop for ImageLease {
    fn drop(&mut self) {
        let mut state = self.inner.lock_state();
        if let Some(e) = state.images.get_mut(&self.image.manifest_digest) {
            e.in_use = e.in_use.saturating_sub(1);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn image_dir(&self, digest: &Digest) -> PathBuf {
        self.images_dir.join(digest.hex())
    }

    fn view(&self, e: &Entry) -> CachedImage {
        let r = &e.record;
        CachedImage {
            manifest_digest: r.manifest_digest.clone(),
            config_digest: r.config_digest.clone(),
            references: r.references.iter().cloned().collect(),
            layers: r.layers.clone(),
            config: r.config.clone(),
            rootfs_path: self
                .image_dir(&r.manifest_digest)
                .join(r.rootfs_format.file_name()),
            rootfs_format: r.rootfs_format,
            rootfs_size: r.rootfs_size,
            compressed_size: r.compressed_size(),
            pulled_at: from_ms(r.pulled_at_ms),
            last_used: from_ms(r.last_used_ms),
            pinned: r.pinned,
            in_use: e.in_use,
        }
    }

    /// Writes in-memory last-use times to the index.
    fn flush(&self) -> Result<(), IndexError> {
        let mut state = self.lock_state();
        let dirty: Vec<ImageRecord> = state
            .images
            .values()
            .filter(|e| e.dirty)
            .map(|e| e.record.clone())
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        self.index.put(&dirty.iter().collect::<Vec<_>>(), &[])?;
        for e in state.images.values_mut() {
            e.dirty = false;
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cannot save image last-use times");
        }
    }
}

/// Releases a pull's claim on blobs (so eviction may consider them again).
struct BusyGuard<'a> {
    inner: &'a Inner,
    blobs: Vec<Digest>,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.inner.lock_state();
        for b in &self.blobs {
            if let Some(n) = state.busy_blobs.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    state.busy_blobs.remove(b);
                }
            }
        }
    }
}

/// Removes a build's directories when a pull ends, in the background (they can be large).
struct BuildDir(Vec<PathBuf>);

impl Drop for BuildDir {
    fn drop(&mut self) {
        let dirs = std::mem::take(&mut self.0);
        std::thread::spawn(move || {
            for dir in dirs {
                let _ = fs::remove_dir_all(dir);
            }
        });
    }
}

/// Whether `e` comes from a full file system.
fn no_space(e: &PullError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && (io.raw_os_error() == Some(libc::ENOSPC)
                || io.kind() == std::io::ErrorKind::StorageFull)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Reports progress for the layers of one pull.
struct Tracker<'a> {
    emit: &'a (dyn Fn(PullEvent) + Send + Sync),
    layers: Vec<LayerProgress>,
    rxs: Vec<watch::Receiver<FetchState>>,
}

impl Tracker<'_> {
    fn poll(&mut self) {
        let mut changed = Vec::new();
        for (i, rx) in self.rxs.iter().enumerate() {
            let done = match &*rx.borrow() {
                FetchState::Running { done } => *done,
                FetchState::Done { .. } => self.layers[i].total,
                FetchState::Failed(_) => continue,
            };
            if done != self.layers[i].done {
                self.layers[i].done = done;
                changed.push(i);
            }
        }
        let total: u64 = self.layers.iter().map(|l| l.total).sum();
        let done: u64 = self.layers.iter().map(|l| l.done).sum();
        for i in changed {
            (self.emit)(PullEvent::Bytes {
                layer: i,
                progress: self.layers[i].clone(),
                done,
                total,
            });
        }
    }

    /// Runs `fut` to completion, reporting download progress meanwhile.
    async fn drive<T>(&mut self, fut: impl Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => {
                    self.poll();
                    return out;
                }
                _ = tick.tick() => self.poll(),
            }
        }
    }
}

async fn wait_done(
    digest: &Digest,
    mut rx: watch::Receiver<FetchState>,
) -> Result<bool, PullError> {
    loop {
        match &*rx.borrow_and_update() {
            FetchState::Done { cached } => return Ok(*cached),
            FetchState::Failed(e) => {
                return Err(PullError::Download {
                    digest: digest.clone(),
                    source: e.clone(),
                });
            }
            FetchState::Running { .. } => {}
        }
        if rx.changed().await.is_err() {
            // The sender is gone: its last value is final.
            return match &*rx.borrow() {
                FetchState::Done { cached } => Ok(*cached),
                FetchState::Failed(e) => Err(PullError::Download {
                    digest: digest.clone(),
                    source: e.clone(),
                }),
                FetchState::Running { .. } => Err(PullError::Worker(format!(
                    "the download of {digest} ended without a result"
                ))),
            };
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PullError::Worker(e.to_string()))
}

impl ImageCache {
    /// Opens the cache at `config.root` (creating it), takes ownership of the directory (one
    /// process at a time), clears leftovers of interrupted pulls and loads the index.
    pub fn open(config: CacheConfig) -> Result<Self, OpenError> {
        let root = config.root.clone();
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::Io { what, path, source }
        };
        fs::create_dir_all(&root).map_err(io("create", &root))?;
        let lock_path = root.join("lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        sys::try_lock_exclusive(&lock_file).map_err(|e| OpenError::Locked(root.clone(), e))?;

        // Whatever is in tmp/ belongs to pulls that did not finish. It can be a large tree:
        // move it aside (one rename) and delete it in the background.
        let tmp = root.join("tmp");
        if tmp.exists() {
            let old = root.join(store::temp_name("tmp.old"));
            fs::rename(&tmp, &old).map_err(io("move aside", &tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        let stale: Vec<PathBuf> = fs::read_dir(&root)
            .map_err(io("list", &root))?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("tmp.old-"))
            .map(|e| e.path())
            .collect();
        if !stale.is_empty() {
            std::thread::spawn(move || {
                for dir in stale {
                    let _ = fs::remove_dir_all(dir);
                }
            });
        }
        let images_dir = root.join("images");
        fs::create_dir_all(&images_dir).map_err(io("create", &images_dir))?;
        let blobs = BlobStore::open(&root, &tmp)?;
        let staging = Staging::open(&config, &root, &tmp);
        let index = Index::open(&root.join("index.redb"))?;

        let (records, refs) = index.load()?;
        let mut state = State::default();
        let mut lost = Vec::new();
        for record in records {
            let rootfs = images_dir
                .join(record.manifest_digest.hex())
                .join(record.rootfs_format.file_name());
            if rootfs.is_file() {
                state.images.insert(
                    record.manifest_digest.clone(),
                    Entry {
                        record,
                        in_use: 0,
                        dirty: false,
                    },
                );
            } else {
                tracing::warn!(image = %record.manifest_digest, "rootfs image missing; forgetting the image");
                lost.push(record.manifest_digest);
            }
        }
        let mut dangling = Vec::new();
        for (name, digest) in refs {
            if state.images.contains_key(&digest) {
                state.refs.insert(name, digest);
            } else {
                dangling.push(name);
            }
        }
        if !lost.is_empty() || !dangling.is_empty() {
            index.delete(
                &lost.iter().collect::<Vec<_>>(),
                &dangling.iter().map(String::as_str).collect::<Vec<_>>(),
            )?;
        }
        // Image directories without a record: a crash between rename and index commit.
        for entry in fs::read_dir(&images_dir).map_err(io("list", &images_dir))? {
            let entry = entry.map_err(io("list", &images_dir))?;
            let known = format!("sha256:{}", entry.file_name().to_string_lossy())
                .parse::<Digest>()
                .is_ok_and(|d| state.images.contains_key(&d));
            if !known {
                let p = entry.path();
                fs::remove_dir_all(&p).map_err(io("remove", &p))?;
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                tmp,
                images_dir,
                blobs,
                staging,
                index,
                state: Mutex::new(state),
                clients: Mutex::new(HashMap::new()),
                downloads: Mutex::new(HashMap::new()),
                builds: Mutex::new(HashMap::new()),
                stats: CacheStats::default(),
                _lock: lock_file,
            }),
        })
    }

    /// The cache's configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Counters since the cache opened.
    pub fn stats(&self) -> &CacheStats {
        &self.inner.stats
    }

    /// The blob store (read access: paths, sizes, verification).
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// Looks up a cached image without touching the network (`name:tag`, `name@digest`, or a
    /// manifest digest in `name@digest` form). Marks it used.
    pub fn lookup(&self, reference: &Reference) -> Option<CachedImage> {
        let key = reference.to_string();
        let mut state = self.inner.lock_state();
        let digest = match state.refs.get(&key) {
            Some(d) => d.clone(),
            None => {
                let d: Digest = reference.digest.as_ref()?.parse().ok()?;
                if !state.images.contains_key(&d) {
                    return None;
                }
                d
            }
        };
        let e = state.images.get_mut(&digest)?;
        e.record.last_used_ms = now_ms();
        e.dirty = true;
        Some(self.inner.view(e))
    }

    /// The cached image with this manifest digest (does not mark it used).
    pub fn get(&self, manifest_digest: &Digest) -> Option<CachedImage> {
        let state = self.inner.lock_state();
        state
            .images
            .get(manifest_digest)
            .map(|e| self.inner.view(e))
    }

    /// Every cached image, most recently used first.
    pub fn list(&self) -> Vec<CachedImage> {
        let state = self.inner.lock_state();
        let mut out: Vec<CachedImage> = state.images.values().map(|e| self.inner.view(e)).collect();
        out.sort_by_key(|i| std::cmp::Reverse(i.last_used));
        out
    }

    /// Takes a lease on a cached image for an instance (see [`ImageLease`]).
    pub fn acquire(&self, manifest_digest: &Digest) -> Option<ImageLease> {
        let mut state = self.inner.lock_state();
        let e = state.images.get_mut(manifest_digest)?;
        e.in_use += 1;
        e.record.last_used_ms = now_ms();
        e.dirty = true;
        let image = self.inner.view(e);
        Some(ImageLease {
            inner: self.inner.clone(),
            image,
        })
    }

    /// Pins an image (persistently): it is never evicted or removed until unpinned.
    pub fn pin(&self, manifest_digest: &Digest) -> Result<(), RemoveError> {
        self.set_pinned(manifest_digest, true)
    }

    /// Unpins an image.
    pub fn unpin(&self, manifest_digest: &Digest) -> Result<(), RemoveError> {
        self.set_pinned(manifest_digest, false)
    }

    fn set_pinned(&self, digest: &Digest, pinned: bool) -> Result<(), RemoveError> {
        let mut state = self.inner.lock_state();
        let e = state
            .images
            .get_mut(digest)
            .ok_or_else(|| RemoveError::NotFound(digest.to_string()))?;
        let mut record = e.record.clone();
        record.pinned = pinned;
        self.inner.index.put(&[&record], &[])?;
        e.record = record;
        e.dirty = false;
        Ok(())
    }

    /// Removes a reference; the image goes too when no reference is left. A reference by
    /// manifest digest (`name@sha256:…`) removes the image with all its references. Blobs no
    /// other image uses are deleted. Pinned and in-use images are refused and nothing changes.
    pub fn remove(&self, reference: &Reference) -> Result<(), RemoveError> {
        let key = reference.to_string();
        let mut state = self.inner.lock_state();
        let (digest, whole) = match state.refs.get(&key) {
            Some(d) => (d.clone(), false),
            None => match reference
                .digest
                .as_ref()
                .and_then(|d| d.parse::<Digest>().ok())
            {
                Some(d) if state.images.contains_key(&d) => (d, true),
                _ => return Err(RemoveError::NotFound(key)),
            },
        };
        let e = &state.images[&digest];
        let goes = whole || e.record.references.iter().all(|r| *r == key);
        if !goes {
            let mut record = e.record.clone();
            record.references.remove(&key);
            self.inner.index.put(&[&record], &[])?;
            self.inner.index.delete(&[], &[&key])?;
            state.refs.remove(&key);
            state.images.get_mut(&digest).expect("present").record = record;
            return Ok(());
        }
        if e.record.pinned || e.in_use > 0 {
            return Err(RemoveError::InUse {
                digest,
                why: if e.record.pinned {
                    "pinned".into()
                } else {
                    format!("in use by {} instances", e.in_use)
                },
            });
        }
        let refs: Vec<String> = e.record.references.iter().cloned().collect();
        self.inner.index.delete(
            &[&digest],
            &refs.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        let removed = state.images.remove(&digest).expect("present");
        for r in &refs {
            state.refs.remove(r);
        }
        let dir = self.inner.image_dir(&digest);
        fs::remove_dir_all(&dir).map_err(|source| RemoveError::Io {
            path: dir.clone(),
            source,
        })?;
        // Blobs only this image used (and no pull needs right now) go too.
        let kept: HashSet<&Digest> = state
            .images
            .values()
            .flat_map(|e| {
                std::iter::once(&e.record.config_digest)
                    .chain(e.record.layers.iter().map(|l| &l.digest))
            })
            .chain(state.busy_blobs.keys())
            .collect();
        let own = std::iter::once(&removed.record.config_digest)
            .chain(removed.record.layers.iter().map(|l| &l.digest));
        for b in own {
            if !kept.contains(b)
                && let Err(e) = self.inner.blobs.remove(b)
            {
                tracing::warn!(blob = %b, error = %e, "cannot delete blob");
            }
        }
        Ok(())
    }

    /// Writes last-use times kept in memory to the index (also done on every pull, eviction,
    /// and when the cache is dropped).
    pub fn flush(&self) -> Result<(), IndexError> {
        self.inner.flush()
    }

    /// Evicts down to the configured disk budget (no-op without one).
    pub fn evict(&self) -> Result<EvictReport, EvictError> {
        match self.inner.config.disk_budget_bytes {
            0 => Ok(EvictReport::default()),
            budget => self.evict_to(budget, None),
        }
    }

    /// Evicts least-recently-used images (never pinned, in-use or `keep`) and unreferenced
    /// blobs until the cache uses at most `budget` bytes, or nothing more may go. When over
    /// the budget, the kept unpacked layer trees no pull is using go too.
    pub fn evict_to(&self, budget: u64, keep: Option<&Digest>) -> Result<EvictReport, EvictError> {
        self.inner.flush()?;
        let mut state = self.inner.lock_state();
        let blob_sizes: HashMap<Digest, u64> = self.inner.blobs.list()?.into_iter().collect();
        let mut busy: HashSet<Digest> = state.busy_blobs.keys().cloned().collect();
        busy.extend(lock(&self.inner.downloads).keys().cloned());
        let candidates: Vec<evict::Candidate> = state
            .images
            .values()
            .map(|e| evict::Candidate {
                digest: e.record.manifest_digest.clone(),
                last_used: e.record.last_used_ms,
                protected: e.record.pinned
                    || e.in_use > 0
                    || Some(&e.record.manifest_digest) == keep,
                own_bytes: e.record.rootfs_size,
                blobs: std::iter::once(e.record.config_digest.clone())
                    .chain(e.record.layers.iter().map(|l| l.digest.clone()))
                    .collect(),
            })
            .collect();
        let plan = evict::plan(&candidates, &blob_sizes, &busy, budget);
        if plan.before > budget {
            // Kept layer trees only speed up pulls: they go first under pressure.
            let trees = self.inner.staging.drop_unused_trees();
            if trees > 0 {
                tracing::info!(trees, "dropped kept layer trees");
            }
        }
        if !plan.images.is_empty() {
            let refs: Vec<String> = plan
                .images
                .iter()
                .flat_map(|d| state.images[d].record.references.iter().cloned())
                .collect();
            self.inner.index.delete(
                &plan.images.iter().collect::<Vec<_>>(),
                &refs.iter().map(String::as_str).collect::<Vec<_>>(),
            )?;
            for r in &refs {
                state.refs.remove(r);
            }
            for d in &plan.images {
                state.images.remove(d);
                let dir = self.inner.image_dir(d);
                if let Err(e) = fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot delete evicted image");
                }
                tracing::info!(image = %d, "evicted image");
            }
            self.inner
                .stats
                .images_evicted
                .fetch_add(plan.images.len() as u64, Ordering::Relaxed);
        }
        for b in &plan.blobs {
            self.inner.blobs.remove(b)?;
        }
        Ok(EvictReport {
            images: plan.images,
            blobs: plan.blobs,
            before: plan.before,
            after: plan.after,
        })
    }

    /// Bytes the cache uses: blobs plus rootfs images.
    pub fn disk_usage(&self) -> Result<u64, StoreError> {
        let blobs: u64 = self.inner.blobs.list()?.iter().map(|(_, s)| s).sum();
        let state = self.inner.lock_state();
        Ok(blobs
            + state
                .images
                .values()
                .map(|e| e.record.rootfs_size)
                .sum::<u64>())
    }

    fn client(&self, registry: &str) -> Result<Arc<RegistryClient>, RegistryError> {
        let mut clients = lock(&self.inner.clients);
        if let Some(c) = clients.get(registry) {
            return Ok(c.clone());
        }
        let c = Arc::new(RegistryClient::new(registry, &self.inner.config)?);
        clients.insert(registry.to_owned(), c.clone());
        Ok(c)
    }

    /// Records that `key` names the cached image `digest` (moving the name from another image
    /// if it named one), marks it used and returns it; `None` when `digest` is not cached.
    fn adopt(&self, key: &str, digest: &Digest) -> Result<Option<CachedImage>, IndexError> {
        let mut state = self.inner.lock_state();
        if !state.images.contains_key(digest) {
            return Ok(None);
        }
        let mut changed = Vec::new();
        if let Some(old) = state.refs.get(key).cloned()
            && old != *digest
            && let Some(e) = state.images.get(&old)
        {
            let mut r = e.record.clone();
            r.references.remove(key);
            changed.push(r);
        }
        let e = &state.images[digest];
        let mut record = e.record.clone();
        record.references.insert(key.to_owned());
        record.last_used_ms = now_ms();
        changed.push(record);
        self.inner
            .index
            .put(&changed.iter().collect::<Vec<_>>(), &[(key, digest)])?;
        for r in changed {
            let d = r.manifest_digest.clone();
            let e = state.images.get_mut(&d).expect("present");
            e.record = r;
            e.dirty = false;
        }
        state.refs.insert(key.to_owned(), digest.clone());
        let view = self.inner.view(&state.images[digest]);
        Ok(Some(view))
    }

    /// Pulls an image (unless cached), verifies it, unpacks it and builds its rootfs image,
    /// reporting progress to `progress`. Concurrent prefetches of one image share the work.
    /// Evicts down to the disk budget afterwards (never the image just pulled).
    pub async fn prefetch(
        &self,
        reference: &Reference,
        progress: &(dyn Fn(PullEvent) + Send + Sync),
    ) -> Result<CachedImage, PullError> {
        let key = reference.to_string();
        let inner = &self.inner;
        if let Some(digest) = reference
            .digest
            .as_ref()
            .and_then(|d| d.parse::<Digest>().ok())
            && let Some(img) = self.adopt(&key, &digest)?
        {
            inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            progress(PullEvent::Ready {
                manifest_digest: digest,
                already_cached: true,
            });
            return Ok(img);
        }
        let client = self.client(&reference.registry)?;
        let repo = reference.repository.as_str();
        let what = reference
            .digest
            .clone()
            .or_else(|| reference.tag.clone())
            .unwrap_or_else(|| "latest".into());
        let unusable = |source| PullError::Manifest {
            reference: key.clone(),
            source,
        };
        let fetched = client.manifest(repo, &what).await?;
        let (manifest_digest, manifest) =
            match manifest::parse_manifest(&fetched.content_type, &fetched.bytes)
                .map_err(unusable)?
            {
                Parsed::Manifest(m) => (fetched.digest, m),
                Parsed::Index(index) => {
                    let entry = index.amd64().map_err(unusable)?;
                    let f = client.manifest(repo, entry.digest.as_str()).await?;
                    match manifest::parse_manifest(&f.content_type, &f.bytes).map_err(unusable)? {
                        Parsed::Manifest(m) => (f.digest, m),
                        Parsed::Index(_) => {
                            return Err(unusable(ManifestError::MediaType(
                                "an index inside an index".into(),
                            )));
                        }
                    }
                }
            };
        if let Some(img) = self.adopt(&key, &manifest_digest)? {
            inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            progress(PullEvent::Ready {
                manifest_digest,
                already_cached: true,
            });
            return Ok(img);
        }

        let build_lock = lock(&inner.builds)
            .entry(manifest_digest.clone())
            .or_default()
            .clone();
        let built = {
            let _guard = build_lock.lock().await;
            // Another prefetch may have built it while this one waited.
            match self.adopt(&key, &manifest_digest)? {
                Some(img) => {
                    inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    progress(PullEvent::Ready {
                        manifest_digest: manifest_digest.clone(),
                        already_cached: true,
                    });
                    Ok(img)
                }
                None => {
                    self.build(
                        &client,
                        reference,
                        &key,
                        &manifest_digest,
                        &manifest,
                        progress,
                    )
                    .await
                }
            }
        };
        {
            let mut builds = lock(&inner.builds);
            if Arc::strong_count(&build_lock) == 2 {
                builds.remove(&manifest_digest);
            }
        }
        let img = built?;
        if inner.config.disk_budget_bytes > 0
            && let Err(e) = self.evict_to(inner.config.disk_budget_bytes, Some(&manifest_digest))
        {
            tracing::warn!(error = %format!("{e:#}"), "eviction after pull failed");
        }
        Ok(img)
    }

    async fn build(
        &self,
        client: &Arc<RegistryClient>,
        reference: &Reference,
        key: &str,
        manifest_digest: &Digest,
        manifest: &manifest::Manifest,
        progress: &(dyn Fn(PullEvent) + Send + Sync),
    ) -> Result<CachedImage, PullError> {
        let inner = &self.inner;
        let repo = reference.repository.clone();
        let all_blobs: Vec<Digest> = std::iter::once(manifest.config.digest.clone())
            .chain(manifest.layers.iter().map(|l| l.digest.clone()))
            .collect();
        let _busy = {
            let mut state = inner.lock_state();
            for b in &all_blobs {
                *state.busy_blobs.entry(b.clone()).or_default() += 1;
            }
            BusyGuard {
                inner,
                blobs: all_blobs,
            }
        };
        let sem = Arc::new(Semaphore::new(inner.config.concurrent_layers.max(1)));
        let config_rx = self.fetch_blob(client, &repo, &manifest.config, &sem);
        let layer_rxs: Vec<_> = manifest
            .layers
            .iter()
            .map(|l| self.fetch_blob(client, &repo, l, &sem))
            .collect();
        let layers: Vec<LayerProgress> = manifest
            .layers
            .iter()
            .zip(&layer_rxs)
            .map(|(l, rx)| {
                let cached = matches!(&*rx.borrow(), FetchState::Done { cached: true });
                LayerProgress {
                    digest: l.digest.clone(),
                    done: if cached { l.size as u64 } else { 0 },
                    total: l.size as u64,
                    cached,
                }
            })
            .collect();
        progress(PullEvent::Resolved {
            reference: key.to_owned(),
            manifest_digest: manifest_digest.clone(),
            layers: layers.clone(),
        });
        let mut tracker = Tracker {
            emit: progress,
            layers,
            rxs: layer_rxs.clone(),
        };

        tracker
            .drive(wait_done(&manifest.config.digest, config_rx))
            .await?;
        let config_bytes = inner
            .blobs
            .read(&manifest.config.digest)
            .map_err(|source| PullError::Blob {
                digest: manifest.config.digest.clone(),
                source,
            })?;
        let config =
            manifest::parse_config(&config_bytes).map_err(|source| PullError::Manifest {
                reference: key.to_owned(),
                source,
            })?;
        if (!config.architecture.is_empty() && config.architecture != "amd64")
            || (!config.os.is_empty() && config.os != "linux")
        {
            return Err(PullError::Platform {
                reference: key.to_owned(),
                os: config.os.clone(),
                architecture: config.architecture.clone(),
            });
        }
        let diff_ids =
            (config.diff_ids.len() == manifest.layers.len()).then(|| config.diff_ids.clone());
        if diff_ids.is_none() {
            tracing::warn!(image = %key, "config has no usable diff_ids; uncompressed layers are not checked");
        }

        let mut layer_records = Vec::with_capacity(manifest.layers.len());
        for layer in &manifest.layers {
            let compression =
                Compression::from_media_type(&layer.media_type).map_err(|source| {
                    PullError::Manifest {
                        reference: key.to_owned(),
                        source,
                    }
                })?;
            layer_records.push(LayerRecord {
                digest: layer.digest.clone(),
                size: layer.size as u64,
                compression,
            });
        }
        let chains = diff_ids.as_deref().map(staging::chain_ids);
        // Gzip'd file systems are rarely more than 4 times smaller.
        let estimate = manifest
            .layers
            .iter()
            .map(|l| l.size.max(0) as u64)
            .sum::<u64>()
            .saturating_mul(4);

        let name = store::temp_name(&format!("build-{}", &manifest_digest.hex()[..12]));
        let out_build = inner.tmp.join(&name);
        let out_dir = out_build.join("image");
        fs::create_dir_all(&out_dir).map_err(|source| PullError::Io {
            what: "create",
            path: out_dir.clone(),
            source,
        })?;
        let mut build = BuildDir(vec![out_build]);
        let mut area = inner.staging.area(estimate);
        let (tree, tree_bytes) = loop {
            let stage = area.dir().join(&name);
            build.0.push(stage.clone());
            let tree = stage.join("rootfs");
            fs::create_dir_all(&tree).map_err(|source| PullError::Io {
                what: "create",
                path: tree.clone(),
                source,
            })?;
            let unpacked = self
                .unpack_layers(
                    &mut tracker,
                    &manifest.layers,
                    &layer_rxs,
                    &layer_records,
                    diff_ids.as_deref(),
                    chains.as_deref(),
                    area,
                    &tree,
                    progress,
                )
                .await;
            match unpacked {
                Ok(bytes) => break (tree, bytes),
                Err(e) if area.is_tmpfs() && no_space(&e) => {
                    tracing::warn!(image = %key, "the staging tmpfs is full; unpacking on disk");
                    area = inner.staging.disk();
                }
                Err(e) => return Err(e),
            }
        };

        progress(PullEvent::BuildingRootfs);
        let format = inner.config.rootfs_format;
        let rootfs_file = out_dir.join(format.file_name());
        let (t, f) = (tree.clone(), rootfs_file.clone());
        let rootfs_size = blocking(move || rootfs::build(&t, &f, format)).await??;
        if let Some(chain) = chains.as_ref().and_then(|c| c.last())
            && area.keep(&tree, chain, tree_bytes)
        {
            tracing::debug!(image = %key, "unpacked tree kept for images on the same layers");
        }
        let config_json = serde_json::to_vec_pretty(&config).expect("config serializes");
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| PullError::Io { what, path, source }
        };
        let config_path = out_dir.join(CONFIG_FILE);
        let final_dir = inner.image_dir(manifest_digest);
        let (od, fd, cp, images_dir) = (
            out_dir.clone(),
            final_dir.clone(),
            config_path.clone(),
            inner.images_dir.clone(),
        );
        blocking(move || -> Result<(), PullError> {
            let mut f = fs::File::create(&cp).map_err(io("create", &cp))?;
            std::io::Write::write_all(&mut f, &config_json).map_err(io("write", &cp))?;
            f.sync_all().map_err(io("fsync", &cp))?;
            store::sync_dir(&od).map_err(io("fsync", &od))?;
            if fd.exists() {
                // Left by a crash between rename and index commit; open() normally removes it.
                fs::remove_dir_all(&fd).map_err(io("remove", &fd))?;
            }
            fs::rename(&od, &fd).map_err(io("rename", &fd))?;
            store::sync_dir(&images_dir).map_err(io("fsync", &images_dir))
        })
        .await??;

        let now = now_ms();
        let record = ImageRecord {
            manifest_digest: manifest_digest.clone(),
            config_digest: manifest.config.digest.clone(),
            references: BTreeSet::from([key.to_owned()]),
            layers: layer_records,
            config,
            rootfs_format: format,
            rootfs_size,
            pulled_at_ms: now,
            last_used_ms: now,
            pinned: false,
        };
        {
            let mut state = inner.lock_state();
            let mut changed = vec![record.clone()];
            if let Some(old) = state.refs.get(key).cloned()
                && let Some(e) = state.images.get(&old)
            {
                let mut r = e.record.clone();
                r.references.remove(key);
                changed.push(r);
            }
            inner.index.put(
                &changed.iter().collect::<Vec<_>>(),
                &[(key, manifest_digest)],
            )?;
            for r in changed {
                let d = r.manifest_digest.clone();
                state
                    .images
                    .entry(d)
                    .and_modify(|e| e.record = r.clone())
                    .or_insert(Entry {
                        record: r,
                        in_use: 0,
                        dirty: false,
                    });
            }
            state.refs.insert(key.to_owned(), manifest_digest.clone());
        }
        inner.stats.images_built.fetch_add(1, Ordering::Relaxed);
        progress(PullEvent::Ready {
            manifest_digest: manifest_digest.clone(),
            already_cached: false,
        });
        tracing::info!(image = %key, digest = %manifest_digest, "image cached");
        Ok(self.get(manifest_digest).expect("just recorded"))
    }

    /// Fills `tree` with the image's layers: clones the longest kept tree of a prefix of its
    /// layer chain, then applies the remaining layers in order as their downloads finish
    /// (keeping a clone of the tree below the top layer on the way).
    /// Waits for every layer's download (the image record needs them all). Returns the tree's
    /// apparent size in bytes.
    #[allow(clippy::too_many_arguments)]
    async fn unpack_layers(
        &self,
        tracker: &mut Tracker<'_>,
        layers: &[Descriptor],
        rxs: &[watch::Receiver<FetchState>],
        records: &[LayerRecord],
        diff_ids: Option<&[Digest]>,
        chains: Option<&[Digest]>,
        area: &Area,
        tree: &Path,
        progress: &(dyn Fn(PullEvent) + Send + Sync),
    ) -> Result<u64, PullError> {
        let options = UnpackOptions::default();
        let n = layers.len();
        let mut start = 0;
        let mut bytes = 0;
        if let Some((last, kept)) = chains.and_then(|c| area.find(c)) {
            let (src, dst) = (kept.path.clone(), tree.to_owned());
            let cloned = tracker
                .drive(blocking(move || {
                    staging::clone_tree(&src, &dst, options.preserve_ownership)
                }))
                .await?
                .map_err(|source| PullError::Io {
                    what: "clone the kept layer tree into",
                    path: tree.to_owned(),
                    source,
                })?;
            tracing::debug!(
                layers = last + 1,
                entries = cloned,
                "reused the unpacked tree of the base layers"
            );
            start = last + 1;
            bytes = kept.bytes;
        }
        for i in start..n {
            let layer = &layers[i];
            tracker
                .drive(wait_done(&layer.digest, rxs[i].clone()))
                .await?;
            progress(PullEvent::Unpacking {
                layer: i,
                layers: n,
            });
            // Images often differ from the ones before only in their top layer (a new version
            // of an app): keep the tree of the layers below it too.
            if let Some(chains) = chains
                && i > start
                && i + 1 == n
                && area.wants(&chains[i - 1])
            {
                let prefix = tree.with_file_name("below-top");
                let (src, dst) = (tree.to_owned(), prefix.clone());
                let cloned = tracker
                    .drive(blocking(move || {
                        fs::create_dir(&dst)?;
                        staging::clone_tree(&src, &dst, options.preserve_ownership)
                    }))
                    .await?;
                match cloned {
                    Ok(_) => {
                        area.keep(&prefix, &chains[i - 1], bytes);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot keep the tree below the top layer")
                    }
                }
            }
            let blob = self.inner.blobs.path(&layer.digest);
            let diff_id = diff_ids.map(|d| d[i].clone());
            let compression = records[i].compression;
            let root = tree.to_owned();
            let stats = tracker
                .drive(blocking(move || {
                    unpack::apply_layer_blob(&root, &blob, compression, diff_id.as_ref(), options)
                }))
                .await?
                .map_err(|source| PullError::Unpack {
                    layer: i,
                    digest: layer.digest.clone(),
                    source,
                })?;
            bytes += stats.bytes;
        }
        for (layer, rx) in layers.iter().zip(rxs).take(start) {
            tracker.drive(wait_done(&layer.digest, rx.clone())).await?;
        }
        Ok(bytes)
    }

    /// The shared download of a blob: joins one in progress, reports a stored blob as done,
    /// or starts a download task.
    fn fetch_blob(
        &self,
        client: &Arc<RegistryClient>,
        repo: &str,
        desc: &Descriptor,
        sem: &Arc<Semaphore>,
    ) -> watch::Receiver<FetchState> {
        let inner = &self.inner;
        let mut downloads = lock(&inner.downloads);
        if let Some(rx) = downloads.get(&desc.digest) {
            return rx.clone();
        }
        if inner.blobs.size(&desc.digest).is_some() {
            let (_tx, rx) = watch::channel(FetchState::Done { cached: true });
            return rx;
        }
        let (tx, rx) = watch::channel(FetchState::Running { done: 0 });
        downloads.insert(desc.digest.clone(), rx.clone());
        let (inner, client, repo, desc, sem) = (
            self.inner.clone(),
            client.clone(),
            repo.to_owned(),
            desc.clone(),
            sem.clone(),
        );
        tokio::spawn(async move {
            let result = match sem.acquire_owned().await {
                Ok(_permit) => download(&inner, &client, &repo, &desc, &tx).await,
                Err(_) => Err(PullError::Worker("download semaphore closed".into())),
            };
            lock(&inner.downloads).remove(&desc.digest);
            tx.send_replace(match result {
                Ok(()) => FetchState::Done { cached: false },
                Err(e) => {
                    tracing::warn!(blob = %desc.digest, error = %format!("{e:#}"), "blob download failed");
                    FetchState::Failed(Arc::new(e))
                }
            });
        });
        rx
    }
}

/// Downloads one blob with retries for transient failures.
async fn download(
    inner: &Inner,
    client: &RegistryClient,
    repo: &str,
    desc: &Descriptor,
    tx: &watch::Sender<FetchState>,
) -> Result<(), PullError> {
    let mut delay = inner.config.backoff;
    let attempts = inner.config.attempts.max(1);
    let mut attempt = 1;
    loop {
        match download_once(inner, client, repo, desc, tx).await {
            Err(e) if e.is_transient() && attempt < attempts => {
                tracing::debug!(blob = %desc.digest, attempt, error = %e, "blob download failed, retrying");
                tx.send_replace(FetchState::Running { done: 0 });
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn download_once(
    inner: &Inner,
    client: &RegistryClient,
    repo: &str,
    desc: &Descriptor,
    tx: &watch::Sender<FetchState>,
) -> Result<(), PullError> {
    inner.stats.blob_downloads.fetch_add(1, Ordering::Relaxed);
    let blob_err = |source| PullError::Blob {
        digest: desc.digest.clone(),
        source,
    };
    let (url, resp) = client.blob(repo, &desc.digest).await?;
    let mut writer = inner
        .blobs
        .writer(&desc.digest, desc.size as u64)
        .map_err(blob_err)?;
    let mut body = resp.into_body();
    let mut published = 0;
    let stall = client.stall_timeout();
    let body_err = |source: std::io::Error| {
        PullError::Registry(RegistryError::Body {
            url: url.clone(),
            source,
        })
    };
    loop {
        let frame = tokio::time::timeout(stall, body.frame())
            .await
            .map_err(|_| {
                body_err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the download stalled",
                ))
            })?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| body_err(std::io::Error::other(e)))?;
        if let Ok(data) = frame.into_data() {
            writer.write(&data).map_err(blob_err)?;
            inner
                .stats
                .bytes_downloaded
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if writer.written() - published >= PUBLISH_EVERY {
                published = writer.written();
                tx.send_replace(FetchState::Running { done: published });
            }
        }
    }
    blocking(move || writer.commit()).await?.map_err(blob_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent runs prefetches in spawned tasks and boxes errors as `dyn Error + Send + Sync`.
    #[test]
    fn futures_and_errors_cross_threads() {
        fn send_future<'a>(cache: &'a ImageCache, r: &'a Reference) -> impl Future + Send + 'a {
            async move {
                let _ = cache.prefetch(r, &|_| {}).await;
            }
        }
        fn error_bounds<E: std::error::Error + Send + Sync + 'static>() {}
        fn send_sync_clone<T: Send + Sync + Clone + 'static>() {}
        let _ = send_future;
        error_bounds::<PullError>();
        error_bounds::<RemoveError>();
        error_bounds::<OpenError>();
        error_bounds::<EvictError>();
        send_sync_clone::<ImageCache>();
        send_sync_clone::<CachedImage>();
    }
}
