//! The proxy's counters, declared next to the code that counts them, and a limiter for log
//! lines that clients or instances can trigger.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Counters of the ingress proxy (totals since start, plus two gauges).
#[derive(Debug, Default)]
pub struct IngressMetrics {
    pub(crate) connections: AtomicU64,
    pub(crate) connections_open: AtomicI64,
    pub(crate) requests: AtomicU64,
    pub(crate) proxied: AtomicU64,
    pub(crate) bad_request: AtomicU64,
    pub(crate) unknown_instance: AtomicU64,
    pub(crate) not_ready: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
    pub(crate) starts_on_request: AtomicU64,
    pub(crate) upgrades: AtomicU64,
    pub(crate) tunnels_open: AtomicI64,
}

/// A copy of [`IngressMetrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IngressSnapshot {
    /// Connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub connections_open: i64,
    /// Requests received.
    pub requests: u64,
    /// Requests forwarded to an instance that answered.
    pub proxied: u64,
    /// 400 answers (no or invalid instance id).
    pub bad_request: u64,
    /// 404 answers.
    pub unknown_instance: u64,
    /// 503 answers.
    pub not_ready: u64,
    /// 502 answers for failed instances or failed starts.
    pub failed: u64,
    /// 502 answers because the instance could not be reached or broke the connection.
    pub upstream_errors: u64,
    /// Starts on request asked of the agent.
    pub starts_on_request: u64,
    /// Connections upgraded (WebSocket and other `Upgrade`s).
    pub upgrades: u64,
    /// Upgraded connections open now.
    pub tunnels_open: i64,
}

impl IngressMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> IngressSnapshot {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let g = |a: &AtomicI64| a.load(Ordering::Relaxed);
        IngressSnapshot {
            connections: c(&self.connections),
            connections_open: g(&self.connections_open),
            requests: c(&self.requests),
            proxied: c(&self.proxied),
            bad_request: c(&self.bad_request),
            unknown_instance: c(&self.unknown_instance),
            not_ready: c(&self.not_ready),
            failed: c(&self.failed),
            upstream_errors: c(&self.upstream_errors),
            starts_on_request: c(&self.starts_on_request),
            upgrades: c(&self.upgrades),
            tunnels_open: g(&self.tunnels_open),
        }
    }

    /// Appends the counters in Prometheus text format (`hearth_ingress_*`).
    pub fn render_prometheus(&self, out: &mut String) {
        let s = self.snapshot();
        let counters: [(&str, &str, u64); 10] = [
            ("connections_total", "Connections accepted.", s.connections),
            ("requests_total", "Requests received.", s.requests),
            ("proxied_total", "Requests an instance answered.", s.proxied),
            ("bad_request_total", "400 answers.", s.bad_request),
            ("unknown_instance_total", "404 answers.", s.unknown_instance),
            ("not_ready_total", "503 answers.", s.not_ready),
            (
                "failed_total",
                "502 answers for failed instances or starts.",
                s.failed,
            ),
            (
                "upstream_errors_total",
                "502 answers for unreachable instances.",
                s.upstream_errors,
            ),
            (
                "starts_on_request_total",
                "Starts on request.",
                s.starts_on_request,
            ),
            ("upgrades_total", "Upgraded connections.", s.upgrades),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP hearth_ingress_{name} {help}\n# TYPE hearth_ingress_{name} counter\nhearth_ingress_{name} {v}"
            );
        }
        for (name, help, v) in [
            ("connections_open", "Connections open.", s.connections_open),
            ("tunnels_open", "Upgraded connections open.", s.tunnels_open),
        ] {
            let _ = writeln!(
                out,
                "# HELP hearth_ingress_{name} {help}\n# TYPE hearth_ingress_{name} gauge\nhearth_ingress_{name} {v}"
            );
        }
    }
}

/// Lets through at most `per_window` events per 10-second window (for warnings that clients or
/// instances can cause at will).
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window: AtomicU64,
    count: AtomicU64,
    per_window: u64,
}

impl LogLimiter {
    pub(crate) const fn new(per_window: u64) -> LogLimiter {
        LogLimiter {
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
            per_window,
        }
    }

    /// Whether to log this event.
    pub(crate) fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 10);
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < self.per_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_lets_a_few_through() {
        let l = LogLimiter::new(3);
        let allowed = (0..100).filter(|_| l.allow()).count();
        // A window boundary may fall inside the loop.
        assert!((3..=6).contains(&allowed), "{allowed}");
    }

    #[test]
    fn prometheus_text_names_every_counter() {
        let m = IngressMetrics::default();
        IngressMetrics::inc(&m.requests);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        assert!(out.contains("hearth_ingress_requests_total 1\n"), "{out}");
        assert!(
            out.contains("# TYPE hearth_ingress_tunnels_open gauge"),
            "{out}"
        );
    }
}
