//! virtio-net on a real TAP inside a network namespace the test creates: the guest's frame is
//! seen on the TAP, and a frame sent on the TAP reaches the guest.

mod common;

use std::{os::fd::AsRawFd, time::Instant};

use common::{DEADLINE, guest, spawn, wait};
use hearth_testkit::{
    netns::{NetNs, packet_socket, unique_ifname},
    require, skip,
};

const ETHERTYPE: u16 = 0x88b5;

#[test]
fn frames_cross_the_tap_both_ways() {
    require!(skip::root(), skip::kvm(), skip::program("ip"));
    let ns = NetNs::new("hvmnet").unwrap();
    let tap = unique_ifname("hvt");
    ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])
        .unwrap();
    ns.up(&tap).unwrap();

    // Bound inside the namespace; received on from the host thread below.
    let sock = ns
        .run(|| packet_socket(&tap, ETHERTYPE, std::time::Duration::from_secs(1)))
        .unwrap();
    let host = std::thread::spawn(move || {
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
    let child = spawn(
        ns.command(env!("CARGO_BIN_EXE_hearth-vmm"))
            .arg("--kernel")
            .arg(&g)
            .args(["--net", &format!("tap={tap},mac=06:00:ac:10:00:02")]),
    );
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
