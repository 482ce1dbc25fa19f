//! Pull progress: the events a prefetch reports while it runs.
//!
//! The caller passes a callback to [`ImageCache::prefetch`](crate::ImageCache::prefetch); it is
//! called from the prefetch's own task, in order, at most every 100 ms per layer while bytes
//! flow (and once at each step). Forward the events as they are (e.g. into a gRPC stream) or
//! print them: `Display` gives one plain line per event, for logs and non-terminals.

use std::fmt;

use crate::digest::Digest;

/// One layer as the pull sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    /// Compressed blob digest.
    pub digest: Digest,
    /// Bytes present so far.
    pub done: u64,
    /// Compressed size.
    pub total: u64,
    /// The blob was already in the cache when the pull started.
    pub cached: bool,
}

/// What a pull reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The reference resolved to a manifest; the layers to fetch are known.
    Resolved {
        /// The reference as given.
        reference: String,
        /// Its manifest digest (for an index: the linux/amd64 manifest).
        manifest_digest: Digest,
        /// Every layer, base first.
        layers: Vec<LayerProgress>,
    },
    /// Bytes arrived for one layer.
    Bytes {
        /// Index of the layer (base = 0).
        layer: usize,
        /// That layer's state.
        progress: LayerProgress,
        /// Bytes present for all layers together.
        done: u64,
        /// Compressed size of all layers together.
        total: u64,
    },
    /// A layer is being applied to the root tree.
    Unpacking {
        /// Index of the layer (base = 0).
        layer: usize,
        /// Number of layers.
        layers: usize,
    },
    /// The block image is being built.
    BuildingRootfs,
    /// The image is cached and ready.
    Ready {
        /// Its manifest digest.
        manifest_digest: Digest,
        /// It was already cached: nothing was downloaded or built.
        already_cached: bool,
    },
}

fn short(d: &Digest) -> &str {
    &d.hex()[..12]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for PullEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resolved {
                reference,
                manifest_digest,
                layers,
            } => {
                let total: u64 = layers.iter().map(|l| l.total).sum();
                let cached = layers.iter().filter(|l| l.cached).count();
                write!(
                    f,
                    "{reference}: manifest {manifest_digest}, {} layers ({:.1} MiB, {cached} cached)",
                    layers.len(),
                    mib(total)
                )
            }
            Self::Bytes {
                layer,
                progress,
                done,
                total,
            } => write!(
                f,
                "layer {layer} {}: {:.1}/{:.1} MiB; total {:.1}/{:.1} MiB",
                short(&progress.digest),
                mib(progress.done),
                mib(progress.total),
                mib(*done),
                mib(*total)
            ),
            Self::Unpacking { layer, layers } => {
                write!(f, "unpacking layer {}/{layers}", layer + 1)
            }
            Self::BuildingRootfs => write!(f, "building rootfs image"),
            Self::Ready {
                manifest_digest,
                already_cached,
            } => write!(
                f,
                "ready: {manifest_digest}{}",
                if *already_cached {
                    " (already cached)"
                } else {
                    ""
                }
            ),
        }
    }
}
