//! `hearth-agent doctor` on this host, through the real binary: it names the kind of
//! virtualization KVM offers (PVM on the build machines), runs the TCX probe for real, and
//! passes for a sandbox config whose files exist.

use std::{path::Path, process::Command};

fn doctor(config: &Path, json: bool) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth-agent"));
    cmd.arg("--config").arg(config).arg("doctor");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout)
}

fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
}

fn has_virt_flag() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn doctor_names_this_hosts_virtualization() {
    hearth_testkit::require!(hearth_testkit::skip::root());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    // The microvm runtime, with files that do not exist.
    std::fs::write(
        &config,
        format!(
            "runtime = \"microvm\"\n[microvm]\nvmm_path = \"{0}/none\"\nkernel = \"{0}/none\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (passed, text) = doctor(&config, false);
    assert!(!passed, "missing files must fail the doctor");
    let virt = line(&text, "virtualization");
    if Path::new("/sys/module/kvm_pvm").exists() {
        // This build machine (docs ENVIRONMENT): PVM, and the microvm runtime cannot work.
        assert!(virt.starts_with("FAIL  virtualization  PVM:"), "{virt}");
        assert!(virt.contains("kvm_pvm"), "{virt}");
        let fix = text
            .lines()
            .skip_while(|l| !l.starts_with("FAIL  virtualization"))
            .nth(1)
            .unwrap();
        assert!(fix.trim_start().starts_with("fix:"), "{fix}");
        assert!(fix.contains("runtime = \"sandbox\""), "{fix}");
    } else if has_virt_flag() && Path::new("/dev/kvm").exists() {
        assert!(
            virt.starts_with("ok    virtualization  hardware-assisted"),
            "{virt}"
        );
    } else {
        assert!(virt.starts_with("FAIL  virtualization"), "{virt}");
    }
    assert!(line(&text, "files").starts_with("FAIL"));
    assert!(text.contains("microvm.vmm_path"));
    // As root the TCX probe really ran.
    assert!(!line(&text, "tcx").starts_with("skip"), "{text}");
}

#[test]
fn doctor_passes_a_sandbox_config_on_this_host() {
    hearth_testkit::require!(hearth_testkit::skip::root());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "runtime = \"sandbox\"\nstate_dir = \"{}\"\n[api]\nsocket_group = \"root\"\n[sandbox]\ninit_path = \"{}\"\n",
            dir.path().join("state").display(),
            hearth_testkit::artifacts::hearth_init().display()
        ),
    )
    .unwrap();
    let (passed, text) = doctor(&config, false);
    // What the build machines have (docs ENVIRONMENT): everything the sandbox runtime needs.
    for name in [
        "privileges",
        "kernel",
        "btf",
        "tcx",
        "cgroups",
        "loop",
        "bpffs",
        "nftables",
        "files",
        "socket",
    ] {
        assert!(line(&text, name).starts_with("ok "), "{name}: {text}");
    }
    assert!(line(&text, "kvm").starts_with("skip"));
    assert!(!line(&text, "disk").starts_with("FAIL") || !passed);
    assert_eq!(passed, !text.contains("\nFAIL "), "{text}");

    // The JSON form carries the same checks and the facts behind them.
    let (_, json) = doctor(&config, true);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["runtime"], "sandbox");
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(
        checks.len(),
        text.lines().filter(|l| !l.starts_with(' ')).count() - 2
    );
    let tcx = checks.iter().find(|c| c["name"] == "tcx").unwrap();
    assert_eq!(tcx["status"], "ok");
    assert_eq!(v["facts"]["tcx"]["Ok"], serde_json::Value::Null);
    assert_eq!(
        v["facts"]["kvm_modules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "kvm_pvm"),
        Path::new("/sys/module/kvm_pvm").exists()
    );
}

#[test]
fn doctor_refuses_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "runtime = \"qemu\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth-agent"))
        .arg("--config")
        .arg(&config)
        .arg("doctor")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("hearth-agent: Cannot check the host: Invalid config"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
