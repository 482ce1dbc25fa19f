//! Network namespaces, veth pairs and background processes for tests, all cleaned up on drop
//! (also when the test panics), and raw packet sockets to see frames on an interface. Needs root
//! and `ip` (iproute2).
//!
//! Names are unique per process and call (pid + counter), so tests running at the same time —
//! in this process or in others — never collide; interface names stay within 15 bytes.
//!
//! ```no_run
//! use hearth_testkit::netns::{NetNs, unique_ifname};
//!
//! let host = NetNs::new("host").unwrap();
//! let inst = NetNs::new("inst").unwrap();
//! let (h, i) = (unique_ifname("vh"), unique_ifname("vi"));
//! host.add_veth(&h, &inst, &i).unwrap();
//! host.ip(&["addr", "add", "10.9.0.1/24", "dev", &h]).unwrap();
//! inst.ip(&["addr", "add", "10.9.0.2/24", "dev", &i]).unwrap();
//! host.ip(&["link", "set", &h, "up"]).unwrap();
//! inst.ip(&["link", "set", &i, "up"]).unwrap();
//! // Code that needs to be inside a namespace (sockets, netlink, eBPF attach):
//! let sock = inst.run(|| std::net::UdpSocket::bind("10.9.0.2:0")).unwrap();
//! ```

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A name for a new interface: `prefix` (at most 3 bytes) + pid + counter, in hex, at most 15
/// bytes in all.
pub fn unique_ifname(prefix: &str) -> String {
    assert!(prefix.len() <= 3, "interface prefix {prefix:?} is too long");
    let name = format!(
        "{prefix}{:x}x{:x}",
        std::process::id() & 0xff_ffff,
        next() & 0xfff
    );
    debug_assert!(name.len() <= 15);
    name
}

/// Runs `cmd`, failing with its stderr unless it succeeds.
pub fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A raw packet socket for frames of `ethertype` on interface `ifname`, in the calling thread's
/// network namespace (create it inside [`NetNs::run`] for another namespace's interface: it
/// stays bound there). A `recv` on it gives up after `recv_timeout`.
pub fn packet_socket(ifname: &str, ethertype: u16, recv_timeout: Duration) -> io::Result<OwnedFd> {
    let proto = ethertype.to_be();
    // SAFETY: socket(2) takes no pointers; the new fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_ll; family, protocol and index are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: binds our socket to a sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: recv_timeout.as_secs() as libc::time_t,
        tv_usec: recv_timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: sets an option on our socket from a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `hearth-<tag>-<pid>-<n>` with its loopback up.
    pub fn new(tag: &str) -> io::Result<NetNs> {
        let name = format!("hearth-{tag}-{}-{}", std::process::id(), next());
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind mount (`/run/netns/<name>`), for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> io::Result<Output> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Sets a sysctl inside the namespace (e.g. `net.ipv6.conf.all.disable_ipv6`).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        run_checked(
            self.command("sysctl")
                .args(["-qw", &format!("{key}={value}")]),
        )?;
        Ok(())
    }

    /// Starts `cmd` (usually from [`NetNs::command`]) in the background; it is killed when the
    /// returned guard drops.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<ChildGuard> {
        Ok(ChildGuard(cmd.stdin(Stdio::null()).spawn()?))
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates, netlink and
    /// eBPF attachments it makes, belong to the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path().display()));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns with a valid namespace fd only changes this thread's network
                // namespace; the thread ends when `f` returns.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Creates a veth pair: `name` here, `peer_name` in `peer` (both down, no addresses).
    pub fn add_veth(&self, name: &str, peer: &NetNs, peer_name: &str) -> io::Result<()> {
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ])?;
        Ok(())
    }

    /// Sets the MAC address of interface `dev`.
    pub fn set_mac(&self, dev: &str, mac: [u8; 6]) -> io::Result<()> {
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        self.ip(&["link", "set", dev, "address", &mac])?;
        Ok(())
    }

    /// Brings interface `dev` up.
    pub fn up(&self, dev: &str) -> io::Result<()> {
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// Adds `addr` (CIDR notation) to interface `dev`; IPv6 addresses skip duplicate address
    /// detection so they are usable at once.
    pub fn add_addr(&self, dev: &str, addr: &str) -> io::Result<()> {
        if addr.contains(':') {
            self.ip(&["addr", "add", addr, "dev", dev, "nodad"])?;
        } else {
            self.ip(&["addr", "add", addr, "dev", dev])?;
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Interfaces inside go with it; a veth's other end goes with its peer.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A background process, killed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
