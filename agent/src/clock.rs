//! Wall-clock time as the lifecycle sees it.
//!
//! Deadlines are stored as absolute Unix times (so they survive a restart) but waited for with
//! tokio timers. [`Clock`] ties the two together: it reads the wall clock once and then advances
//! with tokio's monotonic clock, so tests that pause tokio time also pause the wall clock the
//! lifecycle sees, and a wall-clock step on the host does not fire timers early.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Unix nanoseconds.
pub type UnixNanos = i64;

/// A wall clock that advances with tokio time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_unix: UnixNanos,
    base_instant: Instant,
}

impl Clock {
    /// A clock anchored at the current wall-clock time.
    pub fn new() -> Self {
        Self {
            base_unix: system_now(),
            base_instant: Instant::now(),
        }
    }

    /// Now, in Unix nanoseconds.
    pub fn now(&self) -> UnixNanos {
        let elapsed = Instant::now().saturating_duration_since(self.base_instant);
        self.base_unix
            .saturating_add(i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
    }

    /// The tokio instant at which the Unix time `at` is reached (now, when it is past).
    pub fn instant_at(&self, at: UnixNanos) -> Instant {
        let now = self.now();
        let ahead = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
        Instant::now() + Duration::from_nanos(ahead)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The system's wall clock, in Unix nanoseconds.
pub fn system_now() -> UnixNanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A duration as nanoseconds, saturating.
pub fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn advances_with_paused_tokio_time() {
        let clock = Clock::new();
        let t0 = clock.now();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now() - t0, 90_000_000_000);
        let at = clock.now() + 5_000_000_000;
        assert_eq!(
            clock.instant_at(at) - Instant::now(),
            Duration::from_secs(5)
        );
        assert!(clock.instant_at(t0) <= Instant::now());
    }
}
