//! What a spawned child (the workload, an exec'd command) does between `fork` and `exec`.
//!
//! Everything is prepared in the parent; the child only makes async-signal-safe system calls
//! (no allocation, no locks), because a forked child of a threaded process may not do more.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    os::unix::process::CommandExt as _,
    process::Command,
    sync::Arc,
};

use crate::workload::rlimit::Rlimit;

/// Who the child becomes.
#[derive(Debug, Clone)]
pub struct ChildIdentity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

/// The setup a child applies to itself before `exec`.
#[derive(Debug, Clone, Default)]
pub struct ChildSetup {
    /// `cgroup.procs` files to join (opened for writing by the parent).
    pub cgroup_procs: Vec<Arc<OwnedFd>>,
    /// Limits to set.
    pub rlimits: Vec<Rlimit>,
    /// User and groups; `None` keeps root.
    pub identity: Option<ChildIdentity>,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl ChildSetup {
    /// Runs in the child after `fork`.
    fn apply(&self) -> io::Result<()> {
        // SAFETY: plain system calls on integers and on memory owned by `self`,
        // which the child's copy of the address space keeps alive until exec.
        unsafe {
            // Own session and process group, so signals reach the workload's whole tree and
            // nothing from init's terminal does.
            check(libc::setsid())?;
            for fd in &self.cgroup_procs {
                // "0" means the writing process.
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // init protects itself from the OOM killer; its children must not inherit that.
            let adj = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if adj >= 0 {
                libc::write(adj, b"0".as_ptr().cast(), 1);
                libc::close(adj);
            }
            for r in &self.rlimits {
                let lim = libc::rlimit {
                    rlim_cur: r.soft as libc::rlim_t,
                    rlim_max: r.hard as libc::rlim_t,
                };
                check(libc::setrlimit(r.resource as _, &lim))?;
            }
            if let Some(id) = &self.identity {
                check(libc::setgroups(id.groups.len(), id.groups.as_ptr()))?;
                check(libc::setgid(id.gid))?;
                check(libc::setuid(id.uid))?;
            }
        }
        Ok(())
    }

    /// Arranges for the child spawned by `cmd` to apply this setup before `exec`.
    pub fn install(self, cmd: &mut Command) {
        // SAFETY: `apply` makes only async-signal-safe system calls on data prepared here and
        // moved into the closure; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || self.apply());
        }
    }
}
