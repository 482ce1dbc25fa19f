//! Bad input: one line on stderr naming the problem, a non-zero exit, and nothing left behind
//! (no control socket, no vsock socket, no serial file).

mod common;

use std::path::{Path, PathBuf};

use common::{guest, listing, run};
use hearth_testkit::{require, skip};

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs with the given args plus a control socket, a vsock and a serial file inside the
    /// case's directory, and checks the failure.
    fn fails(&self, args: &[&str], expect: &str) {
        let before = listing(self.dir.path());
        let ctl = self.path("ctl.sock");
        let vsock = self.path("vsock.sock");
        let serial = self.path("serial.log");
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !args.contains(&"--control-socket") {
            all.extend(["--control-socket".into(), ctl.display().to_string()]);
        }
        if !args.contains(&"--vsock") {
            all.extend(["--vsock".into(), format!("uds={}", vsock.display())]);
        }
        all.extend(["--serial".into(), format!("file:{}", serial.display())]);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let r = run(&refs);
        assert_eq!(r.code(), 1, "{r:?}");
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one line on stderr: {:?}",
            r.stderr
        );
        assert!(lines[0].starts_with("hearth-vmm: "), "{}", lines[0]);
        assert!(
            lines[0].contains(expect),
            "{:?} does not mention {expect:?}",
            lines[0]
        );
        assert_eq!(
            listing(self.dir.path()),
            before,
            "files left behind after: {}",
            lines[0]
        );
    }
}

fn kernel() -> String {
    guest("boot_timer").display().to_string()
}

#[test]
fn missing_kernel() {
    let c = Case::new();
    let k = c.path("no-such-vmlinux");
    c.fails(&["--kernel", k.to_str().unwrap()], "Cannot open kernel");
}

#[test]
fn corrupt_kernels() {
    require!(skip::kvm());
    let c = Case::new();
    let junk = c.path("junk");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    c.fails(
        &["--kernel", junk.to_str().unwrap()],
        "neither an ELF vmlinux nor a bzImage",
    );
    // A truncated ELF.
    let elf = std::fs::read(guest("boot_check")).unwrap();
    let cut = c.path("truncated");
    std::fs::write(&cut, &elf[..200]).unwrap();
    c.fails(&["--kernel", cut.to_str().unwrap()], "Cannot load kernel");
    let empty = c.path("empty");
    std::fs::write(&empty, b"").unwrap();
    c.fails(&["--kernel", empty.to_str().unwrap()], "Cannot load kernel");
}

#[test]
fn memory_larger_than_the_host() {
    require!(skip::kvm());
    let c = Case::new();
    c.fails(
        &["--kernel", &kernel(), "--memory-mib", "100000000"],
        "exceeds the host",
    );
}

#[test]
fn unknown_config_key() {
    let c = Case::new();
    let cfg = c.path("vm.toml");
    std::fs::write(&cfg, format!("kernel = {:?}\nmemory_mb = 64\n", kernel())).unwrap();
    c.fails(&["--config", cfg.to_str().unwrap()], "memory_mb");
}

#[test]
fn absent_tap() {
    require!(skip::kvm());
    let c = Case::new();
    c.fails(
        &["--kernel", &kernel(), "--net", "tap=hvmnotap0"],
        "TAP device hvmnotap0 does not exist",
    );
}

#[test]
fn missing_disk() {
    let c = Case::new();
    let d = c.path("no-disk.img");
    c.fails(
        &[
            "--kernel",
            &kernel(),
            "--disk",
            &format!("path={}", d.display()),
        ],
        "Cannot open disk image",
    );
}

#[test]
fn socket_paths_in_use() {
    require!(skip::kvm());
    let c = Case::new();
    let busy = c.path("busy.sock");
    let _holder = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    c.fails(
        &[
            "--kernel",
            &kernel(),
            "--control-socket",
            busy.to_str().unwrap(),
        ],
        "is in use by another process",
    );
    c.fails(
        &[
            "--kernel",
            &kernel(),
            "--vsock",
            &format!("uds={}", busy.display()),
        ],
        "is in use by another process",
    );
    assert!(
        Path::new(&busy).exists(),
        "the other process's socket must stay"
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let r = run(&["--vcpus", "many"]);
    assert_eq!(r.code(), 2, "{r:?}");
    let r = run(&["--kernel", "/x", "--vcpus", "0"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("vCPU count 0"), "{}", r.stderr);
    let r = run(&["--help"]);
    assert_eq!(r.code(), 0);
    assert!(r.stdout.contains("Exit codes:"), "{}", r.stdout);
}
