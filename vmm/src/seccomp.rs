//! Per-thread seccomp filters (seccompiler): the VMM (main) thread, the vCPU threads and the
//! I/O thread each get an allow-list of the system calls they make; anything else raises
//! SIGSYS, whose handler prints the call and exits with [`EXIT_SECCOMP`].
//!
//! Filters are installed by each thread on itself once its setup is done (files opened, KVM
//! objects created), so the lists only cover the steady state.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::exit::EXIT_SECCOMP;

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: control socket, signals, exit.
    Vmm,
    /// A vCPU thread: KVM_RUN and port/MMIO emulation.
    Vcpu,
    /// The I/O thread: virtio device event loop.
    Io,
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules.
    #[error("Cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The filter could not be installed.
    #[error("Cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Calls every thread makes: memory allocation, locks, signals, time, exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    // Debug builds check descriptors with F_GETFD when they are dropped.
    libc::SYS_fcntl,
];

/// vCPU threads: serial output, irqfd and eventfd writes (and `ioctl`, limited to KVM_RUN).
const VCPU: &[i64] = &[libc::SYS_fsync];

/// `KVM_RUN`.
const KVM_RUN: u64 = 0xae80;
/// `FIONBIO` (what `set_nonblocking` uses).
const FIONBIO: u64 = 0x5421;

/// The I/O thread: epoll, sockets (vsock host side, TAP), disk I/O (io_uring or sync).
const IO: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_readv,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_fcntl,
    libc::SYS_eventfd2,
];

/// The main thread: epoll, the control socket, cleanup of its socket files.
const VMM: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_fcntl,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fsync,
];

/// The system calls `kind` may make.
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let extra = match kind {
        ThreadKind::Vmm => VMM,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Io => IO,
    };
    let mut all: Vec<i64> = COMMON.iter().chain(extra).copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The one `ioctl` request `kind` may make: KVM_RUN on vCPU threads, FIONBIO elsewhere
/// (control connections, host-side vsock streams).
pub fn allowed_ioctl(kind: ThreadKind) -> Option<u64> {
    match kind {
        ThreadKind::Vmm => Some(FIONBIO),
        ThreadKind::Vcpu => Some(KVM_RUN),
        ThreadKind::Io => Some(FIONBIO),
    }
}

/// Compiles the filter for `kind`, with `mismatch` for calls outside the list.
pub fn filter(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).into_iter().map(|nr| (nr, vec![])).collect();
    if let Some(request) = allowed_ioctl(kind) {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
            .map_err(SeccompError::Build)?;
        rules.insert(
            libc::SYS_ioctl,
            vec![SeccompRule::new(vec![cond]).map_err(SeccompError::Build)?],
        );
    }
    let arch = TargetArch::x86_64;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .and_then(TryInto::try_into)
        .map_err(SeccompError::Build)
}

/// Installs the filter for `kind` on the calling thread (violations trap to SIGSYS).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = filter(kind, SeccompAction::Trap)?;
    seccompiler::apply_filter(&prog).map_err(SeccompError::Install)
}

/// Installs the SIGSYS handler that reports a forbidden call and exits (process-wide; call
/// once before any filter is installed).
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we fill the handler and flags before use.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only calls async-signal-safe functions (write, _exit).
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86-64.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall is an int at a fixed
    // offset of the x86-64 layout.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let mut buf = [0u8; 96];
    let prefix = b"hearth-vmm: seccomp refused system call ";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in (0..d).rev() {
        buf[len] = digits[i];
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_differ() {
        for k in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Io] {
            assert!(!filter(k, SeccompAction::Trap).unwrap().is_empty());
        }
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_socket));
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_execve));
        assert!(allowed(ThreadKind::Io).contains(&libc::SYS_io_uring_enter));
        for k in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Io] {
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_open,
                libc::SYS_ptrace,
            ] {
                assert!(!allowed(k).contains(&forbidden), "{k:?} allows {forbidden}");
            }
        }
    }

    /// A thread with the vCPU filter (refusals as EPERM here, SIGSYS in the VMM) can still
    /// write, but cannot open a socket or a file.
    #[test]
    fn forbidden_calls_are_refused() {
        let res = std::thread::spawn(|| {
            let prog = filter(ThreadKind::Vcpu, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
            seccompiler::apply_filter(&prog).unwrap();
            let mut fds = [0i32; 2];
            // SAFETY: plain system calls on values we own.
            let pipe = unsafe { libc::syscall(libc::SYS_pipe2, fds.as_mut_ptr(), 0) };
            // SAFETY: as above.
            let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            let sock_err = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: as above.
            let wrote = unsafe { libc::write(2, b"".as_ptr().cast(), 0) };
            // KVM_RUN passes the filter (and fails on a bad fd); FIONBIO does not.
            // SAFETY: ioctls on an invalid descriptor have no effect.
            let run = unsafe { libc::ioctl(-1, KVM_RUN as _) };
            let run_err = std::io::Error::last_os_error().raw_os_error();
            let mut on = 1i32;
            // SAFETY: as above.
            let nb = unsafe { libc::ioctl(-1, FIONBIO as _, &mut on) };
            let nb_err = std::io::Error::last_os_error().raw_os_error();
            (pipe, sock, sock_err, wrote, (run, run_err), (nb, nb_err))
        })
        .join()
        .unwrap();
        assert_eq!(
            res.4,
            (-1, Some(libc::EBADF)),
            "KVM_RUN must pass the filter"
        );
        assert_eq!(
            res.5,
            (-1, Some(libc::EPERM)),
            "other ioctls must be refused"
        );
        assert_eq!(res.0, -1, "pipe2 must be refused");
        assert_eq!((res.1, res.2), (-1, Some(libc::EPERM)));
        assert_eq!(res.3, 0, "write must still work");
    }
}
