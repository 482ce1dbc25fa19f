//! PID 1's duty: reap every child that ends, including orphans re-parented to init, and hand
//! the status of the ones init waits for (the workload, exec'd commands) to their waiter.
//!
//! Children are spawned with `std::process::Command` and never waited on through it; all
//! waiting happens here (`waitpid(-1)` on every SIGCHLD). The runtime is single-threaded, so a
//! child registered right after `spawn` (with no `.await` in between) cannot be reaped before
//! its waiter exists.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use nix::{
    errno::Errno,
    sys::wait::{WaitPidFlag, WaitStatus, waitpid},
    unistd::Pid,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// The shell convention: the status, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
        }
    }
}

type Waiters = Arc<Mutex<HashMap<i32, oneshot::Sender<Exit>>>>;

/// Hands out exit statuses of watched children.
#[derive(Debug, Clone)]
pub struct Reaper {
    waiters: Waiters,
}

impl Reaper {
    /// Starts reaping (installs the SIGCHLD handler); call before spawning anything.
    pub fn start() -> std::io::Result<Self> {
        let waiters: Waiters = Arc::default();
        let mut sigchld = signal(SignalKind::child())?;
        let w = waiters.clone();
        tokio::spawn(async move {
            loop {
                reap_all(&w);
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(Self { waiters })
    }

    /// The status of `pid` once it ends. Register right after spawning, before any `.await`.
    pub fn watch(&self, pid: u32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let pid = i32::try_from(pid).unwrap_or(i32::MAX);
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, tx);
        rx
    }
}

fn reap_all(waiters: &Waiters) {
    loop {
        let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!("waitpid failed: {e}");
                return;
            }
        };
        let waiter = waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid.as_raw());
        match waiter {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => tracing::debug!(pid = pid.as_raw(), ?exit, "reaped an orphan"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(Exit::Code(3).code(), 3);
        assert_eq!(Exit::Signal(9).code(), 137);
        assert_eq!(Exit::Signal(15).code(), 143);
    }

    // The reaper waits for these children, not `Child::wait`.
    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn statuses_reach_their_waiters() {
        let reaper = Reaper::start().unwrap();
        let a = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let rx_a = reaper.watch(a.id());
        let b = std::process::Command::new("sh")
            .args(["-c", "kill -USR1 $$"])
            .spawn()
            .unwrap();
        let rx_b = reaper.watch(b.id());
        assert_eq!(rx_a.await.unwrap(), Exit::Code(7));
        assert_eq!(rx_b.await.unwrap(), Exit::Signal(libc::SIGUSR1));
    }
}
