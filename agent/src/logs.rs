//! Per-instance log files, rotated by size, and the streams `StreamLogs` serves from them.
//!
//! An instance's log is a directory of numbered files (`00000001.log`, ...); each holds records
//! of a 4-byte big-endian length and a prost `hearth.v1.LogEntry`. Every entry gets an `index`
//! that increases across boots, so a reader can switch from the files to live entries without
//! gaps or duplicates. A file is closed when it passes `max_file_bytes`; only the newest
//! `max_files` are kept. An entry is one line without its newline (`partial` when a long line
//! was split). A torn record at the end of a file (a crash mid-write) ends reading
//! of that file.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::Stream;
use prost::Message as _;
use tokio::sync::broadcast;

use crate::{config::LogsConfig, model::pb};

const LIVE_CAPACITY: usize = 1024;

/// An instance's log.
pub struct LogSink {
    dir: PathBuf,
    cfg: LogsConfig,
    inner: Mutex<Inner>,
    tx: broadcast::Sender<pb::LogEntry>,
    bytes: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    file: Option<File>,
    file_no: u64,
    size: u64,
    next_index: u64,
    last: (u32, u64),
}

fn file_name(no: u64) -> String {
    format!("{no:08}.log")
}

fn file_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    match fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                let name = e?.file_name();
                if let Some(n) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| n.parse().ok())
                {
                    out.push(n);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort_unstable();
    Ok(out)
}

/// Decodes the complete records of one file's bytes.
pub fn decode_records(mut data: &[u8]) -> Vec<pb::LogEntry> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if data.len() < 4 + len {
            break;
        }
        match pb::LogEntry::decode(&data[4..4 + len]) {
            Ok(e) => out.push(e),
            Err(_) => break,
        }
        data = &data[4 + len..];
    }
    out
}

impl LogSink {
    /// Opens (or creates) the log in `dir`, continuing after its newest record.
    pub fn open(dir: &Path, cfg: &LogsConfig) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let numbers = file_numbers(dir)?;
        let mut inner = Inner {
            file: None,
            file_no: numbers.last().copied().unwrap_or(0),
            size: 0,
            next_index: 1,
            last: (0, 0),
        };
        let mut bytes = 0;
        for &n in &numbers {
            bytes += fs::metadata(dir.join(file_name(n)))?.len();
        }
        // The newest record may be in an older file when the newest is empty.
        for &n in numbers.iter().rev() {
            let data = fs::read(dir.join(file_name(n)))?;
            if let Some(last) = decode_records(&data).last() {
                inner.next_index = last.index + 1;
                inner.last = (last.boot, last.seq);
                break;
            }
        }
        let (tx, _) = broadcast::channel(LIVE_CAPACITY);
        Ok(Self {
            dir: dir.to_owned(),
            cfg: cfg.clone(),
            inner: Mutex::new(inner),
            tx,
            bytes: AtomicU64::new(bytes),
            dropped: AtomicU64::new(0),
        })
    }

    /// The newest hearth-init record seq stored for `boot` (0: none).
    pub fn last_init_seq(&self, boot: u32) -> u64 {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.last.0 == boot {
            inner.last.1
        } else {
            0
        }
    }

    /// Appends one entry (its `index` is assigned here) and publishes it to followers.
    pub fn append(&self, mut entry: pb::LogEntry) -> io::Result<pb::LogEntry> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        entry.index = inner.next_index;
        let body = entry.encode_to_vec();
        if inner.file.is_none() || inner.size >= self.cfg.max_file_bytes {
            self.rotate(&mut inner)?;
        }
        let mut rec = Vec::with_capacity(4 + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_be_bytes());
        rec.extend_from_slice(&body);
        inner
            .file
            .as_mut()
            .expect("rotate opened a file")
            .write_all(&rec)?;
        inner.size += rec.len() as u64;
        inner.next_index += 1;
        if entry.seq != 0 {
            inner.last = (entry.boot, entry.seq);
        }
        self.bytes.fetch_add(rec.len() as u64, Ordering::Relaxed);
        let _ = self.tx.send(entry.clone());
        Ok(entry)
    }

    /// Adds a line from the agent itself (LOG_STREAM_SYSTEM).
    pub fn system(&self, boot: u32, at: i64, text: &str) {
        let entry = pb::LogEntry {
            timestamp_unix_nanos: at,
            stream: pb::LogStream::System as i32,
            data: format!("hearth: {text}").into_bytes(),
            boot,
            ..Default::default()
        };
        if let Err(e) = self.append(entry) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write a log line");
        }
    }

    /// Counts records hearth-init had to drop.
    pub fn add_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes kept on disk (approximately, after rotation deletes).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Records hearth-init reported dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn rotate(&self, inner: &mut Inner) -> io::Result<()> {
        // Reuse the newest file after a restart while it has room.
        if inner.file.is_none() && inner.file_no > 0 {
            let path = self.dir.join(file_name(inner.file_no));
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if size < self.cfg.max_file_bytes {
                inner.file = Some(OpenOptions::new().append(true).create(true).open(path)?);
                inner.size = size;
                return Ok(());
            }
        }
        inner.file_no += 1;
        let path = self.dir.join(file_name(inner.file_no));
        inner.file = Some(OpenOptions::new().append(true).create(true).open(path)?);
        inner.size = 0;
        let numbers = file_numbers(&self.dir)?;
        let keep = self.cfg.max_files as usize;
        if numbers.len() > keep {
            for &n in &numbers[..numbers.len() - keep] {
                let path = self.dir.join(file_name(n));
                let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path)?;
                self.bytes
                    .fetch_sub(len.min(self.bytes()), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The stored entries at or after `since` (Unix ns; 0 = all), the last `tail` of them when
    /// `tail` > 0.
    pub fn read(&self, since: i64, tail: usize) -> io::Result<Vec<pb::LogEntry>> {
        let mut out = Vec::new();
        for n in file_numbers(&self.dir)? {
            let data = match fs::read(self.dir.join(file_name(n))) {
                Ok(d) => d,
                // Rotated away while we listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.extend(
                decode_records(&data)
                    .into_iter()
                    .filter(|e| e.timestamp_unix_nanos >= since),
            );
        }
        if tail > 0 && out.len() > tail {
            out.drain(..out.len() - tail);
        }
        Ok(out)
    }

    /// Stored entries, then (with `follow`) live ones, as a stream without gaps or duplicates.
    pub fn stream(
        self: &Arc<Self>,
        since: i64,
        tail: usize,
        follow: bool,
    ) -> impl Stream<Item = io::Result<pb::LogEntry>> + Send + use<> {
        let rx = follow.then(|| self.tx.subscribe());
        let stored = self.read(since, tail);
        let sink = self.clone();
        let (stored, err) = match stored {
            Ok(v) => (v, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let next_index = stored.last().map(|e| e.index + 1).unwrap_or(0);
        futures::stream::unfold(
            (stored.into_iter(), err, rx, next_index, sink, since),
            |(mut stored, mut err, mut rx, mut next, sink, since)| async move {
                if let Some(e) = err.take() {
                    return Some((Err(e), (stored, None, None, next, sink, since)));
                }
                if let Some(e) = stored.next() {
                    return Some((Ok(e), (stored, err, rx, next, sink, since)));
                }
                let r = rx.as_mut()?;
                loop {
                    match r.recv().await {
                        Ok(e) if e.index < next || e.timestamp_unix_nanos < since => continue,
                        Ok(e) => {
                            next = e.index + 1;
                            return Some((Ok(e), (stored, err, rx, next, sink, since)));
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Re-read what we missed from the files.
                            let missed: Vec<_> = match sink.read(since, 0) {
                                Ok(v) => v.into_iter().filter(|e| e.index >= next).collect(),
                                Err(e) => {
                                    return Some((Err(e), (stored, None, None, next, sink, since)));
                                }
                            };
                            if let Some(last) = missed.last() {
                                next = last.index + 1;
                            }
                            let mut it = missed.into_iter();
                            if let Some(first) = it.next() {
                                return Some((Ok(first), (it, err, rx, next, sink, since)));
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        )
    }

    /// Removes the log directory.
    pub fn remove(&self) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.file = None;
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    fn cfg(max_file_bytes: u64, max_files: u32) -> LogsConfig {
        LogsConfig {
            max_file_bytes,
            max_files,
        }
    }

    fn line(boot: u32, seq: u64, at: i64, text: &str) -> pb::LogEntry {
        pb::LogEntry {
            timestamp_unix_nanos: at,
            stream: pb::LogStream::Stdout as i32,
            data: text.as_bytes().to_vec(),
            boot,
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn rotates_by_size_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::open(dir.path(), &cfg(4096, 3)).unwrap();
        for i in 1..=1000u64 {
            sink.append(line(
                1,
                i,
                i as i64,
                &format!("line {i:04} {}\n", "x".repeat(40)),
            ))
            .unwrap();
        }
        let files = file_numbers(dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        let all = sink.read(0, 0).unwrap();
        assert_eq!(all.last().unwrap().seq, 1000);
        // Contiguous indices in what is kept.
        for w in all.windows(2) {
            assert_eq!(w[1].index, w[0].index + 1);
        }
        assert!(all.len() < 1000, "old files were deleted");
        assert_eq!(sink.read(0, 5).unwrap().len(), 5);
        assert_eq!(sink.read(995, 0).unwrap().len(), 6);
    }

    #[test]
    fn reopen_continues_after_the_newest_record_and_ignores_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let sink = LogSink::open(dir.path(), &cfg(1 << 20, 2)).unwrap();
            sink.append(line(2, 7, 1, "a\n")).unwrap();
            sink.append(line(2, 8, 2, "b\n")).unwrap();
        }
        // A crash mid-write leaves half a record.
        let path = dir.path().join(file_name(1));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 50, 1, 2]).unwrap();
        let sink = LogSink::open(dir.path(), &cfg(1 << 20, 2)).unwrap();
        assert_eq!(sink.last_init_seq(2), 8);
        assert_eq!(sink.last_init_seq(3), 0);
        assert_eq!(sink.read(0, 0).unwrap().len(), 2);
    }

    proptest::proptest! {
        /// A log file is only written by the agent, but a torn or corrupted one must never
        /// panic the reader.
        #[test]
        fn decoding_any_bytes_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = decode_records(&data);
        }
    }

    #[tokio::test]
    async fn follow_switches_from_files_to_live_without_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(LogSink::open(dir.path(), &cfg(1 << 20, 2)).unwrap());
        for i in 1..=10 {
            sink.append(line(1, i, i as i64, "old\n")).unwrap();
        }
        let mut s = Box::pin(sink.stream(0, 3, true));
        let s2 = sink.clone();
        tokio::spawn(async move {
            for i in 11..=20 {
                s2.append(line(1, i, i as i64, "new\n")).unwrap();
            }
        });
        let mut seqs = Vec::new();
        while seqs.len() < 13 {
            seqs.push(s.next().await.unwrap().unwrap().seq);
        }
        assert_eq!(seqs, (8..=20).collect::<Vec<_>>());
    }
}
