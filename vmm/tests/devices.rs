//! Test guests drive the real VMM's devices through independent drivers (virtio-drivers), and
//! the host side checks what arrived: disk contents, vsock streams, TAP frames, the control
//! socket.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::Child,
    time::Duration,
};

use common::{guest, run, spawn, vmm, wait, wait_for};
use hearth_testkit::{require, skip};

fn disk(path: &Path, tag: &[u8]) {
    let mut d = vec![0u8; 64 * 512];
    d[..tag.len()].copy_from_slice(tag);
    std::fs::write(path, d).unwrap();
}

fn blk_with_engine(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("scratch.img");
    let ro = dir.path().join("rootfs.img");
    disk(&rw, b"HEARTHD0");
    disk(&ro, b"HEARTHD1");
    let ro_before = std::fs::read(&ro).unwrap();
    let g = guest("virtio_blk");
    let r = run(&[
        "--kernel",
        g.to_str().unwrap(),
        "--disk",
        &format!("path={},id=scratch,engine={engine}", rw.display()),
        "--disk",
        &format!("path={},ro,id=rootfs,engine={engine}", ro.display()),
    ]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("blk: done failures=0"), "{}", r.stdout);
    for what in [
        "disk0 read sector 0",
        "disk0 id",
        "disk0 write sector 1",
        "disk0 flush",
        "disk0 read back",
        "disk0 read past end fails",
        "disk1 read sector 0",
        "disk1 id",
        "disk1 is read-only",
        "disk1 write fails",
        "two disks",
    ] {
        assert!(
            r.stdout.contains(&format!("blk: ok {what}\n")),
            "{what}: {}",
            r.stdout
        );
    }
    // The guest's write reached the host file; the read-only disk is untouched.
    let d = std::fs::read(&rw).unwrap();
    assert_eq!(&d[512..523], b"GUEST-WROTE");
    assert!(d[523..1024].iter().all(|b| *b == 0x5a));
    assert_eq!(std::fs::read(&ro).unwrap(), ro_before);
}

#[test]
fn virtio_blk_io_uring() {
    require!(skip::kvm());
    blk_with_engine("io_uring");
}

#[test]
fn virtio_blk_sync() {
    require!(skip::kvm());
    blk_with_engine("sync");
}

#[test]
fn virtio_vsock_both_directions() {
    require!(skip::kvm());
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // The guest's connection to host port 1025 arrives here.
    let host_listener = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
    let g = guest("virtio_vsock");
    let child = spawn(
        vmm()
            .args(["--kernel", g.to_str().unwrap(), "--vsock"])
            .arg(format!("cid=7,uds={}", uds.display())),
    );
    let (mut s, _) = host_listener.accept().unwrap();
    let mut buf = [0u8; 15];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping-from-guest");
    s.write_all(b"pong-from-host").unwrap();

    // Host-initiated: retry until the guest listens (a refused CONNECT closes without OK).
    let mut conn = None;
    wait_for("the guest to accept CONNECT 5000", || {
        let Ok(mut c) = UnixStream::connect(&uds) else {
            return false;
        };
        c.write_all(b"CONNECT 5000\n").unwrap();
        let mut line = String::new();
        let mut r = BufReader::new(c.try_clone().unwrap());
        if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
            conn = Some(c);
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
        false
    });
    let mut c = conn.unwrap();
    c.write_all(b"hello-guest").unwrap();
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello-host");

    let r = wait(child);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("vsock: guest cid 7"), "{}", r.stdout);
    assert!(r.stdout.contains("vsock: done failures=0"), "{}", r.stdout);
    assert!(!uds.exists(), "the vsock socket is removed at exit");
}

fn control(path: &Path, cmd: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

#[test]
fn init_hello_frame_and_control_kill() {
    use hearth_proto::init::{GuestMessage, guest_message::Msg};
    require!(skip::kvm());
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let ctl = dir.path().join("ctl.sock");
    let agent = UnixListener::bind(format!("{}_1024", uds.display())).unwrap();
    let g = guest("init_hello");
    let child = spawn(
        vmm()
            .args(["--kernel", g.to_str().unwrap(), "--serial", "ring"])
            .args(["--cmdline", "console=ttyS0 hearth.instance=inst-42"])
            .arg("--vsock")
            .arg(format!("uds={}", uds.display()))
            .arg("--control-socket")
            .arg(&ctl),
    );
    let (mut s, _) = agent.accept().unwrap();
    let mut buf = bytes::BytesMut::new();
    let msg = loop {
        if let Some(m) = hearth_proto::frame::decode::<GuestMessage>(&mut buf).unwrap() {
            break m;
        }
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "guest closed before a whole frame");
        buf.extend_from_slice(&chunk[..n]);
    };
    let Some(Msg::Hello(hello)) = msg.msg else {
        panic!("first frame is not Hello: {msg:?}")
    };
    assert_eq!(hello.protocol_version, 1);
    assert_eq!(hello.init_version, "test-guest");
    assert_eq!(hello.instance_id, "inst-42");
    // The agent talks; the guest reads and never answers.
    s.write_all(&[0, 0, 0, 2, 0x08, 0x01]).unwrap();

    wait_for("the control socket", || ctl.exists());
    let status = control(&ctl, "status");
    assert_eq!(status["ok"], true);
    assert_eq!(status["state"], "running");
    wait_for("the guest to log the frame", || {
        control(&ctl, "serial")["serial"]
            .as_str()
            .is_some_and(|s| s.contains("init_hello: received 6 bytes"))
    });
    let m = control(&ctl, "metrics");
    let vsock = &m["metrics"]["devices"]["vsock"];
    assert_eq!(vsock["guest_connects"], 1, "{m}");
    assert!(vsock["tx_bytes"].as_u64().unwrap() > 10, "{m}");
    assert!(
        m["metrics"]["vcpu_exits"]["mmio_write"].as_u64().unwrap() > 0,
        "{m}"
    );
    assert!(m["metrics"]["boot_time_us"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(control(&ctl, "bogus")["ok"], false);
    assert_eq!(control(&ctl, "kill")["ok"], true);
    let r = wait(child);
    assert_eq!(r.code(), 4, "{r:?}");
    assert!(
        !ctl.exists() && !uds.exists(),
        "sockets are removed at exit"
    );
}

/// Starts the `ctrl_alt_del` guest (it waits for the keyboard's reset request) with a control
/// socket in `dir`, and waits for the socket.
fn waiting_guest(dir: &Path) -> (Child, PathBuf) {
    let ctl = dir.join("ctl.sock");
    let g = guest("ctrl_alt_del");
    let child = spawn(
        vmm()
            .args(["--kernel", g.to_str().unwrap(), "--control-socket"])
            .arg(&ctl),
    );
    wait_for("the control socket", || ctl.exists());
    (child, ctl)
}

#[test]
fn control_shutdown_sends_ctrl_alt_del() {
    require!(skip::kvm());
    let dir = tempfile::tempdir().unwrap();
    let (child, ctl) = waiting_guest(dir.path());
    assert_eq!(control(&ctl, "shutdown")["ok"], true);
    let r = wait(child);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("cad: got ctrl-alt-del"), "{}", r.stdout);
}

#[test]
fn sigterm_ends_the_vm_as_killed() {
    require!(skip::kvm());
    let dir = tempfile::tempdir().unwrap();
    let (child, ctl) = waiting_guest(dir.path());
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let r = wait(child);
    assert_eq!(r.code(), 4, "{r:?}");
    assert!(!ctl.exists());
}
