//! The judgement: [`evaluate`] turns the config and the host's [`Facts`] into [`Check`]s, each
//! with what to do when it is not ok. Pure, so every kind of host is a unit test.

use super::{
    Check, SOCKET_GROUP, Status,
    facts::{Facts, FileFacts},
};
use crate::config::{Config, RuntimeKind};

/// The kernel TCX needs (the attach mode the eBPF programs use).
pub const MIN_KERNEL: (u32, u32) = (6, 6);
/// Below this much free space for the image cache the doctor fails.
pub const DISK_FAIL_BYTES: u64 = 2 << 30;
/// Below this much it warns.
pub const DISK_WARN_BYTES: u64 = 20 << 30;
/// The first systemd with `DelegateSubgroup=`.
pub const SYSTEMD_DELEGATE_SUBGROUP: u32 = 254;

/// What kind of virtualization KVM offers here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Virtualization {
    /// VT-x or AMD-V behind `/dev/kvm` (the flag).
    Hardware(String),
    /// The `kvm_pvm` module: only PVM guest kernels run natively; others are emulated.
    Pvm,
    /// `/dev/kvm` exists but the CPU shows no `vmx`/`svm`: KVM cannot use hardware help.
    Emulated,
    /// No `/dev/kvm`; the CPU flag, if it has one.
    NoKvm(Option<String>),
}

/// Classifies the host's KVM.
pub fn virtualization(f: &Facts) -> Virtualization {
    let flag = f.cpu_virt_flags.first().cloned();
    if f.kvm_modules.iter().any(|m| m == "kvm_pvm") {
        Virtualization::Pvm
    } else if !f.kvm.present {
        Virtualization::NoKvm(flag)
    } else if let Some(flag) = flag {
        Virtualization::Hardware(flag)
    } else {
        Virtualization::Emulated
    }
}

/// `major.minor` of a kernel release string (`6.1.0-18-amd64` → (6, 1)).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn check(name: &'static str, status: Status, message: impl Into<String>) -> Check {
    Check {
        name,
        status,
        message: message.into(),
        fix: None,
    }
}

impl Check {
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

const USE_SANDBOX: &str = "or set runtime = \"sandbox\" in the config (hearth-init in Linux \
                           namespaces: weaker isolation, no KVM needed)";

/// Every check, in the order they are printed.
pub fn evaluate(cfg: &Config, f: &Facts) -> Vec<Check> {
    let microvm = cfg.runtime == RuntimeKind::Microvm;
    let mut out = Vec::new();

    out.push(if f.root {
        check("privileges", Status::Ok, "running as root")
    } else {
        check(
            "privileges",
            Status::Warn,
            "not root: the TCX probe is skipped and devices may not open (the agent runs as root)",
        )
        .fix("run `sudo hearth-agent doctor`")
    });

    out.push(kvm_device(f, microvm));
    out.push(virtualization_check(cfg, f, microvm));
    out.push(kernel(f));

    let net = cfg.networking;
    let no_net = |name| check(name, Status::Skip, "networking = false: not used");
    out.push(if !net {
        no_net("btf")
    } else if f.btf {
        check("btf", Status::Ok, "/sys/kernel/btf/vmlinux present")
    } else {
        check(
            "btf",
            Status::Fail,
            "no /sys/kernel/btf/vmlinux: the kernel has no BTF, which the eBPF programs need",
        )
        .fix("boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's kernels are)")
    });
    out.push(if !net { no_net("tcx") } else { tcx(f) });
    out.push(cgroups(f));
    out.push(service_manager(f));
    out.push(if !(net && microvm) {
        check(
            "tun",
            Status::Skip,
            "/dev/net/tun: only the microvm runtime with networking uses TAP devices",
        )
    } else {
        device_check(
            "tun",
            "/dev/net/tun",
            f.tun.present,
            f.tun.open_error.as_deref(),
            f.root,
            "modprobe tun (and add `tun` to /etc/modules)",
        )
    });
    out.push(if microvm {
        check(
            "loop",
            Status::Skip,
            "/dev/loop-control: only the sandbox runtime mounts images on loop devices",
        )
    } else {
        device_check(
            "loop",
            "/dev/loop-control",
            f.loop_control.present,
            f.loop_control.open_error.as_deref(),
            f.root,
            "modprobe loop",
        )
    });
    out.push(if !net { no_net("bpffs") } else { bpffs(f) });
    out.push(if !net {
        no_net("nftables")
    } else if f.nft {
        check("nftables", Status::Ok, "nft found (egress NAT)")
    } else {
        check(
            "nftables",
            Status::Fail,
            "nft not found on PATH: the agent sets up egress NAT with it",
        )
        .fix("apt-get install nftables")
    });
    out.push(disk(cfg, f));
    out.extend(files(cfg, f));
    if microvm {
        out.push(match f.io_uring_disabled {
            Some(0) | None => check("io_uring", Status::Ok, "enabled (hearth-vmm disk I/O)"),
            Some(n) => check(
                "io_uring",
                Status::Warn,
                format!(
                    "kernel.io_uring_disabled = {n}: hearth-vmm falls back to synchronous disk I/O"
                ),
            )
            .fix("sysctl -w kernel.io_uring_disabled=0 (and set it in /etc/sysctl.d/)"),
        });
    }
    out.push(socket_group(cfg, f));
    out
}

fn kvm_device(f: &Facts, microvm: bool) -> Check {
    let ok = f.kvm.present && f.kvm.open_error.is_none();
    if !microvm {
        let what = if ok {
            "present"
        } else if f.kvm.present {
            "present but does not open"
        } else {
            "absent"
        };
        return check(
            "kvm",
            Status::Skip,
            format!("/dev/kvm {what}: the sandbox runtime does not use KVM"),
        );
    }
    match (&f.kvm.present, &f.kvm.open_error, f.kvm_api_version) {
        (true, None, Some(12)) => check("kvm", Status::Ok, "/dev/kvm present, KVM API 12"),
        (true, None, v) => check(
            "kvm",
            Status::Fail,
            format!("/dev/kvm answers KVM API version {v:?}, not 12"),
        )
        .fix("this is not a KVM device the VMM can use; check the kvm modules"),
        (true, Some(e), _) => check(
            "kvm",
            if f.root { Status::Fail } else { Status::Warn },
            format!("/dev/kvm does not open: {e}"),
        )
        .fix("run as root, or check the device's permissions"),
        (false, _, _) => {
            let fix = if f.cpu_virt_flags.is_empty() {
                format!(
                    "this CPU shows no vmx/svm: enable VT-x/AMD-V in the firmware (or nested \
                     virtualization on the machine hosting this VM), {USE_SANDBOX}"
                )
            } else {
                format!(
                    "modprobe {} (and add it to /etc/modules)",
                    if f.cpu_virt_flags.iter().any(|x| x == "svm") {
                        "kvm_amd"
                    } else {
                        "kvm_intel"
                    }
                )
            };
            check("kvm", Status::Fail, "no /dev/kvm").fix(fix)
        }
    }
}

fn virtualization_check(cfg: &Config, f: &Facts, microvm: bool) -> Check {
    let allowed = cfg.microvm.allow_without_hardware_virtualization;
    let (ok, message) = match virtualization(f) {
        Virtualization::Hardware(flag) => {
            let module = f
                .kvm_modules
                .iter()
                .find(|m| m.as_str() == "kvm_intel" || m.as_str() == "kvm_amd")
                .map(|m| format!(", module {m}"))
                .unwrap_or_default();
            (true, format!("hardware-assisted ({flag}{module})"))
        }
        Virtualization::Pvm => (
            false,
            "PVM: KVM here is the kvm_pvm module, which runs only PVM guest kernels natively and \
             emulates every other guest instruction by instruction; a Linux microVM cannot boot"
                .to_owned(),
        ),
        Virtualization::Emulated => (
            false,
            "emulated: /dev/kvm exists but the CPU shows no vmx/svm flag, so guests would run \
             without hardware assistance"
                .to_owned(),
        ),
        Virtualization::NoKvm(Some(flag)) => (
            false,
            format!("the CPU has {flag} but no KVM module is loaded"),
        ),
        Virtualization::NoKvm(None) => (
            false,
            "none: no /dev/kvm and no vmx/svm CPU flag".to_owned(),
        ),
    };
    if ok {
        return check("virtualization", Status::Ok, message);
    }
    if !microvm {
        return check(
            "virtualization",
            Status::Ok,
            format!("{message} (the sandbox runtime does not need it)"),
        );
    }
    if allowed {
        return check(
            "virtualization",
            Status::Warn,
            format!(
                "{message}; allowed by microvm.allow_without_hardware_virtualization (only \
                 no_std test guests run usefully)"
            ),
        );
    }
    check("virtualization", Status::Fail, message).fix(format!(
        "run the microvm runtime on a host with VT-x/AMD-V, {USE_SANDBOX}"
    ))
}

fn kernel(f: &Facts) -> Check {
    let (maj, min) = MIN_KERNEL;
    match kernel_version(&f.kernel_release) {
        Some(v) if v >= MIN_KERNEL => check(
            "kernel",
            Status::Ok,
            format!("Linux {} (TCX needs {maj}.{min})", f.kernel_release),
        ),
        Some(_) => check(
            "kernel",
            Status::Fail,
            format!(
                "Linux {} is older than {maj}.{min}: it has no TCX, the attach mode of the \
                 eBPF programs",
                f.kernel_release
            ),
        )
        .fix("boot a newer kernel (Debian 12: linux-image-amd64 from bookworm-backports)"),
        None => check(
            "kernel",
            Status::Warn,
            format!("cannot read a version from {:?}", f.kernel_release),
        ),
    }
}

fn tcx(f: &Facts) -> Check {
    match &f.tcx {
        None => check("tcx", Status::Skip, "not probed: needs root"),
        Some(Ok(())) => check(
            "tcx",
            Status::Ok,
            "the agent's eBPF program loaded and attached with TCX (to lo of a throwaway \
             network namespace)",
        ),
        Some(Err(e)) => {
            let old = kernel_version(&f.kernel_release).is_some_and(|v| v < MIN_KERNEL);
            check("tcx", Status::Fail, e.clone()).fix(if old {
                "boot Linux 6.6 or newer (TCX appeared in 6.6)"
            } else {
                "the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and a kernel with \
                 CONFIG_BPF_SYSCALL, CONFIG_NET_XGRESS; see the error"
            })
        }
    }
}

fn cgroups(f: &Facts) -> Check {
    const NEEDED: [&str; 3] = ["memory", "cpu", "pids"];
    let c = &f.cgroups;
    let (have, kind): (&[String], &str) = if c.pure_v2 {
        (&c.v2_controllers, "cgroup v2")
    } else {
        (&c.v1_controllers, "cgroup v1 hierarchies (hybrid host)")
    };
    let missing: Vec<&str> = NEEDED
        .into_iter()
        .filter(|n| !have.iter().any(|h| h == n))
        .collect();
    if missing.is_empty() {
        return check(
            "cgroups",
            Status::Ok,
            format!("{kind} with {}", NEEDED.join(", ")),
        );
    }
    let fix = if c.pure_v2 {
        "enable the controllers in the root's cgroup.subtree_control (systemd does for units \
         with Delegate=yes) and check the kernel command line for cgroup_disable="
    } else {
        "mount the missing v1 hierarchies under /sys/fs/cgroup, or boot with cgroup v2 \
         (systemd.unified_cgroup_hierarchy=1)"
    };
    check(
        "cgroups",
        Status::Fail,
        format!("{kind}: missing {}", missing.join(", ")),
    )
    .fix(fix)
}

fn service_manager(f: &Facts) -> Check {
    match f.systemd {
        None => check(
            "systemd",
            Status::Skip,
            "systemd is not the running service manager: hearth-agent.service is not used",
        ),
        Some(None) => check("systemd", Status::Warn, "running, version unknown"),
        Some(Some(v)) if v < SYSTEMD_DELEGATE_SUBGROUP && f.cgroups.pure_v2 => check(
            "systemd",
            Status::Warn,
            format!(
                "systemd {v} on cgroup v2 has no DelegateSubgroup=: once instances run, the \
                 unit's cgroup has controllers enabled for them and a restart of \
                 hearth-agent.service cannot place the new agent there (status=219/CGROUP)"
            ),
        )
        .fix(
            "upgrade systemd to 254 or newer (Debian 12: bookworm-backports) and re-run cargo \
             xtask install; until then stop the instances before restarting the agent",
        ),
        Some(Some(v)) => check("systemd", Status::Ok, format!("systemd {v}")),
    }
}

fn device_check(
    name: &'static str,
    path: &str,
    present: bool,
    open_error: Option<&str>,
    root: bool,
    fix: &str,
) -> Check {
    match (present, open_error) {
        (true, None) => check(name, Status::Ok, format!("{path} present")),
        (true, Some(e)) => check(
            name,
            if root { Status::Fail } else { Status::Warn },
            format!("{path} does not open: {e}"),
        )
        .fix("run as root, or check the device's permissions"),
        (false, _) => check(name, Status::Fail, format!("no {path}")).fix(fix),
    }
}

fn bpffs(f: &Facts) -> Check {
    let path = f.bpffs_path.display();
    match f.bpffs {
        Some(true) => check("bpffs", Status::Ok, format!("{path} is on bpffs")),
        _ => check(
            "bpffs",
            Status::Fail,
            format!("{path} is not on a bpffs mount: the agent pins its eBPF links there"),
        )
        .fix(
            "mount -t bpf bpf /sys/fs/bpf (systemd does at boot; add it to /etc/fstab \
             otherwise). A bpffs the agent mounted itself would live in its service's mount \
             namespace and be lost on restart",
        ),
    }
}

fn disk(cfg: &Config, f: &Facts) -> Check {
    let Some(d) = &f.disk else {
        return check(
            "disk",
            Status::Warn,
            format!(
                "cannot measure free space at {}",
                cfg.images_dir().display()
            ),
        );
    };
    let at = d.path.display();
    let free = gib(d.free_bytes);
    let fix = format!(
        "free space on the filesystem of {at}, or move the cache (images.dir) to a larger one"
    );
    if d.free_bytes < DISK_FAIL_BYTES {
        return check(
            "disk",
            Status::Fail,
            format!(
                "{free} free at {at}: the image cache needs at least {}",
                gib(DISK_FAIL_BYTES)
            ),
        )
        .fix(fix);
    }
    let budget = cfg.images.budget_bytes;
    if budget > d.free_bytes {
        return check(
            "disk",
            Status::Warn,
            format!(
                "{free} free at {at}, less than images.budget_bytes ({})",
                gib(budget)
            ),
        )
        .fix(fix);
    }
    if d.free_bytes < DISK_WARN_BYTES {
        return check(
            "disk",
            Status::Warn,
            format!(
                "{free} free at {at} for the image cache (below {})",
                gib(DISK_WARN_BYTES)
            ),
        )
        .fix(fix);
    }
    check(
        "disk",
        Status::Ok,
        format!("{free} free of {} at {at}", gib(d.total_bytes)),
    )
}

fn files(cfg: &Config, f: &Facts) -> Vec<Check> {
    let wanted: &[&str] = match cfg.runtime {
        RuntimeKind::Sandbox => &["sandbox.init_path"],
        RuntimeKind::Microvm => &["microvm.vmm_path", "microvm.kernel", "microvm.initrd"],
    };
    f.files
        .iter()
        .filter(|file| wanted.contains(&file.key))
        .map(file_check)
        .collect()
}

fn file_check(file: &FileFacts) -> Check {
    let path = file.path.display();
    let fix = format!(
        "cargo xtask install puts it there; or point {} at it in the config",
        file.key
    );
    if !file.exists {
        check(
            "files",
            Status::Fail,
            format!("{} = {path}: missing", file.key),
        )
        .fix(fix)
    } else if file.program && !file.executable {
        check(
            "files",
            Status::Fail,
            format!("{} = {path}: not executable", file.key),
        )
        .fix(format!("chmod 755 {path}"))
    } else {
        check("files", Status::Ok, format!("{} = {path}", file.key))
    }
}

fn socket_group(cfg: &Config, f: &Facts) -> Check {
    let group = &cfg.api.socket_group;
    let socket = cfg.api.socket.display();
    if group.is_empty() {
        return check(
            "socket",
            Status::Warn,
            format!("api.socket_group is empty: only root can use the control socket {socket}"),
        )
        .fix(format!(
            "set api.socket_group = \"{SOCKET_GROUP}\" and create the group (cargo xtask install \
             does both), then add operators to it"
        ));
    }
    match f.socket_gid {
        Some(gid) => check(
            "socket",
            Status::Ok,
            format!("{socket} will belong to group {group} (gid {gid})"),
        ),
        None => check(
            "socket",
            Status::Fail,
            format!("api.socket_group = {group:?}: no such group, the agent will not start"),
        )
        .fix(format!("groupadd --system {group}")),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::doctor::facts::{CgroupFacts, DeviceFacts, DiskFacts};

    /// A healthy hardware-KVM host with everything installed.
    fn good() -> Facts {
        let file = |key, path: &str, program| FileFacts {
            key,
            path: PathBuf::from(path),
            exists: true,
            executable: program,
            program,
        };
        Facts {
            root: true,
            kernel_release: "6.12.9-amd64".into(),
            cpu_virt_flags: vec!["vmx".into()],
            kvm_modules: vec!["kvm".into(), "kvm_intel".into()],
            kvm: DeviceFacts {
                present: true,
                open_error: None,
            },
            kvm_api_version: Some(12),
            btf: true,
            tcx: Some(Ok(())),
            cgroups: CgroupFacts {
                pure_v2: true,
                v2_controllers: ["cpuset", "cpu", "io", "memory", "pids"]
                    .map(String::from)
                    .to_vec(),
                v1_controllers: vec![],
            },
            tun: DeviceFacts {
                present: true,
                open_error: None,
            },
            loop_control: DeviceFacts {
                present: true,
                open_error: None,
            },
            bpffs: Some(true),
            bpffs_path: "/sys/fs/bpf".into(),
            disk: Some(DiskFacts {
                path: "/var/lib/hearth".into(),
                free_bytes: 100 << 30,
                total_bytes: 200 << 30,
            }),
            files: vec![
                file(
                    "sandbox.init_path",
                    "/usr/local/libexec/hearth/hearth-init",
                    true,
                ),
                file(
                    "microvm.vmm_path",
                    "/usr/local/libexec/hearth/hearth-vmm",
                    true,
                ),
                file("microvm.kernel", "/var/lib/hearth/guest/vmlinux", false),
            ],
            io_uring_disabled: Some(0),
            nft: true,
            systemd: Some(Some(257)),
            socket_gid: Some(998),
        }
    }

    fn the<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    fn sandbox() -> Config {
        Config::from_toml("runtime = \"sandbox\"").unwrap()
    }

    #[test]
    fn a_good_host_passes_everything() {
        let mut cfg = Config::default();
        cfg.api.socket_group = SOCKET_GROUP.into();
        let checks = evaluate(&cfg, &good());
        for c in &checks {
            assert!(
                matches!(c.status, Status::Ok | Status::Skip),
                "{c:?} on a good host"
            );
            assert!(c.status == Status::Ok || c.fix.is_none());
        }
        assert!(the(&checks, "virtualization").message.contains("vmx"));
        assert!(the(&checks, "virtualization").message.contains("kvm_intel"));
        assert_eq!(the(&checks, "tun").status, Status::Ok);
        assert_eq!(the(&checks, "loop").status, Status::Skip);
    }

    #[test]
    fn pvm_fails_the_microvm_runtime_and_says_so() {
        // This build machine: kvm_pvm loaded, /dev/kvm works, no vmx/svm.
        let mut f = good();
        f.cpu_virt_flags.clear();
        f.kvm_modules = vec!["kvm".into(), "kvm_pvm".into()];
        assert_eq!(virtualization(&f), Virtualization::Pvm);
        let checks = evaluate(&Config::default(), &f);
        let v = the(&checks, "virtualization");
        assert_eq!(v.status, Status::Fail);
        assert!(v.message.starts_with("PVM"), "{v:?}");
        assert!(v.message.contains("kvm_pvm"));
        assert!(v.fix.as_ref().unwrap().contains("runtime = \"sandbox\""));
        // The device itself is fine.
        assert_eq!(the(&checks, "kvm").status, Status::Ok);

        // The sandbox runtime does not care, but the line still names the case.
        let checks = evaluate(&sandbox(), &f);
        let v = the(&checks, "virtualization");
        assert_eq!(v.status, Status::Ok);
        assert!(v.message.starts_with("PVM"));
        assert_eq!(the(&checks, "kvm").status, Status::Skip);

        // The test switch turns the failure into a warning.
        let mut cfg = Config::default();
        cfg.microvm.allow_without_hardware_virtualization = true;
        assert_eq!(
            the(&evaluate(&cfg, &f), "virtualization").status,
            Status::Warn
        );
    }

    #[test]
    fn pvm_wins_even_with_a_cpu_flag() {
        let mut f = good();
        f.kvm_modules.push("kvm_pvm".into());
        assert_eq!(virtualization(&f), Virtualization::Pvm);
    }

    #[test]
    fn emulated_and_missing_kvm() {
        let mut f = good();
        f.cpu_virt_flags.clear();
        f.kvm_modules = vec!["kvm".into()];
        assert_eq!(virtualization(&f), Virtualization::Emulated);
        let v = evaluate(&Config::default(), &f);
        assert_eq!(the(&v, "virtualization").status, Status::Fail);
        assert!(the(&v, "virtualization").message.starts_with("emulated"));

        // The CPU can, the module is not loaded.
        let mut f = good();
        f.kvm.present = false;
        f.kvm_modules.clear();
        f.kvm_api_version = None;
        f.cpu_virt_flags = vec!["svm".into()];
        assert_eq!(
            virtualization(&f),
            Virtualization::NoKvm(Some("svm".into()))
        );
        let v = evaluate(&Config::default(), &f);
        let kvm = the(&v, "kvm");
        assert_eq!(kvm.status, Status::Fail);
        assert!(kvm.fix.as_ref().unwrap().contains("modprobe kvm_amd"));

        // Nothing at all.
        f.cpu_virt_flags.clear();
        let v = evaluate(&Config::default(), &f);
        assert!(the(&v, "kvm").fix.as_ref().unwrap().contains("VT-x/AMD-V"));
        assert!(the(&v, "virtualization").message.starts_with("none"));
    }

    #[test]
    fn old_kernel_fails_kernel_and_tcx_with_the_same_advice() {
        let mut f = good();
        f.kernel_release = "6.1.0-18-amd64".into();
        f.tcx = Some(Err("TCX attach failed: Invalid argument".into()));
        let v = evaluate(&Config::default(), &f);
        assert_eq!(the(&v, "kernel").status, Status::Fail);
        assert!(the(&v, "kernel").message.contains("older than 6.6"));
        assert_eq!(the(&v, "tcx").status, Status::Fail);
        assert!(the(&v, "tcx").fix.as_ref().unwrap().contains("6.6"));
        assert_eq!(kernel_version("6.18.0"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn hybrid_cgroups_and_missing_controllers() {
        let mut f = good();
        f.cgroups = CgroupFacts {
            pure_v2: false,
            v2_controllers: vec!["hugetlb".into()],
            v1_controllers: ["cpu", "cpuacct", "memory", "pids"]
                .map(String::from)
                .to_vec(),
        };
        let v = evaluate(&Config::default(), &f);
        assert_eq!(the(&v, "cgroups").status, Status::Ok);
        assert!(the(&v, "cgroups").message.contains("v1"));
        f.cgroups.v1_controllers.retain(|c| c != "pids");
        let v = evaluate(&Config::default(), &f);
        assert_eq!(the(&v, "cgroups").status, Status::Fail);
        assert!(the(&v, "cgroups").message.ends_with("missing pids"));
    }

    #[test]
    fn old_systemd_on_v2_warns_about_restarts() {
        let mut f = good();
        f.systemd = Some(Some(252));
        let v = evaluate(&Config::default(), &f);
        assert_eq!(the(&v, "systemd").status, Status::Warn);
        // On a hybrid host the v1 controllers have no such rule.
        f.cgroups.pure_v2 = false;
        f.cgroups.v1_controllers = ["cpu", "memory", "pids"].map(String::from).to_vec();
        assert_eq!(
            the(&evaluate(&Config::default(), &f), "systemd").status,
            Status::Ok
        );
        f.systemd = None;
        assert_eq!(
            the(&evaluate(&Config::default(), &f), "systemd").status,
            Status::Skip
        );
    }

    #[test]
    fn disk_thresholds_and_budget() {
        let mut f = good();
        let status = |f: &Facts, cfg: &Config| the(&evaluate(cfg, f), "disk").status;
        let cfg = Config::default();
        f.disk.as_mut().unwrap().free_bytes = 1 << 30;
        assert_eq!(status(&f, &cfg), Status::Fail);
        f.disk.as_mut().unwrap().free_bytes = 5 << 30;
        assert_eq!(status(&f, &cfg), Status::Warn);
        f.disk.as_mut().unwrap().free_bytes = 50 << 30;
        assert_eq!(status(&f, &cfg), Status::Ok);
        let mut big = Config::default();
        big.images.budget_bytes = 60 << 30;
        assert_eq!(status(&f, &big), Status::Warn);
        f.disk = None;
        assert_eq!(status(&f, &cfg), Status::Warn);
    }

    #[test]
    fn missing_files_name_their_config_key() {
        let mut f = good();
        f.files[1].exists = false;
        f.files[0].executable = false;
        let v = evaluate(&Config::default(), &f);
        let bad: Vec<_> = v
            .iter()
            .filter(|c| c.name == "files" && c.status == Status::Fail)
            .collect();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].message.starts_with("microvm.vmm_path"));
        // The sandbox needs only hearth-init, which is not executable here.
        let v = evaluate(&sandbox(), &f);
        let bad: Vec<_> = v
            .iter()
            .filter(|c| c.name == "files" && c.status == Status::Fail)
            .collect();
        assert_eq!(bad.len(), 1);
        assert!(bad[0].message.contains("not executable"));
    }

    #[test]
    fn networking_off_skips_the_network_checks() {
        let mut f = good();
        f.btf = false;
        f.tcx = Some(Err("x".into()));
        f.bpffs = Some(false);
        f.nft = false;
        let cfg = Config {
            networking: false,
            ..Config::default()
        };
        let v = evaluate(&cfg, &f);
        for name in ["btf", "tcx", "bpffs", "nftables", "tun"] {
            assert_eq!(the(&v, name).status, Status::Skip, "{name}");
        }
        let v = evaluate(&Config::default(), &f);
        for name in ["btf", "tcx", "bpffs", "nftables"] {
            assert_eq!(the(&v, name).status, Status::Fail, "{name}");
            assert!(the(&v, name).fix.is_some());
        }
    }

    #[test]
    fn socket_group() {
        let mut f = good();
        let mut cfg = Config::default();
        let status = |f: &Facts, cfg: &Config| the(&evaluate(cfg, f), "socket").status;
        // The defaults leave the group empty: root only.
        assert_eq!(status(&f, &cfg), Status::Warn);
        cfg.api.socket_group = SOCKET_GROUP.into();
        assert_eq!(status(&f, &cfg), Status::Ok);
        f.socket_gid = None;
        assert_eq!(status(&f, &cfg), Status::Fail);
    }

    #[test]
    fn not_root_warns_and_skips_the_probe() {
        let mut f = good();
        f.root = false;
        f.tcx = None;
        f.kvm.open_error = Some("Permission denied".into());
        let v = evaluate(&Config::default(), &f);
        assert_eq!(the(&v, "privileges").status, Status::Warn);
        assert_eq!(the(&v, "tcx").status, Status::Skip);
        assert_eq!(the(&v, "kvm").status, Status::Warn);
    }
}
