//! Workload output as log records: splitting the byte streams into records, and the bounded
//! buffer that holds records until the agent acknowledges them.
//!
//! The buffer is what keeps a slow or absent agent from blocking the workload: pushing never
//! waits; when the buffer is full the oldest record goes. Records that were dropped before they
//! were ever sent are reported with one `LogsDropped` frame, sent in their place. After a
//! reconnect the agent says which seq it has stored ([`LogBuffer::rewind`]); init resends the
//! newer records it still holds and reports a `LogsDropped` for any it no longer has.

use std::collections::VecDeque;

use hearth_proto::init::{LogRecord, LogStream, LogsDropped};

/// Largest `data` of one record; longer lines are split (`partial` on all pieces but the last).
pub const MAX_RECORD_DATA: usize = 16 * 1024;

/// Default bound on the bytes of buffered (unacknowledged) record data.
pub const DEFAULT_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Default bound on the number of buffered (unacknowledged) records.
pub const DEFAULT_MAX_RECORDS: usize = 16 * 1024;

/// One piece of output cut by [`LineSplitter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The bytes, without the line's newline.
    pub data: Vec<u8>,
    /// True when the line continues in the next piece.
    pub partial: bool,
}

/// Cuts a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    pending: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter for pieces of at most `max` (> 0) bytes.
    pub fn new(max: usize) -> Self {
        assert!(max > 0, "pieces must be able to hold a byte");
        Self {
            pending: Vec::new(),
            max,
        }
    }

    /// True when bytes of an unfinished line are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Feeds `data`; appends every piece it completes to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Piece>) {
        while let Some(&first) = data.first() {
            if self.pending.len() == self.max {
                // A full piece is only known to be partial once more of the line arrives.
                let partial = first != b'\n';
                out.push(Piece {
                    data: std::mem::take(&mut self.pending),
                    partial,
                });
                if !partial {
                    data = &data[1..];
                    continue;
                }
            }
            let n = (self.max - self.pending.len()).min(data.len());
            match data[..n].iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&data[..i]);
                    out.push(Piece {
                        data: std::mem::take(&mut self.pending),
                        partial: false,
                    });
                    data = &data[i + 1..];
                }
                None => {
                    self.pending.extend_from_slice(&data[..n]);
                    data = &data[n..];
                }
            }
        }
    }

    /// Emits the unfinished line: as a partial piece when the stream is only idle
    /// (`eof == false`), as the line's end at end of stream.
    pub fn flush(&mut self, eof: bool) -> Option<Piece> {
        (!self.pending.is_empty()).then(|| Piece {
            data: std::mem::take(&mut self.pending),
            partial: !eof,
        })
    }
}

/// What the sender takes from the buffer next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Records that will never be delivered.
    Dropped(LogsDropped),
    /// The next record.
    Record(LogRecord),
}

/// The bounded buffer of records not yet acknowledged by the agent.
#[derive(Debug)]
pub struct LogBuffer {
    records: VecDeque<LogRecord>,
    bytes: usize,
    max_bytes: usize,
    max_records: usize,
    /// The seq the next pushed record gets (seqs start at 1).
    next_seq: u64,
    /// The seq the sender sends next.
    send_from: u64,
    /// Records dropped before they were sent, not yet reported.
    dropped: Option<(u64, u64)>,
}

impl Default for LogBuffer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS)
    }
}

impl LogBuffer {
    /// A buffer holding at most `max_bytes` of record data and `max_records` records.
    pub fn new(max_bytes: usize, max_records: usize) -> Self {
        Self {
            records: VecDeque::new(),
            bytes: 0,
            max_bytes: max_bytes.max(MAX_RECORD_DATA),
            max_records: max_records.max(1),
            next_seq: 1,
            send_from: 1,
            dropped: None,
        }
    }

    /// The seq of the newest record pushed so far (0 = none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Records currently held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// True when everything pushed has been handed to the sender (or reported dropped).
    pub fn all_sent(&self) -> bool {
        self.dropped.is_none() && self.send_from >= self.next_seq
    }

    /// Appends a record; never blocks, drops the oldest records when full. Returns its seq.
    pub fn push(
        &mut self,
        stream: LogStream,
        timestamp_unix_nanos: i64,
        data: Vec<u8>,
        partial: bool,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += data.len();
        self.records.push_back(LogRecord {
            seq,
            stream: stream as i32,
            timestamp_unix_nanos,
            data,
            partial,
        });
        while self.bytes > self.max_bytes || self.records.len() > self.max_records {
            let Some(old) = self.records.pop_front() else {
                break;
            };
            self.bytes -= old.data.len();
            if old.seq >= self.send_from {
                // Never sent: it is lost, say so in its place.
                self.dropped = Some(match self.dropped {
                    Some((first, _)) => (first, old.seq),
                    None => (old.seq, old.seq),
                });
                self.send_from = old.seq + 1;
            }
        }
        seq
    }

    /// The agent has stored every record up to and including `seq`.
    pub fn ack(&mut self, seq: u64) {
        let seq = seq.min(self.send_from.saturating_sub(1));
        while self.records.front().is_some_and(|r| r.seq <= seq) {
            if let Some(r) = self.records.pop_front() {
                self.bytes -= r.data.len();
            }
        }
    }

    /// A new connection: the agent has stored records up to `resume_after`; send from there.
    pub fn rewind(&mut self, resume_after: u64) {
        let resume_after = resume_after.min(self.last_seq());
        self.ack(resume_after.min(self.send_from.saturating_sub(1)));
        let oldest = self.records.front().map_or(self.next_seq, |r| r.seq);
        let want = resume_after + 1;
        if want < oldest {
            self.dropped = Some((want, oldest - 1));
            self.send_from = oldest;
        } else {
            self.dropped = None;
            self.send_from = want;
            // Anything older than `want` is stored by the agent.
            while self.records.front().is_some_and(|r| r.seq < want) {
                if let Some(r) = self.records.pop_front() {
                    self.bytes -= r.data.len();
                }
            }
        }
    }

    /// The next thing to send, advancing the send position (the record stays buffered until
    /// acknowledged).
    pub fn next_outgoing(&mut self) -> Option<Outgoing> {
        if let Some((first, last)) = self.dropped.take() {
            return Some(Outgoing::Dropped(LogsDropped {
                count: last - first + 1,
                first_seq: first,
                last_seq: last,
            }));
        }
        let front = self.records.front()?.seq;
        let index = usize::try_from(self.send_from.checked_sub(front)?).ok()?;
        let record = self.records.get(index)?.clone();
        self.send_from = record.seq + 1;
        Some(Outgoing::Record(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pieces(max: usize, chunks: &[&[u8]]) -> Vec<Piece> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out.extend(s.flush(true));
        out
    }

    fn p(data: &str, partial: bool) -> Piece {
        Piece {
            data: data.as_bytes().to_vec(),
            partial,
        }
    }

    #[test]
    fn lines_are_cut_at_newlines_and_at_the_limit() {
        assert_eq!(
            pieces(4, &[b"ab\ncd", b"ef\n\nabcdefghi\nx"]),
            vec![
                p("ab", false),
                p("cdef", false),
                p("", false),
                p("abcd", true),
                p("efgh", true),
                p("i", false),
                p("x", false),
            ]
        );
        // A line of exactly the limit is one piece, not a piece and an empty one.
        assert_eq!(pieces(4, &[b"abcd\n"]), vec![p("abcd", false)]);
        let mut s = LineSplitter::new(8);
        let mut out = Vec::new();
        s.push(b"prompt> ", &mut out);
        assert!(out.is_empty() && s.has_pending());
        assert_eq!(s.flush(false), Some(p("prompt> ", true)));
        assert_eq!(s.flush(false), None);
    }

    fn push(b: &mut LogBuffer, data: &str) -> u64 {
        b.push(LogStream::Stdout, 0, data.as_bytes().to_vec(), false)
    }

    fn drain(b: &mut LogBuffer) -> Vec<Outgoing> {
        std::iter::from_fn(|| b.next_outgoing()).collect()
    }

    fn seqs(out: &[Outgoing]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o {
                Outgoing::Record(r) => Some(r.seq),
                Outgoing::Dropped(_) => None,
            })
            .collect()
    }

    #[test]
    fn records_stay_until_acked_and_resend_after_rewind() {
        let mut b = LogBuffer::default();
        for i in 0..5 {
            assert_eq!(push(&mut b, &format!("line {i}")), i + 1);
        }
        assert_eq!(seqs(&drain(&mut b)), vec![1, 2, 3, 4, 5]);
        assert!(b.all_sent());
        b.ack(2);
        assert_eq!(b.len(), 3);
        // The connection broke; the new one has stored up to 3.
        b.rewind(3);
        assert_eq!(seqs(&drain(&mut b)), vec![4, 5]);
        // Acks beyond what was sent are clamped.
        push(&mut b, "six");
        b.ack(100);
        assert_eq!(b.len(), 1);
        assert_eq!(seqs(&drain(&mut b)), vec![6]);
    }

    #[test]
    fn overflow_drops_oldest_and_reports_unsent_drops() {
        let mut b = LogBuffer::new(0, 3);
        push(&mut b, "1");
        assert_eq!(seqs(&drain(&mut b)), vec![1]);
        for i in 2..=6 {
            push(&mut b, &i.to_string());
        }
        // 1 was sent (not reported); 2 and 3 were never sent.
        let out = drain(&mut b);
        assert_eq!(
            out[0],
            Outgoing::Dropped(LogsDropped {
                count: 2,
                first_seq: 2,
                last_seq: 3
            })
        );
        assert_eq!(seqs(&out), vec![4, 5, 6]);
        // A reconnect where the agent has only 1: 2..3 are gone, 4..6 are resent.
        b.rewind(1);
        let out = drain(&mut b);
        assert_eq!(
            out[0],
            Outgoing::Dropped(LogsDropped {
                count: 2,
                first_seq: 2,
                last_seq: 3
            })
        );
        assert_eq!(seqs(&out), vec![4, 5, 6]);
    }

    #[test]
    fn rewind_past_what_exists_is_clamped() {
        let mut b = LogBuffer::default();
        push(&mut b, "a");
        b.rewind(99);
        assert!(b.all_sent());
        assert!(drain(&mut b).is_empty());
        push(&mut b, "b");
        assert_eq!(seqs(&drain(&mut b)), vec![2]);
    }

    proptest! {
        #[test]
        fn splitting_loses_no_byte(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
            max in 1usize..20,
        ) {
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let out = pieces(max, &refs);
            let mut rebuilt = Vec::new();
            for piece in &out {
                prop_assert!(piece.data.len() <= max);
                rebuilt.extend_from_slice(&piece.data);
                if !piece.partial {
                    rebuilt.push(b'\n');
                }
            }
            let mut input: Vec<u8> = chunks.concat();
            if !input.is_empty() && input.last() != Some(&b'\n') {
                input.push(b'\n');
            }
            prop_assert_eq!(rebuilt, input);
        }

        #[test]
        fn every_seq_is_delivered_or_reported(
            ops in proptest::collection::vec(0u8..4, 0..200),
        ) {
            let mut b = LogBuffer::new(0, 8);
            let mut seen = std::collections::BTreeSet::new();
            let mut acked = 0;
            for op in ops {
                match op {
                    0 | 1 => { push(&mut b, "x"); }
                    2 => {
                        for o in drain(&mut b) {
                            match o {
                                Outgoing::Record(r) => { seen.insert(r.seq); }
                                Outgoing::Dropped(d) => { seen.extend(d.first_seq..=d.last_seq); }
                            }
                        }
                        acked = b.last_seq();
                        b.ack(acked);
                    }
                    _ => b.rewind(acked),
                }
            }
            for o in drain(&mut b) {
                match o {
                    Outgoing::Record(r) => { seen.insert(r.seq); }
                    Outgoing::Dropped(d) => { seen.extend(d.first_seq..=d.last_seq); }
                }
            }
            let all: std::collections::BTreeSet<u64> = (1..=b.last_seq()).collect();
            prop_assert_eq!(seen, all);
        }
    }
}
