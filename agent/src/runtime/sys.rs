//! The raw process calls the runtimes need: pidfds, reaping through a pidfd, and spawning a
//! program as PID 1 of new namespaces. All of the agent's process-level `unsafe` is here.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

/// Opens a pidfd for `pid` (works for processes that are not our children, e.g. after an
/// agent restart).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Registers a pidfd with tokio's reactor (readable when the process ends).
pub fn async_pidfd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the fd stays open and refers to
    // the same pidfd for the AsyncFd's whole life, and `as_raw_fd` always returns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// How a process ended, as far as we can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// Exit status when it exited.
    pub code: Option<i32>,
    /// Signal when it was killed.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// The shell convention: the code, or 128 + signal; -1 when unknown.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => -1,
        }
    }
}

/// Reaps the process behind `pidfd` without blocking. `Ok(None)`: still running.
/// `Err(ECHILD)`: it is not our child (adopted after a restart); nothing to reap.
pub fn waitid_pidfd(pidfd: &OwnedFd) -> io::Result<Option<ExitInfo>> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid value for it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: P_PIDFD with a valid fd and a valid out-pointer to a siginfo_t.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (or left it zeroed with WNOHANG and no child ready).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ExitInfo {
            code: Some(status),
            signal: None,
        },
        _ => ExitInfo {
            code: None,
            signal: Some(status),
        },
    }))
}

/// Sends `signal` through a pidfd (never hits a recycled pid).
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`spawn_namespaced`] runs.
pub struct NamespacedCommand {
    /// Program path.
    pub program: CString,
    /// argv, including `argv[0]`.
    pub args: Vec<CString>,
    /// The whole environment, `KEY=VALUE`.
    pub env: Vec<CString>,
    /// fd for stdout and stderr (stdin is /dev/null).
    pub output: OwnedFd,
    /// `CLONE_NEW*` flags.
    pub namespaces: libc::c_int,
    /// A network namespace to join (instead of `CLONE_NEWNET`): one prepared ahead of time
    /// with the instance's interface in it.
    pub netns: Option<std::os::fd::RawFd>,
}

/// Starts `cmd` in new namespaces (PID 1 of a new PID namespace when asked), in its own
/// session, with default signal dispositions. `place` runs in the parent after the child
/// exists and before it execs (e.g. to put it into cgroups); when it fails the child is killed.
pub fn spawn_namespaced(
    cmd: &NamespacedCommand,
    place: impl FnOnce(i32) -> io::Result<()>,
) -> io::Result<i32> {
    let mut argv: Vec<*const libc::c_char> = cmd.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = cmd.env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let devnull = CString::new("/dev/null").expect("no NUL");
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: `pipe` is a valid array of two ints.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fds were just created and are owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let out_fd = cmd.output.as_raw_fd();
    let netns = cmd.netns.unwrap_or(-1);
    let flags = (cmd.namespaces | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone without CLONE_VM and without a new stack behaves like fork: the child gets
    // a copy of our memory. In the child we only make async-signal-safe calls on memory
    // prepared above (no allocation, no locks) and end in execve or _exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // Child.
        // SAFETY: async-signal-safe syscalls on valid fds and pointers prepared before clone.
        unsafe {
            let mut b = 0u8;
            // Wait until the parent placed us (or closed the pipe because it failed).
            if libc::read(rd.as_raw_fd(), (&mut b as *mut u8).cast(), 1) != 1 {
                libc::_exit(126);
            }
            if netns >= 0 && libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                libc::_exit(126);
            }
            let null = libc::open(devnull.as_ptr(), libc::O_RDONLY);
            if null < 0
                || libc::dup2(null, 0) < 0
                || libc::dup2(out_fd, 1) < 0
                || libc::dup2(out_fd, 2) < 0
            {
                libc::_exit(126);
            }
            libc::setsid();
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            libc::execve(cmd.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    let pid = pid as i32;
    drop(rd);
    match place(pid) {
        Ok(()) => {
            // SAFETY: writing one byte from a valid buffer to our pipe end.
            let n = unsafe { libc::write(wr.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
            if n != 1 {
                let e = io::Error::last_os_error();
                kill_and_reap(pid);
                return Err(e);
            }
            Ok(pid)
        }
        Err(e) => {
            drop(wr);
            kill_and_reap(pid);
            Err(e)
        }
    }
}

fn kill_and_reap(pid: i32) {
    // SAFETY: plain syscalls on our own child's pid.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
}

/// The start time of `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`), which
/// tells a process from a later one that reuses its pid.
pub fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self() {
        let t = start_time(std::process::id() as i32).unwrap();
        assert!(t > 0);
        assert!(start_time(i32::MAX).is_err());
    }

    #[test]
    fn spawn_reap_and_exit_codes() {
        hearth_testkit::require!(hearth_testkit::skip::root());
        let out = tempfile::tempfile().unwrap();
        let cmd = NamespacedCommand {
            program: CString::new("/bin/sh").unwrap(),
            args: ["sh", "-c", "echo pid=$$; exit 7"]
                .iter()
                .map(|s| CString::new(*s).unwrap())
                .collect(),
            env: vec![CString::new("PATH=/usr/bin:/bin").unwrap()],
            output: out.try_clone().unwrap().into(),
            netns: None,
            namespaces: libc::CLONE_NEWPID | libc::CLONE_NEWUTS,
        };
        let mut placed = 0;
        let pid = spawn_namespaced(&cmd, |p| {
            placed = p;
            Ok(())
        })
        .unwrap();
        assert_eq!(placed, pid);
        let fd = pidfd_open(pid).unwrap();
        let info = loop {
            if let Some(i) = waitid_pidfd(&fd).unwrap() {
                break i;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(info.code, Some(7));
        let mut s = String::new();
        use std::io::{Read as _, Seek as _};
        let mut f = out;
        f.rewind().unwrap();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s.trim(), "pid=1", "PID 1 of its namespace");
    }

    #[test]
    fn failed_placement_kills_the_child() {
        hearth_testkit::require!(hearth_testkit::skip::root());
        let out = tempfile::tempfile().unwrap();
        let cmd = NamespacedCommand {
            program: CString::new("/bin/sleep").unwrap(),
            args: vec![CString::new("sleep").unwrap(), CString::new("100").unwrap()],
            env: vec![],
            output: out.into(),
            netns: None,
            namespaces: 0,
        };
        let err = spawn_namespaced(&cmd, |_| Err(io::Error::other("no cgroup"))).unwrap_err();
        assert_eq!(err.to_string(), "no cgroup");
    }
}
