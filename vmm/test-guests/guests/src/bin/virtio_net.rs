//! Sends one Ethernet frame (EtherType 0x88b5, payload "hearth-net-guest") through the VMM's
//! virtio-net device, then waits for a frame of the same EtherType from the host and prints
//! its payload: `net: got <payload>`.

#![no_std]
#![no_main]

use guest_rt::{
    boot::BootParams,
    exit, println,
    virtio::{IdHal, find},
    virtio_drivers::{device::net::VirtIONetRaw, transport::DeviceType},
};

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// Polls before giving up (the host answers within milliseconds).
const MAX_POLLS: u32 = 2_000_000;

/// Entry point: 64-bit mode, boot_params in RSI.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start(_rdi: u64, rsi: u64) -> ! {
    // SAFETY: the VMM passes the zero page in RSI.
    let bp = unsafe { BootParams::new(rsi as *const u8) };
    let Some(t) = find(&bp, DeviceType::Network).next() else {
        println!("net: FAIL no device");
        exit::reset()
    };
    let mut net = match VirtIONetRaw::<IdHal, _, 16>::new(t) {
        Ok(n) => n,
        Err(_) => {
            println!("net: FAIL init");
            exit::reset()
        }
    };
    let mac = net.mac_address();
    println!(
        "net: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    let mut frame = [0u8; 64];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETHERTYPE);
    frame[14..30].copy_from_slice(b"hearth-net-guest");
    if net.send(&frame).is_err() {
        println!("net: FAIL send");
        exit::reset()
    }
    println!("net: sent");
    let mut buf = [0u8; 2048];
    for _ in 0..8 {
        // SAFETY: `buf` is not touched until `receive_complete` for this token.
        let token = match unsafe { net.receive_begin(&mut buf) } {
            Ok(t) => t,
            Err(_) => break,
        };
        let mut polls = 0;
        while net.poll_receive().is_none() {
            polls += 1;
            if polls == MAX_POLLS {
                println!("net: FAIL timeout");
                exit::reset()
            }
        }
        // SAFETY: same buffer and token as `receive_begin`.
        let Ok((hdr, len)) = (unsafe { net.receive_complete(token, &mut buf) }) else {
            break;
        };
        let f = &buf[hdr..hdr + len];
        if f.len() >= 14 && f[12..14] == ETHERTYPE {
            let payload = &f[14..];
            let end = payload
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(payload.len());
            println!(
                "net: got {}",
                core::str::from_utf8(&payload[..end]).unwrap_or("?")
            );
            core::mem::forget(net);
            exit::reset()
        }
        // Something else (IPv6 neighbour discovery from the host): wait for the next frame.
    }
    println!("net: FAIL no reply");
    core::mem::forget(net);
    exit::reset()
}
