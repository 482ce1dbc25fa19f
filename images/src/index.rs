//! The embedded index of cached images (redb): reference → manifest digest, and per image its
//! config, layers, sizes, rootfs image, pin and last use.
//!
//! The cache keeps a copy in memory for lookups; this module is what survives a restart. Every
//! change is one durable transaction, so a crash leaves the index as it was before or after.

use std::{collections::BTreeSet, path::Path};

use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{
    config::RootfsFormat,
    digest::Digest,
    manifest::{Compression, ImageConfig},
};

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const REFS: TableDefinition<&str, &str> = TableDefinition::new("refs");

/// Why the index could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The database failed.
    #[error("Image index database failed")]
    Db(#[from] redb::Error),
    /// A stored record does not parse (written by an incompatible version?).
    #[error("Image index record {0} is unreadable")]
    Record(String, #[source] serde_json::Error),
}

fn dberr<E: Into<redb::Error>>(e: E) -> IndexError {
    IndexError::Db(e.into())
}

/// One layer of a cached image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Compressed blob digest.
    pub digest: Digest,
    /// Compressed size.
    pub size: u64,
    /// How the blob is compressed.
    pub compression: Compression,
}

/// Everything the cache knows about one image (keyed by its manifest digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Digest of the (platform) manifest.
    pub manifest_digest: Digest,
    /// Digest of the config blob.
    pub config_digest: Digest,
    /// References that resolve to this image (`registry/repo:tag`, `…@sha256:…`).
    pub references: BTreeSet<String>,
    /// Layers, base first.
    pub layers: Vec<LayerRecord>,
    /// What the workload needs from the image config.
    pub config: ImageConfig,
    /// File system of the rootfs image.
    pub rootfs_format: RootfsFormat,
    /// Size of the rootfs image in bytes.
    pub rootfs_size: u64,
    /// When the pull finished (Unix milliseconds).
    pub pulled_at_ms: u64,
    /// Last prefetch or lookup (Unix milliseconds).
    pub last_used_ms: u64,
    /// Pinned images are never evicted.
    pub pinned: bool,
}

impl ImageRecord {
    /// Sum of the compressed layer sizes.
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// Every image record and every (reference, manifest digest) pair.
pub type Loaded = (Vec<ImageRecord>, Vec<(String, Digest)>);

/// The index database.
pub struct Index {
    db: redb::Database,
}

impl Index {
    /// Opens (creating) the index at `path`.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = redb::Database::create(path).map_err(dberr)?;
        let txn = db.begin_write().map_err(dberr)?;
        txn.open_table(IMAGES).map_err(dberr)?;
        txn.open_table(REFS).map_err(dberr)?;
        txn.commit().map_err(dberr)?;
        Ok(Self { db })
    }

    /// Every image and every reference.
    pub fn load(&self) -> Result<Loaded, IndexError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let images = txn.open_table(IMAGES).map_err(dberr)?;
        let mut records = Vec::new();
        for row in images.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let r: ImageRecord = serde_json::from_slice(v.value())
                .map_err(|e| IndexError::Record(k.value().to_owned(), e))?;
            records.push(r);
        }
        let refs_t = txn.open_table(REFS).map_err(dberr)?;
        let mut refs = Vec::new();
        for row in refs_t.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            // A reference to an unparsable digest cannot have been written by us: skip it.
            if let Ok(d) = v.value().parse() {
                refs.push((k.value().to_owned(), d));
            }
        }
        Ok((records, refs))
    }

    /// Stores records (replacing ones with the same digest) and points references at them,
    /// in one transaction. A reference moved away from an image is removed from that image's
    /// record by the caller (which passes the updated record too).
    pub fn put(
        &self,
        records: &[&ImageRecord],
        refs: &[(&str, &Digest)],
    ) -> Result<(), IndexError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        {
            let mut images = txn.open_table(IMAGES).map_err(dberr)?;
            for r in records {
                let bytes = serde_json::to_vec(r).expect("records serialize");
                images
                    .insert(r.manifest_digest.as_str(), bytes.as_slice())
                    .map_err(dberr)?;
            }
            let mut refs_t = txn.open_table(REFS).map_err(dberr)?;
            for (name, digest) in refs {
                refs_t.insert(*name, digest.as_str()).map_err(dberr)?;
            }
        }
        txn.commit().map_err(dberr)
    }

    /// Deletes images and references in one transaction.
    pub fn delete(&self, images: &[&Digest], refs: &[&str]) -> Result<(), IndexError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        {
            let mut images_t = txn.open_table(IMAGES).map_err(dberr)?;
            for d in images {
                images_t.remove(d.as_str()).map_err(dberr)?;
            }
            let mut refs_t = txn.open_table(REFS).map_err(dberr)?;
            for r in refs {
                refs_t.remove(*r).map_err(dberr)?;
            }
        }
        txn.commit().map_err(dberr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let d = Digest::of(b"m");
        let rec = ImageRecord {
            manifest_digest: d.clone(),
            config_digest: Digest::of(b"c"),
            references: ["r/a:1".to_owned()].into(),
            layers: vec![LayerRecord {
                digest: Digest::of(b"l"),
                size: 3,
                compression: Compression::Gzip,
            }],
            config: ImageConfig::default(),
            rootfs_format: RootfsFormat::Erofs,
            rootfs_size: 4096,
            pulled_at_ms: 1,
            last_used_ms: 2,
            pinned: false,
        };
        {
            let idx = Index::open(&path).unwrap();
            idx.put(&[&rec], &[("r/a:1", &d)]).unwrap();
        }
        let idx = Index::open(&path).unwrap();
        let (records, refs) = idx.load().unwrap();
        assert_eq!(records, vec![rec]);
        assert_eq!(refs, vec![("r/a:1".to_owned(), d.clone())]);
        idx.delete(&[&d], &["r/a:1"]).unwrap();
        assert_eq!(idx.load().unwrap().0.len(), 0);
    }
}
