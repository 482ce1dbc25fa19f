//! virtio-net on a real TAP inside a network namespace the test creates: the guest's frame is
//! seen on the TAP, and a frame sent on the TAP reaches the guest.

mod common;

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Instant,
};

use common::{DEADLINE, guest, wait};

/// Deletes the namespace (and the TAP in it) even when the test fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?} failed");
}

const ETHERTYPE: u16 = 0x88b5;

/// A raw packet socket on `ifname` inside the namespace `ns` (entered on this thread only).
fn packet_socket(ns: &str, ifname: &str) -> OwnedFd {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns on this thread with a namespace fd we own.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    let proto = (ETHERTYPE).to_be();
    // SAFETY: creating a socket; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: fd is fresh and ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: reads a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(index > 0);
    // SAFETY: a zeroed sockaddr_ll is valid; we fill family, protocol and index.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: binds our socket to a sockaddr_ll of the right size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: sets a receive timeout on our socket.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    sock
}

#[test]
fn frames_cross_the_tap_both_ways() {
    hearth_testkit::require!(
        hearth_testkit::skip::root(),
        hearth_testkit::skip::kvm(),
        hearth_testkit::skip::program("ip")
    );
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!(
        "{}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    );
    let ns = Netns(format!("hvmnet{id}"));
    let tap = format!("hvt{id}");
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "tuntap", "add", "dev", &tap, "mode", "tap"]);
    ip(&["-n", &ns.0, "link", "set", &tap, "up"]);

    let (ns_name, tap_name) = (ns.0.clone(), tap.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let host = std::thread::spawn(move || {
        let sock = packet_socket(&ns_name, &tap_name);
        ready_tx.send(()).unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 2048];
        let guest_frame = loop {
            assert!(start.elapsed() < DEADLINE, "no frame from the guest");
            // SAFETY: receives into our buffer.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 30 && &buf[14..30] == b"hearth-net-guest" {
                break buf[..n as usize].to_vec();
            }
        };
        // Answer to the guest's MAC.
        let mut reply = [0u8; 60];
        reply[..6].copy_from_slice(&guest_frame[6..12]);
        reply[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        reply[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        reply[14..29].copy_from_slice(b"hearth-net-host");
        // SAFETY: sends our buffer on the bound socket.
        let n = unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
        assert_eq!(
            n,
            reply.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        guest_frame
    });

    let g = guest("virtio_net");
    // The guest sends once: the host socket must be listening first.
    ready_rx.recv_timeout(DEADLINE).unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_hearth-vmm"),
            "--kernel",
        ])
        .arg(&g)
        .args(["--net", &format!("tap={tap},mac=06:00:ac:10:00:02")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r = wait(child);
    let frame = host.join().unwrap();
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(
        &frame[6..12],
        &[0x06, 0, 0xac, 0x10, 0, 0x02],
        "source MAC is the configured one"
    );
    assert!(
        r.stdout.contains("net: mac 06:00:ac:10:00:02"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("net: got hearth-net-host"),
        "{}",
        r.stdout
    );
}
