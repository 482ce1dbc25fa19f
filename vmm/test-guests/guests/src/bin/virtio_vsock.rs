//! Exercises the VMM's virtio-vsock device both ways with virtio-drivers:
//! 1. connects to the host (CID 2) port 1025, sends "ping-from-guest", expects "pong-from-host";
//! 2. listens on port 5000, accepts the host's connection (hybrid `CONNECT 5000`), expects
//!    "hello-guest", answers "hello-host".
//!
//! Prints `vsock: ok <step>` / `vsock: FAIL <step>` and `vsock: done failures=<n>`.

#![no_std]
#![no_main]

use guest_rt::{
    boot::BootParams,
    exit, println,
    report::Checks,
    virtio::vsock,
    virtio_drivers::device::socket::{
        VMADDR_CID_HOST, VsockAddr, VsockConnectionManager, VsockEventType,
    },
};

const MAX_POLLS: u32 = 3_000_000;

/// Entry point: 64-bit mode, boot_params in RSI.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start(_rdi: u64, rsi: u64) -> ! {
    // SAFETY: the VMM passes the zero page in RSI.
    let bp = unsafe { BootParams::new(rsi as *const u8) };
    let mut mgr = match vsock(&bp) {
        Ok(m) => m,
        Err(e) => {
            println!("vsock: FAIL {e}");
            exit::reset()
        }
    };
    println!("vsock: guest cid {}", mgr.guest_cid());
    let mut c = Checks::new("vsock");

    let host = VsockAddr {
        cid: VMADDR_CID_HOST,
        port: 1025,
    };
    let local = 40_000;

    let connected = mgr.connect(host, local).is_ok()
        && wait(&mut mgr, |e| matches!(e, VsockEventType::Connected));
    c.check("connect to host port 1025", connected);
    let sent = connected && mgr.send(host, local, b"ping-from-guest").is_ok();
    c.check("send to host", sent);
    let mut buf = [0u8; 64];
    let got = sent && wait(&mut mgr, |e| matches!(e, VsockEventType::Received { .. }));
    let n = if got {
        mgr.recv(host, local, &mut buf).unwrap_or(0)
    } else {
        0
    };
    c.check("receive from host", &buf[..n] == b"pong-from-host");

    mgr.listen(5000);
    println!("vsock: listening on 5000");
    let mut peer = None;
    for _ in 0..MAX_POLLS {
        if let Ok(Some(ev)) = mgr.poll()
            && matches!(ev.event_type, VsockEventType::ConnectionRequest)
        {
            peer = Some(ev.source);
            break;
        }
    }
    c.check("accept host connection", peer.is_some());
    if let Some(peer) = peer {
        let got = wait(&mut mgr, |e| matches!(e, VsockEventType::Received { .. }));
        let n = if got {
            mgr.recv(peer, 5000, &mut buf).unwrap_or(0)
        } else {
            0
        };
        c.check(
            "receive on accepted connection",
            &buf[..n] == b"hello-guest",
        );
        c.check(
            "send on accepted connection",
            mgr.send(peer, 5000, b"hello-host").is_ok(),
        );
        // Let the device take the packet before the VM resets.
        for _ in 0..1000 {
            let _ = mgr.poll();
        }
    }
    c.done();
    core::mem::forget(mgr);
    exit::reset()
}

fn wait<H: guest_rt::virtio_drivers::Hal, T: guest_rt::virtio_drivers::transport::Transport>(
    mgr: &mut VsockConnectionManager<H, T>,
    want: impl Fn(&VsockEventType) -> bool,
) -> bool {
    for _ in 0..MAX_POLLS {
        match mgr.poll() {
            Ok(Some(ev)) if want(&ev.event_type) => return true,
            Ok(Some(ev)) if matches!(ev.event_type, VsockEventType::Disconnected { .. }) => {
                return false;
            }
            Err(_) => return false,
            _ => {}
        }
    }
    false
}
