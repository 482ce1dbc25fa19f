//! The real hearth-vmm boots test guests through KVM and they check what they were given.

mod common;

use common::{bzimage_from_elf, guest, run};
use hearth_testkit::{require, skip};

fn assert_all_checks_passed(out: &str, checks: &[&str]) {
    for c in checks {
        assert!(
            out.contains(&format!("boot_check: ok {c}\n")),
            "check {c} did not pass:\n{out}"
        );
    }
    assert!(out.contains("boot_check: done failures=0"), "{out}");
}

const CHECKS: &[&str] = &[
    "entry_registers",
    "zero_page",
    "cmdline",
    "e820",
    "cpuid_1",
    "cpuid_b",
    "cpuid_hypervisor",
    "mptable",
    "msrs",
    "paging",
    "gdt",
];

#[test]
fn vmlinux_elf_boot_state_with_two_vcpus() {
    require!(skip::kvm());
    let g = guest("boot_check");
    let r = run(&[
        "--kernel",
        g.to_str().unwrap(),
        "--vcpus",
        "2",
        "--memory-mib",
        "256",
        "--cmdline",
        "hearth.test=boot_check boot_check.vcpus=2 boot_check.mem_mib=256",
    ]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_all_checks_passed(&r.stdout, CHECKS);
    assert!(
        r.stderr.contains("hearth-vmm boot-timer: guest_boot_us="),
        "{}",
        r.stderr
    );
}

#[test]
fn bzimage_boot_with_initrd() {
    require!(skip::kvm());
    let dir = tempfile::tempdir().unwrap();
    let bz = dir.path().join("bzImage");
    bzimage_from_elf(&guest("boot_check"), &bz);
    let initrd = dir.path().join("initrd");
    let mut rd = b"HEARTHRD".to_vec();
    rd.resize(10_000, 7);
    std::fs::write(&initrd, rd).unwrap();
    let r = run(&[
        "--kernel",
        bz.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "hearth.test=boot_check boot_check.vcpus=1 boot_check.mem_mib=128 boot_check.initrd=1",
    ]);
    assert_eq!(r.code(), 0, "{r:?}");
    let mut checks = CHECKS.to_vec();
    checks.push("initrd");
    assert_all_checks_passed(&r.stdout, &checks);
}

#[test]
fn boot_timer_guest_resets_with_and_without_seccomp() {
    require!(skip::kvm());
    let g = guest("boot_timer");
    for seccomp in ["on", "off"] {
        let r = run(&["--kernel", g.to_str().unwrap(), "--seccomp", seccomp]);
        assert_eq!(r.code(), 0, "seccomp {seccomp}: {r:?}");
        assert!(r.stdout.contains("boot_timer guest: up"), "{r:?}");
        let us: u64 = r
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("hearth-vmm boot-timer: guest_boot_us="))
            .unwrap_or_else(|| panic!("no boot-timer line: {}", r.stderr))
            .trim()
            .parse()
            .unwrap();
        assert!(us > 0);
    }
}

#[test]
fn serial_output_to_a_file() {
    require!(skip::kvm());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("serial.log");
    let g = guest("boot_timer");
    let r = run(&[
        "--kernel",
        g.to_str().unwrap(),
        "--serial",
        &format!("file:{}", out.display()),
    ]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "boot_timer guest: up\n"
    );
    assert!(r.stdout.is_empty());
}

#[test]
fn config_file_boot() {
    require!(skip::kvm());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.toml");
    let g = guest("boot_check");
    std::fs::write(
        &cfg,
        format!(
            "kernel = {:?}\ncmdline = \"hearth.test=boot_check boot_check.vcpus=3 boot_check.mem_mib=64\"\nvcpus = 3\nmemory_mib = 64\nseccomp = true\n",
            g.display()
        ),
    )
    .unwrap();
    let r = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_all_checks_passed(&r.stdout, CHECKS);
}
