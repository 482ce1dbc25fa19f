//! Applying layer tarballs to a root directory, OCI style.
//!
//! Layers are applied base first. Each entry is placed with its mode, ownership (when running
//! as root), modification time and extended attributes; `.wh.<name>` deletes `<name>` from the
//! layers below and `.wh..wh..opq` empties its directory of what the layers below put there.
//! Absolute names, `..`, symlinks that lead out of the root and device nodes are rejected with
//! an [`UnpackError`]. Decompression (gzip, zstd) and the check of the uncompressed digest
//! (`diff_id`) happen in [`apply_layer_blob`].

pub mod path;

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File},
    io::{self, BufReader, Read},
    os::unix::{
        ffi::OsStrExt as _,
        fs::{PermissionsExt as _, lchown, symlink},
    },
    path::{Path, PathBuf},
};

use crate::{
    digest::{Digest, HashingReader},
    manifest::Compression,
    sys,
};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The tar stream is malformed or the decompressor failed.
    #[error("Malformed layer archive")]
    Tar(#[source] io::Error),
    /// An entry name starts with `/`.
    #[error("Layer entry {0:?} has an absolute name")]
    Absolute(String),
    /// An entry name contains `..`.
    #[error("Layer entry {0:?} climbs out of the root with ..")]
    Traversal(String),
    /// A symlink on the way to an entry leads out of the root.
    #[error("Layer entry {0:?} goes through a symlink that leads out of the root")]
    SymlinkEscape(String),
    /// Too many symlinks on the way to an entry.
    #[error("Layer entry {0:?} goes through a symlink loop")]
    SymlinkLoop(String),
    /// A parent of an entry is not a directory.
    #[error("A parent of layer entry {0:?} is not a directory")]
    NotADirectory(String),
    /// A character or block device.
    #[error("Layer entry {0:?} is a device node; images may not contain device nodes")]
    DeviceNode(String),
    /// A hard link whose target is missing, a directory, or outside the root.
    #[error("Layer entry {path:?} is a hard link to {target:?}, which is not a file in the image")]
    HardLink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// An entry type this unpacker does not know.
    #[error("Layer entry {path:?} has unsupported type {kind:?}")]
    EntryType {
        /// The entry.
        path: String,
        /// Its tar type byte.
        kind: char,
    },
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
    /// The uncompressed layer does not match the config's `diff_id`.
    #[error("Uncompressed layer has digest {actual}, the image config says {expected}")]
    DiffId {
        /// From the image config.
        expected: Digest,
        /// Of the unpacked stream.
        actual: Digest,
    },
}

/// How entries are applied.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Set owners from the archive (needs root; without it files belong to the caller).
    pub preserve_ownership: bool,
    /// Apply extended attributes (`SCHILY.xattr.*`).
    pub xattrs: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        Self {
            preserve_ownership: root,
            xattrs: true,
        }
    }
}

/// What applying a layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries placed (files, dirs, links, …).
    pub entries: u64,
    /// Whiteouts applied (including opaque markers).
    pub whiteouts: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
}

fn io_at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Applies a stored layer blob: decompresses it, applies it to `root`, and checks the
/// uncompressed stream against `diff_id` when one is given.
pub fn apply_layer_blob(
    root: &Path,
    blob: &Path,
    compression: Compression,
    diff_id: Option<&Digest>,
    options: UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let file = File::open(blob).map_err(io_at("open", blob))?;
    let mut file = BufReader::with_capacity(1 << 20, file);
    // Registries sometimes label compressed layers as plain tars (and vice versa): trust the
    // bytes over the label.
    let head = io::BufRead::fill_buf(&mut file).map_err(io_at("read", blob))?;
    // Labelled compressed but without the magic: the decoder will say so.
    let compression = Compression::sniff(head).unwrap_or(compression);
    let reader: Box<dyn Read + Send> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(UnpackError::Tar)?)
        }
    };
    // Decompress on a thread of its own: inflating overlaps with hashing and writing files.
    let reader: Box<dyn Read> = match compression {
        Compression::None => reader,
        _ => Box::new(Pipe::spawn(reader)),
    };
    let mut hashing = HashingReader::new(reader);
    let stats = apply_layer(root, &mut hashing, options)?;
    // Hash whatever follows the end-of-archive marker too: the diff_id covers the whole stream.
    io::copy(&mut hashing, &mut io::sink()).map_err(UnpackError::Tar)?;
    let (actual, _) = hashing.finish();
    if let Some(expected) = diff_id
        && *expected != actual
    {
        return Err(UnpackError::DiffId {
            expected: expected.clone(),
            actual,
        });
    }
    Ok(stats)
}

/// What the decompressing thread sends.
enum Chunk {
    Data(Vec<u8>),
    Failed(io::Error),
    Done,
}

/// A reader fed by a thread that reads another reader ahead, in large chunks.
struct Pipe {
    rx: std::sync::mpsc::Receiver<Chunk>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Pipe {
    const CHUNK: usize = 1 << 20;

    fn spawn(mut from: Box<dyn Read + Send>) -> Self {
        // A few chunks ahead: enough to keep both sides busy, little memory.
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; Self::CHUNK];
                let filled = match read_full(&mut from, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Chunk::Failed(e));
                        return;
                    }
                };
                let end = filled < buf.len();
                buf.truncate(filled);
                // A send fails when the reader gave up: stop too.
                if filled > 0 && tx.send(Chunk::Data(buf)).is_err() {
                    return;
                }
                if end {
                    let _ = tx.send(Chunk::Done);
                    return;
                }
            }
        });
        Self {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(d)) => {
                    self.cur = d;
                    self.pos = 0;
                }
                Ok(Chunk::Failed(e)) => return Err(e),
                Ok(Chunk::Done) => self.done = true,
                // Ended without saying so: it panicked. Never pass that off as the end.
                Err(_) => return Err(io::Error::other("the decompressing thread died")),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Removes whatever is at `path` (a directory with everything in it).
fn remove_any(path: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_at("remove", path)),
        Ok(_) => fs::remove_file(path).map_err(io_at("remove", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at("inspect", path)(e)),
    }
}

/// Applies one uncompressed layer tar stream to `root`.
pub fn apply_layer(
    root: &Path,
    tar: impl Read,
    options: UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let mut archive = tar::Archive::new(tar);
    let mut stats = LayerStats::default();
    // Paths this layer put in place: whiteouts and opaque markers only affect lower layers.
    let mut created: HashSet<PathBuf> = HashSet::new();
    // Directory times are set last: adding children would change them again.
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    // Resolved parent directories. Valid while no directory or symlink is removed or created
    // in their place, so it is cleared whenever an entry removes something or adds a symlink.
    let mut dir_cache: HashMap<Vec<std::ffi::OsString>, PathBuf> = HashMap::new();
    // One large buffer for file contents: fewer write calls than io::copy's 8 KiB.
    let mut buf = vec![0u8; 256 << 10];

    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let name = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&name).into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let comps = path::components(&name)?;
        let Some((last, dirs)) = comps.split_last() else {
            // The root itself (`./`): its metadata is the image builder's business, not ours.
            continue;
        };
        let last_bytes = last.as_bytes();

        if last_bytes.starts_with(WHITEOUT.as_bytes()) {
            stats.whiteouts += 1;
            dir_cache.clear();
            let Some(dir) = path::resolve_dir(root, dirs, false, &shown)? else {
                continue;
            };
            if last_bytes == OPAQUE.as_bytes() {
                let listing = fs::read_dir(&dir).map_err(io_at("list", &dir))?;
                for child in listing {
                    let child = child.map_err(io_at("list", &dir))?.path();
                    if !created.contains(&child) {
                        remove_any(&child)?;
                    }
                }
            } else {
                let victim = dir.join(std::ffi::OsStr::from_bytes(&last_bytes[WHITEOUT.len()..]));
                if !created.contains(&victim) {
                    remove_any(&victim)?;
                }
            }
            continue;
        }

        let parent = match dir_cache.get(dirs) {
            Some(p) => p.clone(),
            None => {
                let p = path::resolve_dir(root, dirs, true, &shown)?
                    .expect("resolve_dir creates missing directories");
                dir_cache.insert(dirs.to_vec(), p.clone());
                p
            }
        };
        let target = parent.join(last);
        let header = entry.header();
        let mode = header.mode().map_err(UnpackError::Tar)? & 0o7777;
        let mtime = header.mtime().map_err(UnpackError::Tar)? as i64;
        let (mut uid, mut gid) = (
            header.uid().map_err(UnpackError::Tar)?,
            header.gid().map_err(UnpackError::Tar)?,
        );
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Tar)? {
            for ext in pax {
                let ext = ext.map_err(UnpackError::Tar)?;
                let key = ext.key_bytes();
                if let Some(attr) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((attr.to_vec(), ext.value_bytes().to_vec()));
                } else if key == b"uid" {
                    uid = parse_num(ext.value_bytes()).unwrap_or(uid);
                } else if key == b"gid" {
                    gid = parse_num(ext.value_bytes()).unwrap_or(gid);
                }
            }
        }

        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&target)?;
                        dir_cache.clear();
                        fs::create_dir(&target).map_err(io_at("create directory", &target))?;
                    }
                    Err(_) => {
                        fs::create_dir(&target).map_err(io_at("create directory", &target))?
                    }
                }
                dir_times.push((target.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let create = || {
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&target)
                };
                let mut f = match create() {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        remove_any(&target)?;
                        dir_cache.clear();
                        create()
                    }
                    other => other,
                }
                .map_err(io_at("create", &target))?;
                stats.bytes += copy_big(&mut entry, &mut f, &mut buf, &target)?;
                // Metadata through the open file: no more path lookups per file.
                if options.preserve_ownership {
                    std::os::unix::fs::fchown(&f, Some(uid as u32), Some(gid as u32))
                        .map_err(io_at("chown", &target))?;
                }
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_at("chmod", &target))?;
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime.max(0) as u64);
                f.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
                    .map_err(io_at("set times of", &target))?;
                drop(f);
                apply_xattrs(&target, &xattrs, options);
                created.insert(target);
                stats.entries += 1;
                continue;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::Tar(io::Error::other("symlink without target")))?;
                remove_any(&target)?;
                dir_cache.clear();
                symlink(std::ffi::OsStr::from_bytes(&link), &target)
                    .map_err(io_at("create symlink", &target))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::Tar(io::Error::other("hard link without target")))?
                    .into_owned();
                let bad = || UnpackError::HardLink {
                    path: shown.clone(),
                    target: String::from_utf8_lossy(&link).into_owned(),
                };
                let link_comps = path::components(&link)?;
                let (link_last, link_dirs) = link_comps.split_last().ok_or_else(bad)?;
                let source = path::resolve_dir(root, link_dirs, false, &shown)?
                    .ok_or_else(bad)?
                    .join(link_last);
                match fs::symlink_metadata(&source) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(bad()),
                }
                if source != target {
                    remove_any(&target)?;
                    dir_cache.clear();
                    fs::hard_link(&source, &target).map_err(io_at("hard-link", &target))?;
                }
                // A hard link shares the inode: its metadata is the target's.
                created.insert(target);
                stats.entries += 1;
                continue;
            }
            tar::EntryType::Fifo => {
                remove_any(&target)?;
                dir_cache.clear();
                sys::mkfifo(&target, mode).map_err(io_at("create fifo", &target))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(UnpackError::DeviceNode(shown));
            }
            other => {
                return Err(UnpackError::EntryType {
                    path: shown,
                    kind: other.as_byte() as char,
                });
            }
        }

        let is_symlink = kind == tar::EntryType::Symlink;
        if options.preserve_ownership {
            lchown(&target, Some(uid as u32), Some(gid as u32)).map_err(io_at("chown", &target))?;
        }
        if !is_symlink {
            // After chown: chown clears set-id bits.
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(io_at("chmod", &target))?;
        }
        apply_xattrs(&target, &xattrs, options);
        if kind != tar::EntryType::Directory {
            sys::lset_mtime(&target, mtime).map_err(io_at("set times of", &target))?;
        }
        created.insert(target);
        stats.entries += 1;
    }
    for (dir, mtime) in dir_times.iter().rev() {
        sys::lset_mtime(dir, *mtime).map_err(io_at("set times of", dir))?;
    }
    Ok(stats)
}

/// Reads until `buf` is full or the input ends; returns how many bytes it holds.
fn read_full<R: Read + ?Sized>(from: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match from.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Copies an entry's content into `out` through `buf`; returns the bytes copied.
fn copy_big(
    from: &mut impl Read,
    out: &mut File,
    buf: &mut [u8],
    target: &Path,
) -> Result<u64, UnpackError> {
    let mut total = 0u64;
    loop {
        // Fill the buffer as far as the entry goes, then write it in one call.
        let filled = read_full(from, buf).map_err(UnpackError::Tar)?;
        if filled == 0 {
            return Ok(total);
        }
        io::Write::write_all(out, &buf[..filled]).map_err(io_at("write", target))?;
        total += filled as u64;
        if filled < buf.len() {
            return Ok(total);
        }
    }
}

fn apply_xattrs(target: &Path, xattrs: &[(Vec<u8>, Vec<u8>)], options: UnpackOptions) {
    if !options.xattrs {
        return;
    }
    for (name, value) in xattrs {
        if let Err(e) = sys::lsetxattr(target, name, value) {
            // Some file systems refuse some namespaces; the image stays usable.
            tracing::warn!(path = %target.display(), attr = %String::from_utf8_lossy(name), error = %e, "cannot set xattr");
        }
    }
}

fn parse_num(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails after `ok` bytes.
    struct Broken {
        ok: usize,
    }

    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::other("broken"));
            }
            let n = buf.len().min(self.ok);
            buf[..n].fill(7);
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn pipe_passes_every_byte_and_every_error() {
        for len in [0, 1, Pipe::CHUNK - 1, Pipe::CHUNK, 3 * Pipe::CHUNK + 5] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut out = Vec::new();
            Pipe::spawn(Box::new(io::Cursor::new(data.clone())))
                .read_to_end(&mut out)
                .unwrap();
            assert!(out == data, "length {len}");
        }
        let mut out = Vec::new();
        let e = Pipe::spawn(Box::new(Broken { ok: 5 << 20 }))
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(e.to_string(), "broken");
        // The reader may stop early: the thread ends instead of blocking forever.
        let mut p = Pipe::spawn(Box::new(io::repeat(1).take(64 << 20)));
        let mut b = [0u8; 10];
        p.read_exact(&mut b).unwrap();
        drop(p);
    }
}
