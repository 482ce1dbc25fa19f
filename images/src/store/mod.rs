//! Content-addressed blob storage and atomic file writes.
//!
//! Every blob lives at `blobs/sha256/<hex>` under the cache root and is only ever put there by
//! renaming a fully written, fsynced and verified temp file from `tmp/`, so a crash at any point
//! leaves either no blob or a complete one; `tmp/` is emptied when the cache opens.

pub mod blobs;

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

pub use blobs::{BlobStore, BlobWriter, StoreError};

/// A unique name for a temp file or directory in `tmp/` (pid + counter).
pub fn temp_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// fsyncs a directory, so a rename into it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically: temp file in `tmp_dir`, fsync, rename, fsync the parent.
pub fn write_atomic(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp: PathBuf = tmp_dir.join(temp_name("file"));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path.parent().unwrap_or(Path::new("/")))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
