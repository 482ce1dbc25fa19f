//! The durable store: instances and events in one redb file under the state dir.
//!
//! Every change of an instance and the events it causes are written in ONE transaction, so a
//! crash never leaves a state without its event or an event without its state. redb commits
//! are durable (fsync) before [`Store::commit`] returns.
//!
//! Tables:
//! - `instances`: id → prost `hearth.v1.Instance` (what the API shows).
//! - `private`: id → JSON [`Private`] (what only the agent needs: runtime handles, the image).
//! - `events`: seq → prost `hearth.v1.Event`.
//! - `meta`: `last_seq` → the newest event seq (kept when old events are pruned).

use std::path::Path;

use prost::Message as _;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::model::pb;

const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const PRIVATE: TableDefinition<&str, &[u8]> = TableDefinition::new("private");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_SEQ: &str = "last_seq";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("Cannot open the state database")]
    Open(#[source] redb::DatabaseError),
    /// A transaction failed.
    #[error("State database transaction failed")]
    Transaction(#[from] redb::TransactionError),
    /// A table could not be opened.
    #[error("State database table failed")]
    Table(#[from] redb::TableError),
    /// Reading or writing failed.
    #[error("State database storage failed")]
    Storage(#[from] redb::StorageError),
    /// The commit failed (nothing of the transaction was written).
    #[error("State database commit failed")]
    Commit(#[from] redb::CommitError),
    /// A stored record does not decode (a bug or a corrupted file).
    #[error("Stored record {0} does not decode")]
    Corrupt(String),
}

/// What the agent keeps about an instance besides its API view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Private {
    /// The runtime's handle on the running instance (opaque to everything but the runtime).
    #[serde(default)]
    pub runtime: Option<crate::runtime::RuntimeState>,
    /// The image the instance was created from, as resolved then.
    #[serde(default)]
    pub image: Option<crate::images::ResolvedImage>,
    /// hearth-init's boot id of the current boot, once it said Hello.
    #[serde(default)]
    pub boot_id: String,
    /// The newest log record seq stored for the current boot.
    #[serde(default)]
    pub log_seq: u64,
    /// When the current start was requested (for start-to-ready).
    #[serde(default)]
    pub start_requested_at: i64,
    /// The network address lease (opaque, owned by the networking module).
    #[serde(default)]
    pub network: Option<serde_json::Value>,
    /// The current (or last) boot took a warm-pool member.
    #[serde(default)]
    pub warm_start: bool,
}

/// One atomic change.
#[derive(Debug, Default)]
pub struct Change {
    /// Instance to write (insert or replace).
    pub put: Option<(pb::Instance, Private)>,
    /// Instance to delete.
    pub delete: Option<String>,
    /// Events to append; their `seq` is assigned by the store.
    pub events: Vec<pb::Event>,
}

/// The store.
pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(StoreError::Open)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(INSTANCES)?;
            txn.open_table(PRIVATE)?;
            txn.open_table(EVENTS)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(Self { db })
    }

    /// Applies `change` atomically and durably; returns its events with their seqs.
    pub fn commit(&self, mut change: Change) -> Result<Vec<pb::Event>, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let mut seq = meta.get(LAST_SEQ)?.map(|v| v.value()).unwrap_or(0);
            let mut events = txn.open_table(EVENTS)?;
            for ev in &mut change.events {
                seq += 1;
                ev.seq = seq;
                events.insert(seq, ev.encode_to_vec().as_slice())?;
            }
            meta.insert(LAST_SEQ, seq)?;
            let mut inst = txn.open_table(INSTANCES)?;
            let mut private = txn.open_table(PRIVATE)?;
            if let Some(id) = &change.delete {
                inst.remove(id.as_str())?;
                private.remove(id.as_str())?;
            }
            if let Some((i, p)) = &change.put {
                inst.insert(i.id.as_str(), i.encode_to_vec().as_slice())?;
                let json = serde_json::to_vec(p).expect("Private serializes");
                private.insert(i.id.as_str(), json.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(change.events)
    }

    /// Every stored instance.
    pub fn load_instances(&self) -> Result<Vec<(pb::Instance, Private)>, StoreError> {
        let txn = self.db.begin_read()?;
        let inst = txn.open_table(INSTANCES)?;
        let private = txn.open_table(PRIVATE)?;
        let mut out = Vec::new();
        for row in inst.iter()? {
            let (k, v) = row?;
            let id = k.value().to_owned();
            let i = pb::Instance::decode(v.value())
                .map_err(|_| StoreError::Corrupt(format!("instance {id}")))?;
            let p = match private.get(id.as_str())? {
                Some(v) => serde_json::from_slice(v.value())
                    .map_err(|_| StoreError::Corrupt(format!("private record of {id}")))?,
                None => Private::default(),
            };
            out.push((i, p));
        }
        Ok(out)
    }

    /// Up to `limit` events with seq >= `from`, in order.
    pub fn events_from(&self, from: u64, limit: usize) -> Result<Vec<pb::Event>, StoreError> {
        let txn = self.db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in events.range(from..)? {
            let (k, v) = row?;
            let ev = pb::Event::decode(v.value())
                .map_err(|_| StoreError::Corrupt(format!("event {}", k.value())))?;
            out.push(ev);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The newest event seq (0 when there is none).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(LAST_SEQ)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Deletes the oldest events so that at most `keep` remain.
    pub fn prune_events(&self, keep: u64) -> Result<u64, StoreError> {
        let last = self.last_seq()?;
        if last <= keep {
            return Ok(0);
        }
        let below = last - keep + 1;
        let txn = self.db.begin_write()?;
        let removed;
        {
            let mut events = txn.open_table(EVENTS)?;
            let before = events.len()?;
            events.retain_in(..below, |_, _| false)?;
            removed = before - events.len()?;
        }
        txn.commit()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, state: pb::InstanceState) -> pb::Instance {
        pb::Instance {
            id: id.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    fn ev(id: &str) -> pb::Event {
        pb::Event {
            instance_id: id.into(),
            kind: Some(pb::event::Kind::Destroyed(Default::default())),
            ..Default::default()
        }
    }

    #[test]
    fn changes_are_atomic_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = Store::open(&path).unwrap();
            let evs = s
                .commit(Change {
                    put: Some((inst("a", pb::InstanceState::Created), Private::default())),
                    events: vec![ev("a"), ev("a")],
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
            s.commit(Change {
                put: Some((
                    inst("b", pb::InstanceState::Running),
                    Private {
                        boot_id: "x".into(),
                        ..Default::default()
                    },
                )),
                events: vec![ev("b")],
                ..Default::default()
            })
            .unwrap();
            s.commit(Change {
                delete: Some("a".into()),
                events: vec![ev("a")],
                ..Default::default()
            })
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let all = s.load_instances().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0.id, "b");
        assert_eq!(all[0].1.boot_id, "x");
        assert_eq!(s.last_seq().unwrap(), 4);
        let evs = s.events_from(2, 10).unwrap();
        assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(s.prune_events(2).unwrap(), 2);
        assert_eq!(s.events_from(0, 10).unwrap().len(), 2);
        // Seqs continue after pruning.
        let evs = s
            .commit(Change {
                events: vec![ev("c")],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(evs[0].seq, 5);
    }
}
