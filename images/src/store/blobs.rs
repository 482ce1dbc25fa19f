//! The blob store: `blobs/sha256/<hex>`, written only through a verifying [`BlobWriter`].

use std::{
    fs::{self, File},
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
};

use crate::digest::{Digest, Hasher};

use super::{sync_dir, temp_name};

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("Cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The content does not hash to the digest it was fetched as.
    #[error("Blob content has digest {actual}, expected {expected}: nothing was stored")]
    DigestMismatch {
        /// Expected digest.
        expected: Digest,
        /// Digest of what arrived.
        actual: Digest,
    },
    /// The content is longer or shorter than its descriptor says.
    #[error("Blob {digest} has {actual} bytes, the manifest says {expected}: nothing was stored")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Size in the manifest.
        expected: u64,
        /// Bytes that arrived (so far, when too long).
        actual: u64,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Content-addressed blob storage under `<root>/blobs/sha256`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the store; `tmp` is the cache's temp dir on the same file system.
    pub fn open(root: &Path, tmp: &Path) -> Result<Self, StoreError> {
        let dir = root.join("blobs/sha256");
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(Self {
            dir,
            tmp: tmp.to_owned(),
        })
    }

    /// Where a blob lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// The size of a stored blob, `None` when it is not stored.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Reads a small stored blob (a config) whole.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.path(digest);
        fs::read(&path).map_err(io_err("read", &path))
    }

    /// Re-hashes a stored blob and says whether it still matches its name.
    pub fn verify(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.path(digest);
        let mut f = File::open(&path).map_err(io_err("open", &path))?;
        let mut h = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io_err("read", &path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finish() == *digest)
    }

    /// Every stored blob with its size.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let name = entry.file_name();
            let Ok(digest) = format!("sha256:{}", name.to_string_lossy()).parse::<Digest>() else {
                continue;
            };
            if let Ok(m) = entry.metadata() {
                out.push((digest, m.len()));
            }
        }
        Ok(out)
    }

    /// Deletes a blob (missing is fine).
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Starts writing a blob that must hash to `expected` and be `size` bytes long.
    pub fn writer(&self, expected: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let tmp = self
            .tmp
            .join(temp_name(&format!("blob-{}", &expected.hex()[..12])));
        let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest: self.path(expected),
            dir: self.dir.clone(),
            expected: expected.clone(),
            size,
            hasher: Hasher::default(),
        })
    }
}

/// A blob being written: bytes are hashed as they arrive; [`commit`](Self::commit) checks size
/// and digest, fsyncs and renames into place. Dropped uncommitted, it deletes its temp file.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    expected: Digest,
    size: u64,
    hasher: Hasher,
}

impl BlobWriter {
    /// Appends bytes; fails as soon as more bytes arrive than the descriptor allows.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let written = self.hasher.len() + bytes.len() as u64;
        if written > self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.expected.clone(),
                expected: self.size,
                actual: written,
            });
        }
        self.hasher.update(bytes);
        let file = self.file.as_mut().expect("writer used after commit");
        file.write_all(bytes).map_err(io_err("write", &self.tmp))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Verifies, fsyncs and renames the blob into place; returns its size.
    pub fn commit(mut self) -> Result<u64, StoreError> {
        let file = self.file.take().expect("writer committed twice");
        let len = self.hasher.len();
        if len != self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.expected.clone(),
                expected: self.size,
                actual: len,
            });
        }
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.expected {
            return Err(StoreError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        file.sync_all().map_err(io_err("fsync", &self.tmp))?;
        drop(file);
        fs::rename(&self.tmp, &self.dest).map_err(io_err("rename", &self.dest))?;
        sync_dir(&self.dir).map_err(io_err("fsync", &self.dir))?;
        // Renamed: nothing left for Drop to clean.
        self.tmp = PathBuf::new();
        Ok(len)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_verified_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let store = BlobStore::open(dir.path(), &tmp).unwrap();
        let good = Digest::of(b"hello");

        let mut w = store.writer(&good, 5).unwrap();
        w.write(b"hellO").unwrap();
        assert!(matches!(w.commit(), Err(StoreError::DigestMismatch { .. })));
        assert_eq!(store.size(&good), None);

        let mut w = store.writer(&good, 5).unwrap();
        assert!(matches!(
            w.write(b"hello!"),
            Err(StoreError::SizeMismatch { .. })
        ));
        drop(w);

        let mut w = store.writer(&good, 5).unwrap();
        w.write(b"hel").unwrap();
        w.write(b"lo").unwrap();
        assert_eq!(w.commit().unwrap(), 5);
        assert!(store.verify(&good).unwrap());
        assert_eq!(store.list().unwrap(), vec![(good, 5)]);
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "temp files left");
    }
}
