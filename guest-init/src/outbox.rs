//! Everything init has to tell the agent, queued until the link can send it.
//!
//! Producers (the supervisor, the log pumps, exec tasks) never wait: they push and move on. The
//! link takes batches when it is connected. Log records live in the bounded [`LogBuffer`];
//! control messages (Started, Ready, Exited, ...) in an unbounded queue (there are few);
//! metrics keep only the latest sample and are not queued while disconnected.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use hearth_proto::init::{GuestMessage, LogStream, Metrics, guest_message::Msg};
use tokio::sync::Notify;

use crate::logs::{LogBuffer, Outgoing};

/// Unix time in nanoseconds.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[derive(Debug)]
struct Control {
    msg: Msg,
    /// Hold back until every log record pushed before it is sent (Exited).
    after_logs: bool,
}

#[derive(Debug, Default)]
struct Inner {
    logs: LogBuffer,
    /// State repeated after a reconnect: sent before anything else.
    first: VecDeque<Msg>,
    control: VecDeque<Control>,
    metrics: Option<Metrics>,
}

/// The queue between init's producers and the link.
#[derive(Debug, Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl Outbox {
    /// An outbox with a log buffer of the given bounds.
    pub fn new(logs: LogBuffer) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                logs,
                ..Inner::default()
            }),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a log record (never blocks; may drop the oldest).
    pub fn log(&self, stream: LogStream, data: Vec<u8>, partial: bool) {
        self.lock().logs.push(stream, now_nanos(), data, partial);
        self.notify.notify_one();
    }

    /// Queues a control message.
    pub fn send(&self, msg: Msg) {
        self.lock().control.push_back(Control {
            msg,
            after_logs: false,
        });
        self.notify.notify_one();
    }

    /// Queues a control message that must follow every log record pushed so far (`Exited`).
    pub fn send_after_logs(&self, msg: Msg) {
        self.lock().control.push_back(Control {
            msg,
            after_logs: true,
        });
        self.notify.notify_one();
    }

    /// Queues messages to go before everything else (state repeated after a reconnect).
    pub fn send_first(&self, msgs: Vec<Msg>) {
        self.lock().first.extend(msgs);
        self.notify.notify_one();
    }

    /// Replaces the pending metrics sample.
    pub fn metrics(&self, m: Metrics) {
        self.lock().metrics = Some(m);
        self.notify.notify_one();
    }

    /// The newest log seq.
    pub fn last_log_seq(&self) -> u64 {
        self.lock().logs.last_seq()
    }

    /// The agent stored records up to `seq`.
    pub fn ack(&self, seq: u64) {
        self.lock().logs.ack(seq);
    }

    /// A new connection: resend records after `resume_after`; drop a stale metrics sample.
    pub fn rewind(&self, resume_after: u64) {
        let mut inner = self.lock();
        inner.logs.rewind(resume_after);
        inner.metrics = None;
        drop(inner);
        self.notify.notify_one();
    }

    /// Up to `max` messages to send now, oldest first: repeated state, log records (and drop
    /// reports), control messages, the metrics sample.
    pub fn take(&self, max: usize) -> Vec<GuestMessage> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        while out.len() < max
            && let Some(m) = inner.first.pop_front()
        {
            out.push(m.into());
        }
        while out.len() < max {
            match inner.logs.next_outgoing() {
                Some(Outgoing::Record(r)) => out.push(Msg::Log(r).into()),
                Some(Outgoing::Dropped(d)) => out.push(Msg::LogsDropped(d).into()),
                None => break,
            }
        }
        let logs_sent = inner.logs.all_sent();
        while out.len() < max {
            match inner.control.front() {
                Some(c) if c.after_logs && !logs_sent => break,
                Some(_) => {
                    if let Some(c) = inner.control.pop_front() {
                        out.push(c.msg.into());
                    }
                }
                None => break,
            }
        }
        if out.len() < max
            && let Some(m) = inner.metrics.take()
        {
            out.push(Msg::Metrics(m).into());
        }
        out
    }

    /// True when nothing is waiting to be sent.
    pub fn drained(&self) -> bool {
        let inner = self.lock();
        inner.logs.all_sent() && inner.control.is_empty() && inner.first.is_empty()
    }

    /// Waits until something is pushed (a push made before the call also counts).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::init::{Exited, Started};

    fn kinds(msgs: &[GuestMessage]) -> Vec<&'static str> {
        msgs.iter()
            .map(|m| hearth_proto::channel::guest_kind(m.msg.as_ref().unwrap()))
            .collect()
    }

    #[test]
    fn exited_waits_for_the_logs_before_it() {
        let o = Outbox::new(LogBuffer::default());
        o.send(Msg::Started(Started::default()));
        for _ in 0..3 {
            o.log(LogStream::Stdout, b"x".to_vec(), false);
        }
        o.send_after_logs(Msg::Exited(Exited::default()));
        o.metrics(Metrics::default());
        // A small batch: two records, and Exited must not overtake the third.
        assert_eq!(kinds(&o.take(2)), vec!["LogRecord", "LogRecord"]);
        assert_eq!(
            kinds(&o.take(10)),
            vec!["LogRecord", "Started", "Exited", "Metrics"]
        );
        assert!(o.drained());
        assert!(o.take(10).is_empty());
    }

    #[test]
    fn state_is_repeated_first_after_a_reconnect() {
        let o = Outbox::new(LogBuffer::default());
        o.log(LogStream::Stderr, b"a".to_vec(), false);
        o.log(LogStream::Stderr, b"b".to_vec(), false);
        assert_eq!(o.take(10).len(), 2);
        o.ack(1);
        o.rewind(1);
        o.send_first(vec![Msg::Started(Started::default())]);
        let msgs = o.take(10);
        assert_eq!(kinds(&msgs), vec!["Started", "LogRecord"]);
        assert!(matches!(&msgs[1].msg, Some(Msg::Log(r)) if r.seq == 2));
    }
}
