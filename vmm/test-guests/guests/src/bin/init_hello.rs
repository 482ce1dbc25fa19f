//! Stands in for hearth-init in the agent's microvm-runtime test: reads
//! `hearth.instance=<id>` from the command line, connects to the host (CID 2) port 1024
//! through virtio-vsock and sends one frame exactly as hearth-init would — a 4-byte big-endian
//! length, then a protobuf `hearth.init.v1.GuestMessage { hello: Hello { protocol_version: 1,
//! init_version: "test-guest", instance_id: <id> } }` — then reads whatever the agent sends and
//! never answers (so a Stop runs out its grace and the agent kills the VMM).

#![no_std]
#![no_main]

use guest_rt::{
    boot::BootParams,
    exit, println,
    virtio::vsock,
    virtio_drivers::device::socket::{VMADDR_CID_HOST, VsockAddr, VsockEventType},
};

/// Appends a protobuf varint.
fn varint(out: &mut [u8], at: &mut usize, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        out[*at] = if v == 0 { b } else { b | 0x80 };
        *at += 1;
        if v == 0 {
            return;
        }
    }
}

/// Encodes the Hello frame into `out`; returns its length.
fn hello_frame(instance: &str, out: &mut [u8; 512]) -> usize {
    // Hello: field 1 (protocol_version, varint) = 1; field 2 (init_version, bytes);
    // field 3 (instance_id, bytes).
    let mut hello = [0u8; 400];
    let mut h = 0;
    hello[h] = 0x08;
    h += 1;
    varint(&mut hello, &mut h, 1);
    for (tag, s) in [(0x12u8, "test-guest"), (0x1a, instance)] {
        hello[h] = tag;
        h += 1;
        varint(&mut hello, &mut h, s.len() as u64);
        hello[h..h + s.len()].copy_from_slice(s.as_bytes());
        h += s.len();
    }
    // GuestMessage: field 1 (hello, embedded message).
    let mut msg = [0u8; 420];
    let mut m = 0;
    msg[m] = 0x0a;
    m += 1;
    varint(&mut msg, &mut m, h as u64);
    msg[m..m + h].copy_from_slice(&hello[..h]);
    m += h;
    out[..4].copy_from_slice(&(m as u32).to_be_bytes());
    out[4..4 + m].copy_from_slice(&msg[..m]);
    4 + m
}

/// Entry point: 64-bit mode, boot_params in RSI.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start(_rdi: u64, rsi: u64) -> ! {
    // SAFETY: the VMM passes the zero page in RSI.
    let bp = unsafe { BootParams::new(rsi as *const u8) };
    exit::boot_timer();
    let instance = bp.param("hearth.instance").unwrap_or("");
    let instance = &instance[..instance.len().min(256)];
    let mut mgr = match vsock(&bp) {
        Ok(m) => m,
        Err(e) => {
            println!("init_hello: {e}");
            exit::reset()
        }
    };
    let host = VsockAddr {
        cid: VMADDR_CID_HOST,
        port: 1024,
    };
    let local = 49_152;
    if mgr.connect(host, local).is_err() {
        println!("init_hello: connect failed");
        exit::reset()
    }
    let mut frame = [0u8; 512];
    let len = hello_frame(instance, &mut frame);
    let mut sent = false;
    let mut buf = [0u8; 512];
    loop {
        match mgr.poll() {
            Ok(Some(ev)) => match ev.event_type {
                VsockEventType::Connected if !sent => {
                    sent = mgr.send(host, local, &frame[..len]).is_ok();
                    println!("init_hello: sent hello for instance {instance:?}: {sent}");
                }
                VsockEventType::Received { .. } => {
                    let n = mgr.recv(host, local, &mut buf).unwrap_or(0);
                    let _ = mgr.update_credit(host, local);
                    println!("init_hello: received {n} bytes (not answering)");
                }
                VsockEventType::Disconnected { .. } => {
                    println!("init_hello: host closed the connection");
                }
                _ => {}
            },
            Ok(None) => core::hint::spin_loop(),
            Err(_) => {}
        }
    }
}
