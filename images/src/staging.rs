//! Where layers are unpacked before mkfs, and the unpacked layer-chain trees kept for reuse.
//!
//! An unpacked tree only lives until mkfs has read it, and creating thousands of files on the
//! cache's disk file system costs inode allocation and writeback that dominate a pull. So a
//! pull unpacks on a tmpfs when one is configured and has room (the cache's own area there,
//! `<tmpfs>/hearth-images-<id of the cache root>/`, emptied when the cache opens and removed
//! when it closes), else in the cache's `tmp/`. Nothing here needs to survive a crash.
//!
//! After a build the unpacked tree is kept, under `trees/<chain id>` of its area, as the tree of
//! its layer chain (the OCI chain id of its diff_ids), within a byte budget, least recently
//! used out first. A later pull whose first layers form a kept chain clones that tree as a
//! hard-link farm (new directories with the same metadata, every other entry hard-linked) and
//! applies only its remaining layers. Sharing inodes is safe because the unpacker never
//! writes into, chmods or chowns an existing file: it unlinks and recreates it; directories,
//! whose metadata it does change, are never shared. mkfs.erofs and mkfs.ext4 count link
//! counts from the tree they read, so the extra links do not show in the image.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{MetadataExt as _, PermissionsExt as _, lchown},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::{config::CacheConfig, digest::Digest, store, sys};

/// The OCI chain ids of every prefix of `diff_ids`: `chain[0] = diff_ids[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff_ids[i])`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[derive(Default)]
struct Trees {
    entries: HashMap<Digest, TreeEntry>,
    clock: u64,
    total: u64,
}

struct TreeEntry {
    bytes: u64,
    last_used: u64,
    users: usize,
}

/// A place to unpack in: the tmpfs area or `tmp/`.
pub struct Area {
    dir: PathBuf,
    tmpfs: bool,
    budget: u64,
    trees: Arc<Mutex<Trees>>,
}

/// A kept tree in use by a pull (it is not evicted meanwhile).
pub struct TreeUse {
    trees: Arc<Mutex<Trees>>,
    chain: Digest,
    /// Where the tree is.
    pub path: PathBuf,
    /// Its size (apparent; shared inodes counted again).
    pub bytes: u64,
}

impl Drop for TreeUse {
    fn drop(&mut self) {
        let mut t = lock(&self.trees);
        if let Some(e) = t.entries.get_mut(&self.chain) {
            e.users -= 1;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Area {
    fn new(dir: PathBuf, tmpfs: bool, budget: u64) -> Self {
        Self {
            dir,
            tmpfs,
            budget,
            trees: Arc::default(),
        }
    }

    /// The directory builds make their trees in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this is the tmpfs area.
    pub fn is_tmpfs(&self) -> bool {
        self.tmpfs
    }

    fn tree_path(&self, chain: &Digest) -> PathBuf {
        self.dir.join("trees").join(chain.hex())
    }

    /// The longest kept chain among `chains` (the chain ids of an image's layer prefixes):
    /// its index and the tree, held in use.
    pub fn find(&self, chains: &[Digest]) -> Option<(usize, TreeUse)> {
        let mut t = lock(&self.trees);
        t.clock += 1;
        let now = t.clock;
        for (i, chain) in chains.iter().enumerate().rev() {
            if let Some(e) = t.entries.get_mut(chain) {
                e.users += 1;
                e.last_used = now;
                return Some((
                    i,
                    TreeUse {
                        trees: self.trees.clone(),
                        chain: chain.clone(),
                        path: self.tree_path(chain),
                        bytes: e.bytes,
                    },
                ));
            }
        }
        None
    }

    /// Whether trees are kept here at all and `chain`'s is not yet.
    pub fn wants(&self, chain: &Digest) -> bool {
        self.budget > 0 && !lock(&self.trees).entries.contains_key(chain)
    }

    /// Keeps the finished tree at `tree` (which is moved) as the tree of `chain`, if it fits
    /// the budget; evicts least recently used trees to make room. False when not kept (the
    /// caller removes `tree`).
    pub fn keep(&self, tree: &Path, chain: &Digest, bytes: u64) -> bool {
        if self.budget == 0 || bytes > self.budget {
            return false;
        }
        let mut t = lock(&self.trees);
        if t.entries.contains_key(chain) {
            return false;
        }
        let dest = self.tree_path(chain);
        let moved =
            fs::create_dir_all(self.dir.join("trees")).and_then(|()| fs::rename(tree, &dest));
        if let Err(e) = moved {
            tracing::debug!(error = %e, "cannot keep the unpacked tree");
            return false;
        }
        t.clock += 1;
        let now = t.clock;
        t.entries.insert(
            chain.clone(),
            TreeEntry {
                bytes,
                last_used: now,
                users: 0,
            },
        );
        t.total += bytes;
        while t.total > self.budget {
            let Some(victim) = t
                .entries
                .iter()
                .filter(|(c, e)| e.users == 0 && *c != chain)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(c, _)| c.clone())
            else {
                break;
            };
            self.evict(&mut t, &victim);
        }
        tracing::debug!(chain = %chain, bytes, "kept the unpacked layer tree");
        true
    }

    fn drop_unused(&self) -> usize {
        let mut t = lock(&self.trees);
        let unused: Vec<Digest> = t
            .entries
            .iter()
            .filter(|(_, e)| e.users == 0)
            .map(|(c, _)| c.clone())
            .collect();
        for c in &unused {
            self.evict(&mut t, c);
        }
        unused.len()
    }

    /// Forgets the kept tree of `chain` and deletes it in the background.
    fn evict(&self, t: &mut Trees, chain: &Digest) {
        if let Some(e) = t.entries.remove(chain) {
            t.total -= e.bytes;
            remove_in_background(&self.dir, &self.tree_path(chain));
        }
    }
}

/// Moves `path` aside within `dir` (one rename: the name is free again at once) and deletes it
/// in the background.
pub fn remove_in_background(dir: &Path, path: &Path) {
    let gone = dir.join(store::temp_name("gone"));
    let target = match fs::rename(path, &gone) {
        Ok(()) => gone,
        Err(_) => path.to_owned(),
    };
    std::thread::spawn(move || {
        let _ = fs::remove_dir_all(target);
    });
}

/// The staging areas of one cache.
pub struct Staging {
    tmpfs: Option<Area>,
    disk: Area,
    tmpfs_max: u64,
}

impl Staging {
    /// Sets up the areas: `tmp` (already emptied by the caller) and, when configured and a
    /// tmpfs, this cache's area there (emptied now; areas of caches whose root is gone are
    /// deleted too).
    pub fn open(config: &CacheConfig, root: &Path, tmp: &Path) -> Self {
        let budget = config.layer_tree_cache_bytes;
        let disk = Area::new(tmp.to_owned(), false, budget);
        let tmpfs = config
            .staging_tmpfs
            .as_deref()
            .and_then(|base| match open_tmpfs_area(base, root) {
                Ok(dir) => dir.map(|d| Area::new(d, true, budget)),
                Err(e) => {
                    tracing::warn!(tmpfs = %base.display(), error = %e, "cannot stage on the tmpfs; unpacking on disk");
                    None
                }
            });
        Self {
            tmpfs,
            disk,
            tmpfs_max: config.staging_tmpfs_max_bytes,
        }
    }

    /// Where to unpack an image of about `estimate` bytes.
    pub fn area(&self, estimate: u64) -> &Area {
        if let Some(t) = &self.tmpfs
            && estimate <= self.tmpfs_max
            && let Ok((true, free)) = sys::tmpfs_space(&t.dir)
            && estimate <= free
            && estimate <= mem_available().unwrap_or(0) / 2
        {
            return t;
        }
        &self.disk
    }

    /// The disk area (`tmp/`).
    pub fn disk(&self) -> &Area {
        &self.disk
    }

    /// Deletes every kept tree no pull is using; returns how many.
    pub fn drop_unused_trees(&self) -> usize {
        self.tmpfs
            .iter()
            .chain([&self.disk])
            .map(Area::drop_unused)
            .sum()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The tmpfs area holds memory: give it back when the cache closes.
        if let Some(t) = &self.tmpfs {
            let _ = fs::remove_dir_all(&t.dir);
        }
    }
}

const AREA_PREFIX: &str = "hearth-images-";
const ROOT_FILE: &str = "root";

/// Creates this cache's (empty) area on the tmpfs at `base`; `None` when `base` is no tmpfs.
fn open_tmpfs_area(base: &Path, root: &Path) -> io::Result<Option<PathBuf>> {
    if !base.is_dir() || !sys::tmpfs_space(base)?.0 {
        return Ok(None);
    }
    let root = fs::canonicalize(root)?;
    let digest = Digest::of(root.as_os_str().as_bytes());
    let id = &digest.hex()[..16];
    let dir = base.join(format!("{AREA_PREFIX}{id}"));
    // Areas of caches that are gone (a test's temp root, a crashed process) and our own old
    // one: their trees are of no use any more.
    for entry in fs::read_dir(base)?.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(AREA_PREFIX)) else {
            continue;
        };
        if rest.contains(".new-") {
            // Another cache opening right now.
            continue;
        }
        let path = entry.path();
        let stale = path == dir
            || rest.contains(".gone-")
            || fs::read(path.join(ROOT_FILE))
                .map(|r| !Path::new(std::ffi::OsStr::from_bytes(&r)).exists())
                .unwrap_or(true);
        if stale {
            let gone = base.join(store::temp_name(&format!("{AREA_PREFIX}{id}.gone")));
            if fs::rename(&path, &gone).is_ok() {
                std::thread::spawn(move || {
                    let _ = fs::remove_dir_all(gone);
                });
            }
        }
    }
    // Complete (with its root file) before it gets its name: see the staleness check above.
    let new = base.join(store::temp_name(&format!("{AREA_PREFIX}{id}.new")));
    fs::create_dir(&new)?;
    fs::set_permissions(&new, fs::Permissions::from_mode(0o700))?;
    fs::write(new.join(ROOT_FILE), root.as_os_str().as_bytes())?;
    fs::rename(&new, &dir)?;
    Ok(Some(dir))
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Clones the tree at `src` into the existing, empty directory `dst` as a hard-link farm:
/// directories are created with `src`'s mode, owner, extended attributes and mtime (set
/// last, children first); every other entry is hard-linked. Returns the entries cloned.
pub fn clone_tree(src: &Path, dst: &Path, preserve_ownership: bool) -> io::Result<u64> {
    let mut dirs: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut stack = vec![(src.to_owned(), dst.to_owned())];
    let mut entries = 0;
    while let Some((s, d)) = stack.pop() {
        for entry in fs::read_dir(&s)? {
            let entry = entry?;
            let (sp, dp) = (entry.path(), d.join(entry.file_name()));
            if entry.file_type()?.is_dir() {
                fs::create_dir(&dp)?;
                stack.push((sp.clone(), dp.clone()));
                dirs.push((sp, dp));
            } else {
                // linkat without AT_SYMLINK_FOLLOW: a symlink is linked itself.
                fs::hard_link(&sp, &dp)?;
            }
            entries += 1;
        }
    }
    for (s, d) in dirs.iter().rev() {
        let m = fs::symlink_metadata(s)?;
        if preserve_ownership {
            lchown(d, Some(m.uid()), Some(m.gid()))?;
        }
        // After chown: chown clears set-id bits.
        fs::set_permissions(d, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        for name in sys::llistxattr(s)? {
            let value = sys::lgetxattr(s, &name)?;
            sys::lsetxattr(d, &name, &value)?;
        }
        sys::lset_mtime(d, m.mtime())?;
    }
    Ok(entries)
}
