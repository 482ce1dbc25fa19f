//! hearth-images: gets OCI images onto the host and into a form an instance boots from.
//!
//! The agent opens one [`ImageCache`] per host and calls [`ImageCache::prefetch`] (pull,
//! verify, unpack, build the rootfs block image; with progress events), [`ImageCache::lookup`]
//! (sub-millisecond, no network), [`ImageCache::list`], [`ImageCache::remove`],
//! [`ImageCache::pin`]/[`ImageCache::unpin`] (warm pool) and [`ImageCache::acquire`] (a lease
//! while an instance uses the image). Eviction keeps the cache under its disk budget.
//!
//! # Layout
//!
//! - [`cache`]: the public API and the pull pipeline (shared downloads, pipelined unpacking).
//! - [`config`]: [`CacheConfig`] and per-registry settings (auth, TLS CA, insecure), with
//!   every default in one place.
//! - [`reference`](mod@reference): image references (`name:tag`, `name@sha256:…`).
//! - [`registry`]: the distribution API client (auth, retries, redirects).
//! - [`manifest`]: manifests, indexes and image configs (parsing registry input; fuzzed).
//! - [`digest`]: `sha256:` digests and hashing while bytes stream.
//! - [`store`]: the content-addressed blob store and atomic writes.
//! - [`unpack`]: applying layer tarballs (whiteouts, links, ownership, xattrs; rejects
//!   traversal and device nodes; fuzzed).
//! - [`rootfs`]: `mkfs.erofs` / `mkfs.ext4 -d` block images.
//! - `staging`: where layers are unpacked before mkfs (a tmpfs when it has room, else `tmp/`)
//!   and the unpacked layer-chain trees kept there, cloned as hard-link farms by later pulls
//!   of images on the same base layers.
//! - [`index`]: the embedded (redb) index of cached images.
//! - [`evict`]: the eviction policy (pure planning).
//! - [`progress`]: pull progress events.
//! - `sys`: the few raw OS calls (the crate's only `unsafe`).
//!
//! # On disk (under the cache root)
//!
//! `lock` (flock: one owner), `index.redb`, `blobs/sha256/<hex>`,
//! `images/<manifest hex>/{rootfs.erofs|rootfs.ext4, config.json}`, `tmp/` (moved aside to
//! `tmp.old-*` and deleted in the background on open; holds blob temp files, builds, and the
//! staging trees and kept layer-chain trees `tmp/trees/<chain id hex>` when not on a tmpfs).
//!
//! On the staging tmpfs (`CacheConfig::staging_tmpfs`, default `/dev/shm`):
//! `hearth-images-<16 hex of the cache root's hash>/{root, build-*/rootfs, trees/<chain id hex>}`,
//! emptied when the cache opens, removed when it closes, and removed by any cache that opens
//! once the root named in its `root` file is gone. Nothing there needs to survive a crash:
//! only the rootfs image (fsync, then rename of its directory) and the index make an image.

#![deny(missing_docs)]

pub mod cache;
pub mod config;
pub mod digest;
pub mod evict;
pub mod index;
pub mod manifest;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod rootfs;
mod staging;
pub mod store;
mod sys;
pub mod unpack;

pub use cache::{
    CacheStats, CachedImage, EvictError, EvictReport, ImageCache, ImageLease, OpenError, PullError,
    RemoveError,
};
pub use config::{CacheConfig, Credentials, RegistryConfig, RootfsFormat};
pub use digest::Digest;
pub use manifest::{ExposedPort, ImageConfig, Protocol};
pub use progress::{LayerProgress, PullEvent};
pub use reference::Reference;
