//! The pool targets the scheduler set (`SetWarmPool`), kept in `<state_dir>/warm_pools.json` so
//! a restarted agent refills the same pools. Written whole to a temporary file, synced, then
//! renamed over the old one: a crash leaves the old or the new file, never a mix.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::PoolKey;

/// The file's name in the state directory.
pub const FILE_NAME: &str = "warm_pools.json";

/// One target set through the API (size 0 is kept: it overrides a pool of the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Image reference.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Writable layer in MiB.
    pub disk_mib: u64,
    /// Members to keep ready.
    pub size: u32,
}

impl Target {
    /// The pool this target is for.
    pub fn key(&self) -> PoolKey {
        PoolKey {
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    pools: Vec<Target>,
}

/// Why the targets could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    /// Reading or writing the file failed.
    #[error("Cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not what this agent writes.
    #[error("{path} is not a warm-pool targets file")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The targets file of a state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Reads the targets (none when the file does not exist).
pub fn load(path: &Path) -> Result<Vec<Target>, TargetsError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TargetsError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file: File = serde_json::from_slice(&bytes).map_err(|source| TargetsError::Parse {
        path: path.to_owned(),
        source,
    })?;
    Ok(file.pools)
}

/// Replaces the file with `targets`.
pub fn save(path: &Path, targets: &[Target]) -> Result<(), TargetsError> {
    let io = |source| TargetsError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File {
        pools: targets.to_vec(),
    };
    let json = serde_json::to_vec_pretty(&file).expect("targets serialize");
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&json).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert!(load(&p).unwrap().is_empty());
        let t = vec![Target {
            image: "r/a:1".into(),
            vcpus: 1,
            memory_mib: 64,
            disk_mib: 64,
            size: 0,
        }];
        save(&p, &t).unwrap();
        assert_eq!(load(&p).unwrap(), t);
        std::fs::write(&p, b"{\"pools\": 3}").unwrap();
        assert!(matches!(load(&p), Err(TargetsError::Parse { .. })));
    }
}
