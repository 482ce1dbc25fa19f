//! `cargo xtask install` / `uninstall` into a DESTDIR, through the real xtask binary, with the
//! real binaries (debug builds of the agent and the VMM, the static release hearth-init) and a
//! small stand-in kernel, so no kernel is built: files and modes as docs/install.md lists them,
//! a second run that changes nothing, an edited config kept, the unit accepted by
//! `systemd-analyze verify`, uninstall keeping only state and config, bad input changing nothing.

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The programs install takes from `--bin-dir`, and a stand-in kernel.
struct Inputs {
    _dir: tempfile::TempDir,
    bin_dir: PathBuf,
    kernel: PathBuf,
}

fn inputs() -> &'static Inputs {
    static INPUTS: OnceLock<Inputs> = OnceLock::new();
    INPUTS.get_or_init(|| {
        use hearth_testkit::artifacts::{hearth_init, host_bin};
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir(&bin_dir).unwrap();
        for (name, path) in [
            ("hearth-agent", host_bin("hearth-agent", "hearth-agent")),
            ("hearthctl", host_bin("hearth-agent", "hearthctl")),
            ("hearth-vmm", host_bin("hearth-vmm", "hearth-vmm")),
            ("hearth-init", hearth_init()),
        ] {
            std::os::unix::fs::symlink(path, bin_dir.join(name)).unwrap();
        }
        // The smallest thing install accepts as a kernel: an x86-64 ELF header.
        let mut elf = vec![0u8; 4096];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[6] = 1;
        elf[18] = 62;
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, &elf).unwrap();
        Inputs {
            _dir: dir,
            bin_dir,
            kernel,
        }
    })
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn xtask(args: &[&str], destdir: &Path) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .arg("--destdir")
        .arg(destdir)
        .output()
        .unwrap();
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("$ xtask {}\n{}{}", args.join(" "), run.stdout, run.stderr);
    run
}

fn install(destdir: &Path, runtime: &str) -> Run {
    let i = inputs();
    xtask(
        &[
            "install",
            "--runtime",
            runtime,
            "--kernel",
            i.kernel.to_str().unwrap(),
            "--bin-dir",
            i.bin_dir.to_str().unwrap(),
        ],
        destdir,
    )
}

/// What docs/install.md lists: every file install writes, with its mode.
const FILES: &[(&str, u32)] = &[
    ("usr/local/bin/hearth-agent", 0o755),
    ("usr/local/bin/hearthctl", 0o755),
    ("usr/local/libexec/hearth/hearth-vmm", 0o755),
    ("usr/local/libexec/hearth/hearth-init", 0o755),
    ("var/lib/hearth/guest/vmlinux", 0o644),
    ("var/lib/hearth/guest/initramfs.cpio", 0o644),
    ("etc/hearth/agent.toml", 0o644),
    ("etc/systemd/system/hearth-agent.service", 0o644),
];
/// The directories that are Hearth's own, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("usr/local/libexec/hearth", 0o755),
    ("var/lib/hearth", 0o750),
    ("var/lib/hearth/guest", 0o755),
    ("etc/hearth", 0o755),
];

/// Every regular file below `root`: relative path → (mode, inode, mtime in ns).
fn snapshot(root: &Path) -> BTreeMap<String, (u32, u64, i64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, u64, i64)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.insert(
                    rel,
                    (
                        m.permissions().mode() & 0o7777,
                        m.ino(),
                        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

#[test]
fn install_twice_writes_the_documented_files_then_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("root");
    let first = install(&d, "sandbox");
    assert!(first.ok);
    assert!(first.stdout.contains("14 changed"), "{}", first.stdout);

    // Exactly the documented files, with their modes.
    let files = snapshot(&d);
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = FILES.iter().map(|(p, _)| *p).collect();
    want.sort();
    assert_eq!(names, want);
    for (path, mode) in FILES {
        assert_eq!(files[*path].0, *mode, "{path}");
    }
    for (path, mode) in DIRS {
        let m = std::fs::metadata(d.join(path)).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, *mode, "{path}");
    }

    // The programs and the kernel are the inputs, byte for byte.
    let i = inputs();
    for (installed, input) in [
        ("usr/local/bin/hearth-agent", "hearth-agent"),
        ("usr/local/bin/hearthctl", "hearthctl"),
        ("usr/local/libexec/hearth/hearth-vmm", "hearth-vmm"),
        ("usr/local/libexec/hearth/hearth-init", "hearth-init"),
    ] {
        assert!(
            std::fs::read(d.join(installed)).unwrap()
                == std::fs::read(i.bin_dir.join(input)).unwrap(),
            "{installed}"
        );
    }
    assert_eq!(
        std::fs::read(d.join("var/lib/hearth/guest/vmlinux")).unwrap(),
        std::fs::read(&i.kernel).unwrap()
    );

    // The initramfs holds hearth-init as /init (GNU cpio reads it back).
    let cpio = d.join("var/lib/hearth/guest/initramfs.cpio");
    let list = Command::new("sh")
        .arg("-c")
        .arg(format!("cpio -it < {}", cpio.display()))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for member in ["init", "dev/console", "proc", "sys"] {
        assert!(list.lines().any(|l| l == member), "{member} in {list}");
    }
    let init = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cpio -i --quiet --to-stdout init < {}",
            cpio.display()
        ))
        .output()
        .unwrap();
    assert!(init.stdout == std::fs::read(i.bin_dir.join("hearth-init")).unwrap());

    // The config is the agent's own defaults with the install's values, and the agent takes it.
    let out = Command::new(d.join("usr/local/bin/hearth-agent"))
        .arg("--config")
        .arg(d.join("etc/hearth/agent.toml"))
        .arg("print-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let cfg: toml::Table = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    assert_eq!(cfg["runtime"].as_str(), Some("sandbox"));
    assert_eq!(cfg["api"]["socket_group"].as_str(), Some("hearth"));
    assert_eq!(
        cfg["sandbox"]["init_path"].as_str(),
        Some("/usr/local/libexec/hearth/hearth-init")
    );
    assert_eq!(
        cfg["microvm"]["vmm_path"].as_str(),
        Some("/usr/local/libexec/hearth/hearth-vmm")
    );
    assert_eq!(
        cfg["microvm"]["kernel"].as_str(),
        Some("/var/lib/hearth/guest/vmlinux")
    );
    assert_eq!(
        cfg["microvm"]["initrd"].as_str(),
        Some("/var/lib/hearth/guest/initramfs.cpio")
    );

    // The second run: every file "unchanged", and indeed untouched.
    let second = install(&d, "sandbox");
    assert!(second.ok);
    assert!(
        second.stdout.contains("nothing changed"),
        "{}",
        second.stdout
    );
    for (path, _) in FILES {
        assert!(
            second.stdout.contains(&format!("unchanged /{path} ")),
            "{path}: {}",
            second.stdout
        );
    }
    assert!(!second.stdout.contains("created") && !second.stdout.contains("updated"));
    assert_eq!(snapshot(&d), files, "the second run touched files");
}

#[test]
fn an_edited_config_is_kept_and_the_new_defaults_shown_as_a_diff() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("root");
    assert!(install(&d, "sandbox").ok);
    let config = d.join("etc/hearth/agent.toml");
    let edited = std::fs::read_to_string(&config)
        .unwrap()
        .replace("default_port = 8080", "default_port = 9090");
    std::fs::write(&config, &edited).unwrap();
    let before = snapshot(&d);

    // A reinstall that would write another runtime.
    let run = install(&d, "microvm");
    assert!(run.ok);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(snapshot(&d), before);
    assert!(run.stdout.contains("nothing changed"));
    assert!(
        run.stdout
            .contains("kept      /etc/hearth/agent.toml (yours")
    );
    for line in [
        "--- /etc/hearth/agent.toml (yours)",
        "+++ new defaults",
        "-runtime = \"sandbox\"",
        "+runtime = \"microvm\"",
        "-default_port = 9090",
        "+default_port = 8080",
    ] {
        assert!(
            run.stdout.lines().any(|l| l.trim_start() == line),
            "{line}: {}",
            run.stdout
        );
    }
}

#[test]
fn the_unit_is_accepted_by_systemd_analyze_verify() {
    hearth_testkit::require!(hearth_testkit::skip::program("systemd-analyze"));
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("root");
    assert!(install(&d, "microvm").ok);
    let unit = std::fs::read_to_string(d.join("etc/systemd/system/hearth-agent.service")).unwrap();
    for line in [
        "Delegate=yes",
        "KillMode=process",
        "ExecStart=/usr/local/bin/hearth-agent --config /etc/hearth/agent.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap();
    for cap in [
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_RESOURCE",
        "CAP_KILL",
    ] {
        assert!(caps.split(' ').any(|c| c == cap), "{cap}");
    }

    // verify --root resolves everything inside the root: give it the host's unit library.
    let lib = d.join("usr/lib/systemd");
    std::fs::create_dir_all(&lib).unwrap();
    let cp = Command::new("cp")
        .arg("-r")
        .arg("/usr/lib/systemd/system")
        .arg(&lib)
        .status()
        .unwrap();
    assert!(cp.success());
    let verify = |name: &str| {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", d.display()))
            .arg(format!("/etc/systemd/system/{name}"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = verify("hearth-agent.service");
    assert!(ok && text.is_empty(), "systemd-analyze verify: {text}");

    // The check is not blind: a misspelt key and a missing program are reported.
    let broken = unit
        .replace("Delegate=yes", "Delegat=yes")
        .replace("/usr/local/bin/hearth-agent", "/usr/local/bin/missing");
    std::fs::write(d.join("etc/systemd/system/broken.service"), broken).unwrap();
    let (_, text) = verify("broken.service");
    assert!(
        text.contains("Unknown key") && text.contains("Delegat"),
        "{text}"
    );
    assert!(text.contains("/usr/local/bin/missing"), "{text}");
}

#[test]
fn uninstall_keeps_only_state_and_config_and_purge_removes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("root");
    assert!(install(&d, "sandbox").ok);
    // State the agent would have made.
    std::fs::write(d.join("var/lib/hearth/state.redb"), "state").unwrap();
    std::fs::create_dir_all(d.join("var/lib/hearth/images/blobs")).unwrap();
    std::fs::write(d.join("var/lib/hearth/images/blobs/x"), "blob").unwrap();

    let run = xtask(&["uninstall"], &d);
    assert!(run.ok);
    let left: Vec<String> = snapshot(&d).into_keys().collect();
    assert_eq!(
        left,
        [
            "etc/hearth/agent.toml",
            "var/lib/hearth/images/blobs/x",
            "var/lib/hearth/state.redb"
        ]
    );
    assert!(!d.join("usr/local/libexec/hearth").exists());
    assert!(!d.join("var/lib/hearth/guest").exists());
    assert!(run.stdout.contains("kept      /etc/hearth/agent.toml"));
    assert!(run.stdout.contains("kept      /var/lib/hearth (state"));

    // Again: nothing left to remove.
    let again = xtask(&["uninstall"], &d);
    assert!(again.ok && again.stdout.contains("nothing changed"));

    let purge = xtask(&["uninstall", "--purge"], &d);
    assert!(purge.ok);
    assert!(snapshot(&d).is_empty(), "{:?}", snapshot(&d));
    assert!(!d.join("etc/hearth").exists() && !d.join("var/lib/hearth").exists());

    // Installing again after a purge starts afresh.
    assert!(install(&d, "sandbox").ok);
    assert_eq!(snapshot(&d).len(), FILES.len());
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let i = inputs();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("root");
    let bin = i.bin_dir.to_str().unwrap();
    let kernel = i.kernel.to_str().unwrap();

    let not_a_kernel = tmp.path().join("notes.txt");
    std::fs::write(&not_a_kernel, "not a kernel\n").unwrap();
    let run = xtask(
        &[
            "install",
            "--kernel",
            not_a_kernel.to_str().unwrap(),
            "--bin-dir",
            bin,
        ],
        &d,
    );
    assert!(!run.ok);
    assert!(
        run.stderr.contains("is not a guest kernel"),
        "{}",
        run.stderr
    );

    // A dynamically linked hearth-init cannot be /init nor the sandbox's PID 1.
    let dynamic = tmp.path().join("dyn");
    std::fs::create_dir(&dynamic).unwrap();
    for name in ["hearth-agent", "hearthctl", "hearth-vmm"] {
        std::os::unix::fs::symlink(i.bin_dir.join(name), dynamic.join(name)).unwrap();
    }
    std::os::unix::fs::symlink("/bin/true", dynamic.join("hearth-init")).unwrap();
    let run = xtask(
        &[
            "install",
            "--kernel",
            kernel,
            "--bin-dir",
            dynamic.to_str().unwrap(),
        ],
        &d,
    );
    assert!(!run.ok);
    assert!(run.stderr.contains("dynamically linked"), "{}", run.stderr);

    let run = xtask(
        &[
            "install",
            "--kernel",
            kernel,
            "--bin-dir",
            bin,
            "--prefix",
            "usr",
        ],
        &d,
    );
    assert!(!run.ok);
    assert!(run.stderr.contains("--prefix must be an absolute path"));

    let run = xtask(
        &["install", "--kernel", kernel, "--bin-dir", bin, "--start"],
        &d,
    );
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("--start cannot be combined with --destdir")
    );

    let missing = tmp.path().join("nothing-here");
    let run = xtask(
        &[
            "install",
            "--kernel",
            kernel,
            "--bin-dir",
            missing.to_str().unwrap(),
        ],
        &d,
    );
    assert!(!run.ok);
    assert!(run.stderr.contains("Cannot read"), "{}", run.stderr);

    assert!(!d.exists(), "a refused install wrote something");
}

#[test]
fn start_without_systemd_is_refused_before_anything_is_written() {
    hearth_testkit::require!(hearth_testkit::skip::root());
    if Path::new("/run/systemd/system").exists() {
        // On a systemd host this would really install; the DESTDIR tests cover the rest.
        return;
    }
    let i = inputs();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "install",
            "--start",
            "--prefix",
            "/nonexistent-hearth-prefix",
            "--kernel",
        ])
        .arg(&i.kernel)
        .arg("--bin-dir")
        .arg(&i.bin_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--start needs systemd"), "{err}");
    assert!(!Path::new("/nonexistent-hearth-prefix").exists());
}
