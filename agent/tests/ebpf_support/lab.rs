//! A two-namespace lab for eBPF tests with real traffic: `inst` plays the instance, `host` the
//! node (gateway, ingress proxy, resolver) and the rest of the world (extra addresses on its
//! loopback). The filter attaches to the host end of the veth pair, as the agent does.
//! Everything (namespaces, bpffs pins) is removed on drop.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use hearth_agent::ebpf::{Filter, LoadOptions, NodeAddr, PinRoot, Policy};
use hearth_testkit::netns::{NetNs, unique_ifname};

pub const INST_MAC: [u8; 6] = [0x02, 0x48, 0x54, 0, 0, 2];
pub const HOST_MAC: [u8; 6] = [0x02, 0x48, 0x54, 0, 0, 1];
pub const INST4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const INST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// "Remote" addresses on the host's loopback.
pub const ALLOWED4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const DENIED4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);
pub const OTHER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
pub const PUBLIC4: Ipv4Addr = Ipv4Addr::new(11, 22, 33, 44);
pub const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
pub const DENIED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0x66, 0, 0, 0, 1);
pub const HTTP_PORT: u16 = 8080;

/// A private bpffs instance mounted on a fresh directory, unmounted and removed on drop (the
/// pins in it go with it).
pub struct BpfDir(pub PathBuf);

impl BpfDir {
    pub fn new() -> BpfDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hearth-bpffs-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        BpfDir(dir)
    }

    /// A pin root inside the mount (mounting it on first use).
    pub fn root(&self) -> PinRoot {
        PinRoot::mounting(&self.0, self.0.join("hearth")).unwrap()
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path; a lazy unmount of our own mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}

pub struct Lab {
    pub host: NetNs,
    pub inst: NetNs,
    /// The host end of the veth pair (where the filter goes).
    pub host_if: String,
    pub inst_if: String,
    pub root: PinRoot,
    pub bpf_dir: BpfDir,
}

impl Lab {
    pub fn new() -> Lab {
        let host = NetNs::new("ebh").unwrap();
        let inst = NetNs::new("ebi").unwrap();
        for ns in [&host, &inst] {
            // Usable IPv6 addresses at once; no router advertisements to wait for.
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0").unwrap();
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0").unwrap();
            ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
                .unwrap();
        }
        let (host_if, inst_if) = (unique_ifname("veh"), unique_ifname("vei"));
        host.add_veth(&host_if, &inst, &inst_if).unwrap();
        host.set_mac(&host_if, HOST_MAC).unwrap();
        inst.set_mac(&inst_if, INST_MAC).unwrap();
        host.add_addr(&host_if, "10.0.0.1/24").unwrap();
        host.add_addr(&host_if, "fd00::1/64").unwrap();
        inst.add_addr(&inst_if, "10.0.0.2/24").unwrap();
        inst.add_addr(&inst_if, "fd00::2/64").unwrap();
        // The rest of the world lives on the host's loopback (no dummy devices here).
        for a in [
            "198.51.100.10/32",
            "198.51.100.66/32",
            "198.51.100.7/32",
            "203.0.113.5/32",
            "11.22.33.44/32",
            "2001:db8:1::10/128",
            "2001:db8:1:66::1/128",
        ] {
            host.add_addr("lo", a).unwrap();
        }
        host.up(&host_if).unwrap();
        inst.up(&inst_if).unwrap();
        inst.ip(&["route", "add", "default", "via", "10.0.0.1"])
            .unwrap();
        inst.ip(&["-6", "route", "add", "default", "via", "fd00::1"])
            .unwrap();
        let bpf_dir = BpfDir::new();
        let root = bpf_dir.root();
        Lab {
            host,
            inst,
            host_if,
            inst_if,
            root,
            bpf_dir,
        }
    }

    /// The policy most tests use.
    pub fn policy() -> Policy {
        let mut p = Policy::new(INST_MAC);
        p.instance_ipv4 = Some(INST4);
        p.instance_ipv6 = vec![INST6];
        p.gateway = NodeAddr {
            v4: Some(GW4),
            v6: Some(GW6),
        };
        p.dns = p.gateway;
        p.ingress_proxy = p.gateway;
        p.allow_gateway_ping = true;
        p.http_ports = vec![HTTP_PORT];
        p.allow = [
            "198.51.100.0/24 tcp 443",
            "198.51.100.0/24 udp 5000-5010",
            "2001:db8:1::/48 tcp 443",
            "2001:db8:1::/48 udp 5000-5010",
        ]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
        p.deny = ["198.51.100.66", "2001:db8:1:66::/64"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        p
    }

    /// Loads and attaches a filter to the host end, as the agent would.
    pub fn attach(&self, instance: &str, policy: &Policy) -> Filter {
        self.host.run(|| {
            Filter::load_and_attach(
                &self.root,
                instance,
                &self.host_if,
                policy,
                &LoadOptions::default(),
            )
            .expect("attach")
        })
    }

    pub fn host_udp(&self, addr: IpAddr, port: u16) -> UdpSocket {
        self.host.run(|| bound_udp(addr, port))
    }

    pub fn inst_udp(&self, addr: IpAddr) -> UdpSocket {
        self.inst.run(|| bound_udp(addr, 0))
    }

    pub fn host_listen(&self, addr: IpAddr, port: u16) -> TcpListener {
        self.host
            .run(|| TcpListener::bind(SocketAddr::new(addr, port)).unwrap())
    }

    pub fn inst_listen(&self, addr: IpAddr, port: u16) -> TcpListener {
        self.inst
            .run(|| TcpListener::bind(SocketAddr::new(addr, port)).unwrap())
    }

    /// A TCP connection from the instance.
    pub fn inst_connect(&self, to: SocketAddr) -> io::Result<TcpStream> {
        self.inst
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))
    }

    /// A TCP connection from the host, from `from` (port chosen by the kernel).
    pub fn host_connect(&self, from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
        self.host.run(|| connect_from(from, to))
    }

    /// ICMP echo requests from the instance; returns how many were answered.
    pub fn inst_ping(&self, to: IpAddr, count: u16) -> u16 {
        self.inst.run(|| ping(to, count))
    }

    /// ICMP echo requests from the host; returns how many were answered.
    pub fn host_ping(&self, to: IpAddr, count: u16) -> u16 {
        self.host.run(|| ping(to, count))
    }
}

fn bound_udp(addr: IpAddr, port: u16) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddr::new(addr, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s
}

/// Receives up to `n` datagrams: waits up to 1.5 s for the first, then up to 3 s for each
/// next one (generous, for a loaded machine; drops cost the first wait only).
fn receive(sock: &UdpSocket, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while got.len() < n {
        let wait = if got.is_empty() { 1500 } else { 3000 };
        sock.set_read_timeout(Some(Duration::from_millis(wait)))
            .unwrap();
        match sock.recv_from(&mut buf) {
            Ok((len, peer)) => got.push((buf[..len].to_vec(), peer)),
            Err(_) => break,
        }
    }
    got
}

/// Sends `n` datagrams of `size` bytes from `from` to `to`, echoes back whatever `to`
/// received, and returns (received by `to`, echoes received by `from`).
pub fn udp_exchange(from: &UdpSocket, to: &UdpSocket, n: usize, size: usize) -> (usize, usize) {
    let dest = to.local_addr().unwrap();
    let payload = vec![0x5a; size];
    for _ in 0..n {
        from.send_to(&payload, dest).unwrap();
    }
    let received = receive(to, n);
    for (data, peer) in &received {
        to.send_to(data, peer).unwrap();
    }
    let echoed = receive(from, received.len()).len();
    (received.len(), echoed)
}

fn connect_from(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let domain = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (addr, len) = sockaddr(SocketAddr::new(from, 0));
    // SAFETY: `addr` holds a sockaddr of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let stream = TcpStream::from(fd);
    // std has no connect on an existing socket: connect with a timeout through poll.
    stream.set_nonblocking(true)?;
    let (addr, len) = sockaddr(to);
    // SAFETY: `addr` holds a sockaddr of `len` bytes.
    let r = unsafe { libc::connect(stream.as_raw_fd(), (&raw const addr).cast(), len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 3000) };
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// ICMP echo through an unprivileged ping socket (the kernel fills the id); one request at a
/// time, each waited for up to 1.5 s.
fn ping(to: IpAddr, count: u16) -> u16 {
    let (domain, proto, kind) = match to {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
    };
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, proto) };
    assert!(fd >= 0, "ping socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a new socket nothing else owns.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let (addr, len) = sockaddr(SocketAddr::new(to, 0));
    let mut answered = 0;
    for seq in 0..count {
        let mut msg = vec![kind, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(b"hearth");
        // SAFETY: `msg` and `addr` are valid for the given lengths.
        let r = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const addr).cast(),
                len,
            )
        };
        if r < 0 {
            // A local sender sees a tc drop on its own packet as ENOBUFS.
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS), "ping sendto: {e}");
            continue;
        }
        let mut buf = [0u8; 256];
        if sock.recv(&mut buf).is_ok() {
            answered += 1;
        }
    }
    answered
}

/// Exchanges a line over a connected stream both ways (proves data flows in both directions).
pub fn tcp_round_trip(client: &mut TcpStream, server: &TcpListener) -> io::Result<()> {
    use std::io::{Read, Write};
    server.set_nonblocking(false)?;
    let (mut conn, _) = server.accept()?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    client.write_all(b"ping\n")?;
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping\n");
    conn.write_all(b"pong\n")?;
    client.read_exact(&mut buf)?;
    assert_eq!(&buf, b"pong\n");
    Ok(())
}
