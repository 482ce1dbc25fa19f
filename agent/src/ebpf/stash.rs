//! Filters loaded ahead of time: [`Filter::load`] spends most of its ~0.1-0.2 s in the kernel's
//! verifier, which has nothing to do with the instance it is for. A [`Stash`] keeps a few
//! filters loaded with a placeholder policy (nothing allowed), refilled by one background
//! thread at the lowest CPU priority; an instance's start takes one, gives it its policy with
//! [`Filter::update_policy`] (microseconds) and attaches it. When the stash is empty (a burst of
//! starts) the start loads its own, as without a stash.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use super::{Filter, FilterError, LoadOptions, Policy};

/// How long the refill thread waits after a failed load before it tries again.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct State {
    filters: Vec<Filter>,
    stopped: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    want: usize,
    options: LoadOptions,
}

/// Up to `want` loaded, unattached filters. Dropping the stash stops its thread and unloads
/// what it holds.
#[derive(Debug)]
pub struct Stash {
    shared: Arc<Shared>,
}

impl Stash {
    /// A stash of `want` filters loaded with `options`, filled from now on by a background
    /// thread. `want` 0 keeps nothing (every take loads).
    pub fn new(want: usize, options: LoadOptions) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            want,
            options,
        });
        if want > 0 {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("ebpf-stash".into())
                .spawn(move || refill(&s));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the eBPF filter stash; filters load on demand");
            }
        }
        Self { shared }
    }

    /// A filter with `policy` in force, not attached: from the stash when it has one, else
    /// loaded now (slow: call on a blocking thread).
    pub fn take(&self, policy: &Policy) -> Result<Filter, FilterError> {
        let stashed = {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let f = st.filters.pop();
            self.shared.changed.notify_all();
            f
        };
        match stashed {
            Some(mut f) => {
                f.update_policy(policy)?;
                Ok(f)
            }
            None => Filter::load(policy, &self.shared.options),
        }
    }

    /// Filters ready now.
    pub fn len(&self) -> usize {
        self.lock().filters.len()
    }

    /// Whether none is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Stash {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.stopped = true;
        st.filters.clear();
        self.shared.changed.notify_all();
    }
}

fn refill(s: &Shared) {
    // The verifier's work runs in this thread: let it yield to everything else.
    if let Err(e) = super::sys::lowest_thread_priority() {
        tracing::debug!(error = %e, "cannot lower the eBPF stash thread's priority");
    }
    // Nothing is allowed until the real policy replaces this one.
    let placeholder = Policy::new([0x02, 0, 0, 0, 0, 0]);
    loop {
        {
            let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
            while !st.stopped && st.filters.len() >= s.want {
                st = s.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.stopped {
                return;
            }
        }
        match Filter::load(&placeholder, &s.options) {
            Ok(f) => {
                let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.stopped {
                    return;
                }
                st.filters.push(f);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load an eBPF filter ahead of time");
                let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                let _ = s.changed.wait_timeout(st, RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stashed_filters_take_the_given_policy() {
        hearth_testkit::require!(hearth_testkit::skip::root());
        let stash = Stash::new(1, LoadOptions::default());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while stash.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the stash never filled"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut policy = Policy::new([0x02, 0, 0, 0, 0, 1]);
        policy.instance_ipv4 = Some(std::net::Ipv4Addr::new(10, 0, 0, 2));
        let f = stash.take(&policy).unwrap();
        // Loaded as version 1 with the placeholder, then given the policy.
        assert_eq!(f.policy_version(), 2);
        // An empty stash loads on demand.
        let empty = Stash::new(0, LoadOptions::default());
        assert_eq!(empty.take(&policy).unwrap().policy_version(), 1);
    }
}
