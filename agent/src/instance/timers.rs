//! The deadlines a supervisor waits on, as plain arithmetic on Unix nanoseconds.
//!
//! Deadlines are absolute wall-clock times (stored with the instance, so they hold across an
//! agent restart); the supervisor turns the earliest into a tokio sleep through
//! [`Clock::instant_at`](crate::clock::Clock::instant_at).

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// hearth-init has not connected in time.
    Connect,
    /// The stop grace (plus the kill margin) ran out, or init reported the exit but the
    /// process does not end: kill the runtime.
    Kill,
    /// sleep_after ran out.
    Activity,
    /// The delay between activity_expired and its stop ran out.
    ExpiryStop,
    /// The activity deadline moved and should be stored.
    Persist,
}

/// The supervisor's pending deadlines (Unix ns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadlines {
    /// Init must connect by then.
    pub connect: Option<i64>,
    /// Kill the runtime then.
    pub kill: Option<i64>,
    /// sleep_after ends then.
    pub activity: Option<i64>,
    /// Stop for activity expiry then.
    pub expiry_stop: Option<i64>,
    /// Store the activity deadline then.
    pub persist: Option<i64>,
}

impl Deadlines {
    /// The earliest deadline and what it is for.
    pub fn next(&self) -> Option<(i64, Timer)> {
        [
            (self.connect, Timer::Connect),
            (self.kill, Timer::Kill),
            (self.activity, Timer::Activity),
            (self.expiry_stop, Timer::ExpiryStop),
            (self.persist, Timer::Persist),
        ]
        .into_iter()
        .filter_map(|(at, t)| at.map(|at| (at, t)))
        .min_by_key(|(at, _)| *at)
    }
}

/// When sleep_after runs out: `sleep_after_ms` after the last activity; never when
/// `sleep_after_ms` is 0; not again after an expiry until there was activity after it.
pub fn activity_deadline(
    last_activity: i64,
    sleep_after_ms: i64,
    expired_at: Option<i64>,
) -> Option<i64> {
    if sleep_after_ms <= 0 {
        return None;
    }
    if let Some(at) = expired_at
        && last_activity <= at
    {
        return None;
    }
    Some(last_activity.saturating_add(sleep_after_ms.saturating_mul(1_000_000)))
}

/// When the runtime is killed after a stop: the end of the grace plus the margin init has to
/// report the exit.
pub fn kill_deadline(stop_deadline: i64, margin_ms: i64) -> i64 {
    stop_deadline.saturating_add(margin_ms.saturating_mul(1_000_000))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::Clock;

    const S: i64 = 1_000_000_000;

    #[test]
    fn earliest_wins() {
        let d = Deadlines {
            connect: Some(30 * S),
            activity: Some(10 * S),
            kill: Some(20 * S),
            ..Default::default()
        };
        assert_eq!(d.next(), Some((10 * S, Timer::Activity)));
        assert_eq!(Deadlines::default().next(), None);
    }

    #[test]
    fn activity_rules() {
        assert_eq!(activity_deadline(5 * S, 2_000, None), Some(7 * S));
        assert_eq!(activity_deadline(5 * S, 0, None), None);
        // Expired at 7 s with no activity since: no new deadline until some.
        assert_eq!(activity_deadline(5 * S, 2_000, Some(7 * S)), None);
        assert_eq!(activity_deadline(8 * S, 2_000, Some(7 * S)), Some(10 * S));
        assert_eq!(kill_deadline(10 * S, 5_000), 15 * S);
    }

    /// The supervisor's wait, in miniature: sleep until the earliest deadline with paused tokio
    /// time, and observe that renewed activity pushes the expiry out.
    #[tokio::test(start_paused = true)]
    async fn sleeping_until_deadlines_with_paused_time() {
        let clock = Clock::new();
        let start = clock.now();
        let mut last_activity = start;
        let mut fired = Vec::new();
        let mut renewed = false;
        loop {
            let d = Deadlines {
                activity: activity_deadline(last_activity, 600_000, None),
                kill: None,
                ..Default::default()
            };
            let (at, timer) = d.next().unwrap();
            tokio::time::sleep_until(clock.instant_at(at)).await;
            fired.push((timer, (clock.now() - start) / S));
            if !renewed {
                // Activity 5 minutes into the second period.
                renewed = true;
                last_activity = clock.now() + 300 * S;
                tokio::time::advance(Duration::from_secs(300)).await;
                continue;
            }
            break;
        }
        assert_eq!(fired, [(Timer::Activity, 600), (Timer::Activity, 1500)]);
    }
}
