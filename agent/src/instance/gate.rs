//! Starts in flight, so background work can stay out of their way.
//!
//! Refilling the warm pools and preparing interfaces take the kernel's network locks (netns
//! creation, veths, TCX links wait for grace periods under RTNL) and CPU; a start in progress
//! needs the same locks a moment later (hearth-init configures its interface) and the CPU. So
//! that background work waits until no start is in flight, for at most a bounded time (a node
//! that is never quiet still refills).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

#[derive(Debug, Default)]
struct State {
    in_flight: u32,
    /// When the current busy spell began.
    since: Option<Instant>,
}

/// How long background work waits at most for a busy spell to end.
pub const MAX_HOLD: Duration = Duration::from_secs(2);

/// Counts starts in flight.
#[derive(Debug, Default)]
pub struct StartGate {
    state: Mutex<State>,
    idle: Notify,
}

/// One start in flight; dropping it ends it.
#[derive(Debug)]
pub struct StartGuard {
    gate: Arc<StartGate>,
}

impl StartGate {
    /// A new gate.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A start begins.
    pub fn begin(self: &Arc<Self>) -> StartGuard {
        let mut st = self.lock();
        st.in_flight += 1;
        st.since.get_or_insert_with(Instant::now);
        StartGuard { gate: self.clone() }
    }

    /// Starts in flight now.
    pub fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    /// Returns once no start is in flight, or once the current busy spell has lasted
    /// `max_hold`.
    pub async fn quiet(&self, max_hold: Duration) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let st = self.lock();
                match st.since {
                    None => return,
                    Some(since) => since + max_hold,
                }
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        if st.in_flight == 0 {
            st.since = None;
            drop(st);
            self.gate.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_starts_but_not_forever() {
        let gate = StartGate::new();
        gate.quiet(Duration::from_secs(1)).await;
        let g = gate.begin();
        let g2 = gate.begin();
        assert_eq!(gate.in_flight(), 2);
        let t = Instant::now();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.quiet(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(g);
        assert!(!waiter.is_finished());
        drop(g2);
        waiter.await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
        // A spell that never ends is waited for `max_hold` at most.
        let _busy = gate.begin();
        let t = Instant::now();
        gate.quiet(Duration::from_secs(2)).await;
        assert_eq!(t.elapsed(), Duration::from_secs(2));
    }
}
