//! The node's event log: every instance change commits its events to the store, then they are
//! broadcast to watchers, in seq order. A watch can resume from any seq still in the store.

use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::broadcast;

use crate::{
    model::pb,
    store::{Change, Store, StoreError},
};

/// Events buffered for slow watchers before they fall back to reading the store.
const BROADCAST_CAPACITY: usize = 4096;
/// Events read from the store per batch while a watch catches up.
const CATCH_UP_BATCH: usize = 512;

/// Commits changes with their events and broadcasts the events.
#[derive(Clone)]
pub struct EventLog {
    store: Arc<Store>,
    tx: broadcast::Sender<pb::Event>,
    // Held across commit + send so that watchers see events in seq order.
    order: Arc<Mutex<()>>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    /// An event log over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            store,
            tx,
            order: Arc::new(Mutex::new(())),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Commits `change` durably, then publishes its events; returns them with their seqs.
    pub fn commit(&self, change: Change) -> Result<Vec<pb::Event>, StoreError> {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        let events = self.store.commit(change)?;
        for ev in &events {
            // No receiver is fine: nobody watches.
            let _ = self.tx.send(ev.clone());
        }
        Ok(events)
    }

    /// The newest seq.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        self.store.last_seq()
    }

    /// Events from `from_seq` on (0: only events after this call), optionally of one instance,
    /// as an endless stream. Stored events come first, then live ones, without gaps or
    /// duplicates.
    pub fn watch(
        &self,
        from_seq: u64,
        instance: Option<String>,
    ) -> impl Stream<Item = Result<pb::Event, StoreError>> + Send + use<> {
        // Subscribe before reading the store so nothing falls between the two.
        let rx = self.tx.subscribe();
        let store = self.store.clone();
        let start = if from_seq == 0 {
            store.last_seq().map(|s| s + 1)
        } else {
            Ok(from_seq)
        };
        futures::stream::unfold(
            WatchState {
                rx,
                store,
                next: start,
                backlog: std::collections::VecDeque::new(),
                catching_up: true,
                instance,
            },
            |mut st| async move {
                loop {
                    let next = match &st.next {
                        Ok(n) => *n,
                        Err(_) => {
                            let err = std::mem::replace(&mut st.next, Ok(u64::MAX));
                            return Some((Err(err.unwrap_err()), st));
                        }
                    };
                    if let Some(ev) = st.backlog.pop_front() {
                        st.next = Ok(ev.seq + 1);
                        if st.wants(&ev) {
                            return Some((Ok(ev), st));
                        }
                        continue;
                    }
                    if st.catching_up {
                        match st.store.events_from(next, CATCH_UP_BATCH) {
                            Ok(batch) if batch.is_empty() => st.catching_up = false,
                            Ok(batch) => st.backlog.extend(batch),
                            Err(e) => return Some((Err(e), st)),
                        }
                        continue;
                    }
                    match st.rx.recv().await {
                        Ok(ev) if ev.seq < next => continue,
                        Ok(ev) if ev.seq == next => st.backlog.push_back(ev),
                        // A gap (we lagged, or raced the subscription): read the store again.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            st.catching_up = true;
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        )
    }
}

struct WatchState {
    rx: broadcast::Receiver<pb::Event>,
    store: Arc<Store>,
    next: Result<u64, StoreError>,
    backlog: std::collections::VecDeque<pb::Event>,
    catching_up: bool,
    instance: Option<String>,
}

impl WatchState {
    fn wants(&self, ev: &pb::Event) -> bool {
        self.instance
            .as_deref()
            .is_none_or(|id| id == ev.instance_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    fn ev(id: &str) -> pb::Event {
        pb::Event {
            instance_id: id.into(),
            kind: Some(pb::event::Kind::Destroyed(Default::default())),
            ..Default::default()
        }
    }

    fn log() -> (tempfile::TempDir, EventLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        (dir, EventLog::new(store))
    }

    fn commit(log: &EventLog, id: &str, n: usize) {
        log.commit(Change {
            events: (0..n).map(|_| ev(id)).collect(),
            ..Default::default()
        })
        .unwrap();
    }

    #[tokio::test]
    async fn resumes_from_a_seq_then_follows_live() {
        let (_d, log) = log();
        commit(&log, "a", 3);
        let mut w = Box::pin(log.watch(2, None));
        let l2 = log.clone();
        let live = tokio::spawn(async move {
            for _ in 0..1000 {
                commit(&l2, "b", 1);
            }
        });
        let mut want = 2;
        while want <= 1003 {
            let ev = w.next().await.unwrap().unwrap();
            assert_eq!(ev.seq, want, "no gap, no duplicate");
            want += 1;
        }
        live.await.unwrap();
    }

    #[tokio::test]
    async fn zero_means_only_new_events_and_filters_by_instance() {
        let (_d, log) = log();
        commit(&log, "a", 2);
        let mut w = Box::pin(log.watch(0, Some("b".into())));
        commit(&log, "a", 1);
        commit(&log, "b", 1);
        let ev = w.next().await.unwrap().unwrap();
        assert_eq!((ev.seq, ev.instance_id.as_str()), (4, "b"));
    }
}
