//! `cargo xtask e2e`: boots the real guest kernel with hearth-init (issue 3).
//!
//! - `--tcg` boots it under qemu's software emulation (`-M microvm -accel tcg`), which works on
//!   any x86-64 host, this PVM machine included: an erofs busybox root on virtio-blk, a
//!   virtio-net device on a restricted user-mode backend (no traffic leaves qemu), hearth-init in
//!   standalone mode as `/init` of an initramfs. Two boots: a workload that checks its root and
//!   network and exits 7 (from `vmlinux`), and one that waits until qemu sends Ctrl-Alt-Del
//!   through its i8042 (the VMM's graceful stop) and exits on SIGTERM (from `bzImage`). Each
//!   must end with the guest's reboot.
//! - Without `--tcg` it boots the same kernel and initramfs with hearth-vmm on hardware KVM,
//!   with a TAP for virtio-net configured the way the agent does (host-side address, the guest's
//!   address and gateway in the spec), and checks that init ran, configured eth0 and wrote the
//!   boot timer. Then it runs the agent's end-to-end suite in microvm mode
//!   (`HEARTH_TEST_RUNTIME=microvm`, with this kernel, an initramfs holding hearth-init and the
//!   release hearth-vmm) and `cargo xtask bench cold-start --runtime microvm`. On PVM or
//!   emulated KVM it says why it skips and exits 0; it never reports a boot it did not see.
//! - `--write-initrd PATH` only writes the initramfs a microVM of the agent boots (hearth-init
//!   as `/init`, no spec), for running the suite in microvm mode by hand.
//!
//! # Layout
//!
//! - this file: the command, the guest's files (rootfs, spec, initramfs), the two runners;
//! - [`cpio`]: the initramfs writer;
//! - [`console`]: what the console must show, as pure functions over its text.

mod console;
pub(crate) mod cpio;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hearth_testkit::rootfs::{ImageFormat, Rootfs};

use crate::{kernel, util};

/// Options of `cargo xtask e2e`.
#[derive(clap::Args)]
pub struct Args {
    /// Boot under qemu's software emulation (TCG) instead of hearth-vmm on hardware KVM.
    #[arg(long)]
    pub tcg: bool,
    /// Print the guest console even when the checks pass.
    #[arg(long)]
    pub show_console: bool,
    /// Hardware KVM: only boot the kernel, without the agent suite and the benchmark.
    #[arg(long, conflicts_with = "tcg")]
    pub boot_only: bool,
    /// Only write the agent's initramfs (the static hearth-init as `/init`) to PATH and exit.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["tcg", "boot_only"])]
    pub write_initrd: Option<PathBuf>,
}

/// Runs the end-to-end boot (after setup).
pub fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(path) = &args.write_initrd {
        let init = hearth_testkit::artifacts::hearth_init();
        write_agent_initramfs(&init, path)?;
        println!("{}", path.display());
        return Ok(());
    }
    crate::setup::run(&crate::setup::Args { check: false })?;
    if args.tcg {
        tcg(args.show_console)
    } else {
        hardware(args.show_console, args.boot_only)
    }
}

/// An initramfs holding the static hearth-init `init` as `/init` (and the directories and
/// `/dev/console` it starts with), plus the standalone spec when there is one.
fn initramfs(init: &Path, spec: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let init_bytes = fs::read(init).with_context(|| format!("Cannot read {}", init.display()))?;
    let mut archive = cpio::Archive::new();
    for d in ["dev", "proc", "sys", "run", "tmp", "mnt", "hearth"] {
        archive.dir(d, 0o755);
    }
    archive
        .char_dev("dev/console", 0o600, 5, 1)
        .file("init", 0o755, &init_bytes);
    if let Some(spec) = spec {
        archive.file(SPEC_PATH.trim_start_matches('/'), 0o644, spec.as_bytes());
    }
    Ok(archive.finish())
}

/// Writes the initramfs the agent's microVMs boot: hearth-init as `/init`, which gets its spec
/// from the agent over vsock (`[microvm] initrd` of the agent's config).
pub(crate) fn write_agent_initramfs(init: &Path, path: &Path) -> anyhow::Result<()> {
    fs::write(path, initramfs(init, None)?)
        .with_context(|| format!("Cannot write {}", path.display()))
}

/// Where hearth-init finds its spec inside the initramfs.
const SPEC_PATH: &str = "/hearth/spec.json";
/// The kernel command line both runners start from.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// How long one boot may take, start to exit. A TCG boot takes seconds; this leaves room for a
/// machine whose two cores are busy with other builds and tests.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Guest memory in MiB (qemu and hearth-vmm alike).
const MEMORY_MIB: u32 = 256;
/// Size of the scratch disk (sparse).
const SCRATCH_MIB: u64 = 64;
/// Exit code of the workload that runs to completion.
pub const RUN_EXIT_CODE: i32 = 7;
/// Exit code of the workload when SIGTERM reaches it.
pub const STOP_EXIT_CODE: i32 = 42;

/// The guest's network in the spec: eth0's address, the gateway, the resolver.
#[derive(Clone, Copy)]
struct GuestNet<'a> {
    addr: &'a str,
    gateway: &'a str,
    dns: &'a str,
}

/// The guest-side address plan of the user-mode network (qemu's defaults).
const GUEST_ADDR: &str = "10.0.2.15/24";
const GATEWAY: &str = "10.0.2.2";
const QEMU_NET: GuestNet<'static> = GuestNet {
    addr: GUEST_ADDR,
    gateway: GATEWAY,
    dns: "10.0.2.3",
};

/// The workload of the first boot: reports what it sees, then exits with [`RUN_EXIT_CODE`].
fn run_script() -> String {
    format!(
        r#"#!/bin/sh
echo "{w}started uid=$(id -u) host=$(hostname) greeting=$GREETING"
echo "{w}root=$(awk '$2 == "/" {{ t = $3 }} END {{ print t }}' /proc/mounts)"
echo "{w}eth0=$(ip -o -4 addr show dev eth0 | awk '{{ print $4 }}')"
echo "{w}route=$(ip route show default | head -n 1)"
echo written > /e2e-file && echo "{w}wrote=$(cat /e2e-file)"
echo "{w}to stderr" >&2
exit {RUN_EXIT_CODE}
"#,
        w = console::WORKLOAD
    )
}

/// The workload of the second boot: waits for SIGTERM, then exits with [`STOP_EXIT_CODE`].
fn stop_script() -> String {
    format!(
        r#"#!/bin/sh
trap 'echo "{w}got SIGTERM"; exit {STOP_EXIT_CODE}' TERM
echo "{ready}"
while :; do sleep 0.1; done
"#,
        w = console::WORKLOAD,
        ready = console::WAITING_FOR_STOP
    )
}

/// The standalone spec (see `docs/hearth-init.md`): the workload, its network and its root.
fn spec_json(script: &str, network: Option<GuestNet<'_>>, scratch: bool) -> String {
    let mut spec = serde_json::json!({
        "instance_id": "e2e",
        "hostname": "e2e-guest",
        "entrypoint": ["/bin/sh", script],
        "env": ["GREETING=hello"],
        "root": {
            "image": "/dev/vda",
            "fstype": "erofs",
            "disk_size_bytes": 64u64 << 20,
        },
        "stop_signal": 15,
        "default_grace_millis": 60_000,
    });
    if scratch {
        spec["root"]["scratch_device"] = "/dev/vdb".into();
    }
    if let Some(net) = network {
        spec["network"] = serde_json::json!({
            "interface": "eth0",
            "addresses": [net.addr],
            "gateway_v4": net.gateway,
            "dns_servers": [net.dns],
            "mtu": 1500,
        });
    }
    serde_json::to_string_pretty(&spec).expect("a JSON value serialises")
}

/// The files one boot needs, in a temporary directory removed on drop.
struct GuestFiles {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
    /// An ext4 image for the writable layer (`/dev/vdb`), as the agent gives a microVM.
    scratch: Option<PathBuf>,
    initramfs: PathBuf,
}

impl GuestFiles {
    /// Builds the busybox erofs root (with both workload scripts), optionally an empty ext4
    /// scratch disk, and an initramfs holding hearth-init as `/init` and a spec that runs
    /// `script`.
    fn new(
        init: &Path,
        script: &str,
        network: Option<GuestNet<'_>>,
        scratch: bool,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("hearth-e2e-")
            .tempdir()
            .context("Cannot create a temporary directory")?;
        let rootfs = dir.path().join("rootfs.erofs");
        Rootfs::busybox()
            .file("/e2e/run.sh", run_script(), 0o755)
            .file("/e2e/stop.sh", stop_script(), 0o755)
            .write_image(&dir.path().join("tree"), &rootfs, ImageFormat::Erofs)
            .context("Cannot build the busybox erofs root")?;
        let scratch = if scratch {
            let path = dir.path().join("scratch.ext4");
            fs::File::create(&path)?.set_len(SCRATCH_MIB << 20)?;
            util::output(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&path))?;
            Some(path)
        } else {
            None
        };

        let spec = spec_json(script, network, scratch.is_some());
        let initramfs_path = dir.path().join("initramfs.cpio");
        fs::write(&initramfs_path, initramfs(init, Some(&spec))?)?;
        Ok(Self {
            dir,
            rootfs,
            scratch,
            initramfs: initramfs_path,
        })
    }
}

/// The console of a running VM, collected line by line with the time each line arrived.
#[derive(Clone, Default)]
struct Console {
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Console {
    /// Reads `out` until EOF in a thread.
    fn collect(
        out: impl Read + Send + 'static,
        started: Instant,
    ) -> (Self, thread::JoinHandle<()>) {
        let console = Self::default();
        let lines = console.lines.clone();
        let reader = thread::spawn(move || {
            let mut out = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match out.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .replace('\r', "");
                        lines
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((started.elapsed(), line));
                    }
                }
            }
        });
        (console, reader)
    }

    fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = String::new();
        for (_, l) in lines.iter() {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// When a line containing `needle` arrived.
    fn seen(&self, needle: &str) -> Option<Duration> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }
}

/// A VM process (qemu or hearth-vmm) with its console; killed on drop.
struct Vm {
    child: Child,
    console: Console,
    reader: Option<thread::JoinHandle<()>>,
    started: Instant,
}

impl Vm {
    fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("Cannot start `{}`", util::show(cmd)))?;
        let stdout = child.stdout.take().context("No stdout pipe")?;
        let stderr = child.stderr.take().context("No stderr pipe")?;
        let (console, reader) = Console::collect(stdout, started);
        // The VMM's own messages (and qemu's errors) go to the same record, tagged.
        let tagged = console.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tagged
                    .lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((started.elapsed(), format!("[vmm stderr] {line}")));
            }
        });
        Ok(Self {
            child,
            console,
            reader: Some(reader),
            started,
        })
    }

    /// Waits until the console shows `needle`; false when the VM exits or time runs out first.
    fn wait_for(&mut self, needle: &str, deadline: Instant) -> bool {
        loop {
            if self.console.seen(needle).is_some() {
                return true;
            }
            if Instant::now() >= deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                return self.console.seen(needle).is_some();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; `None` (after killing it) when time runs out.
    fn wait_exit(&mut self, deadline: Instant) -> anyhow::Result<Option<(ExitStatus, Duration)>> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                let at = self.started.elapsed();
                if let Some(reader) = self.reader.take() {
                    // The pipe is closed once the process is gone; the reader ends at EOF.
                    let _ = reader.join();
                }
                return Ok(Some((status, at)));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Fails with the whole console attached.
fn fail_with_console(console: &Console, what: impl std::fmt::Display) -> anyhow::Error {
    eprintln!(
        "----- guest console -----\n{}-------------------------",
        console.text()
    );
    anyhow::anyhow!("{what}")
}

// ---------------------------------------------------------------------------------------------
// TCG
// ---------------------------------------------------------------------------------------------

/// What the TCG run measured.
#[derive(Debug)]
pub struct TcgReport {
    /// Wall time from qemu's start to the kernel's "Run /init" line, first boot.
    pub to_init: Duration,
    /// The kernel's own timestamp of that line (guest time).
    pub to_init_guest: Option<f64>,
    /// Wall time from qemu's start to its exit, first boot.
    pub run_total: Duration,
    /// Wall time from Ctrl-Alt-Del to qemu's exit, second boot.
    pub stop_after_cad: Duration,
}

fn qemu_command(kernel: &Path, files: &GuestFiles, cmdline: &str, monitor: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // acpi=off: our kernel has no ACPI, so qemu declares its virtio-mmio devices on the kernel
    // command line (`virtio_mmio.device=`), as hearth-vmm does.
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        &MEMORY_MIB.to_string(),
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(&files.initramfs)
    .args(["-append", cmdline])
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none,readonly=on",
        files.rootfs.display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"]);
    if let Some(scratch) = &files.scratch {
        cmd.arg("-drive")
            .arg(format!(
                "id=scratch,file={},format=raw,if=none",
                scratch.display()
            ))
            .args(["-device", "virtio-blk-device,drive=scratch"]);
    }
    // A user-mode backend with restrict=on: the guest's frames reach no host and no network.
    cmd.args(["-netdev", "user,id=net0,restrict=on"])
        .args(["-device", "virtio-net-device,netdev=net0"])
        // The PC keyboard controller hearth-vmm also has: Ctrl-Alt-Del and the reboot=k reset.
        .args(["-device", "i8042"])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    cmd
}

/// Boots under qemu TCG twice and checks the console; prints one summary line per boot.
pub fn tcg(show_console: bool) -> anyhow::Result<()> {
    let report = tcg_report(show_console)?;
    println!(
        "e2e --tcg: ok: the kernel ran /init {:.1} s after qemu started ({} guest time), the \
         workload's exit code {RUN_EXIT_CODE} was reported and the VM rebooted at {:.1} s; \
         Ctrl-Alt-Del stopped the second workload (exit {STOP_EXIT_CODE}) and the VM rebooted \
         {:.1} s later",
        report.to_init.as_secs_f64(),
        report
            .to_init_guest
            .map_or("unknown".into(), |t| format!("{t:.2} s")),
        report.run_total.as_secs_f64(),
        report.stop_after_cad.as_secs_f64(),
    );
    Ok(())
}

fn tcg_report(show_console: bool) -> anyhow::Result<TcgReport> {
    if !util::have("qemu-system-x86_64") {
        bail!("qemu-system-x86_64 is not installed (`cargo xtask setup` installs qemu-system-x86)");
    }
    let kernel = util::step("kernel", || kernel::build(false))?;
    let init = util::step("static hearth-init", || {
        Ok(hearth_testkit::artifacts::hearth_init())
    })?;

    // Boot 1: the workload runs to completion.
    let files = GuestFiles::new(&init, "/e2e/run.sh", Some(QEMU_NET), true)?;
    // Debug level: hearth-init then also says that it wrote the boot timer.
    let cmdline = format!("{CMDLINE} hearth.standalone={SPEC_PATH} hearth.log=debug");
    let monitor = files.dir.path().join("monitor.sock");
    let mut vm = Vm::spawn(&mut qemu_command(
        &kernel.vmlinux,
        &files,
        &cmdline,
        &monitor,
    ))?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let Some((status, run_total)) = vm.wait_exit(deadline)? else {
        return Err(fail_with_console(
            &vm.console,
            format!("The first boot did not end within {BOOT_TIMEOUT:?}"),
        ));
    };
    let text = vm.console.text();
    if show_console {
        eprintln!("----- guest console (boot 1) -----\n{text}----------------------------------");
    }
    if !status.success() {
        return Err(fail_with_console(
            &vm.console,
            format!("qemu exited with {status} in the first boot"),
        ));
    }
    let checks = console::check_run(&text, GUEST_ADDR, GATEWAY);
    if let Err(e) = checks {
        return Err(fail_with_console(&vm.console, format!("First boot: {e:#}")));
    }
    // The workload's write went through the overlay into the upper layer on the scratch disk.
    if let Some(scratch) = &files.scratch {
        let found = util::output(
            Command::new("debugfs")
                .args(["-R", "cat /upper/e2e-file"])
                .arg(scratch),
        )?;
        if found.trim() != "written" {
            return Err(fail_with_console(
                &vm.console,
                format!(
                    "The scratch disk holds {found:?} at /upper/e2e-file after the run, not \
                     \"written\""
                ),
            ));
        }
    }
    let to_init = vm
        .console
        .seen(console::KERNEL_RUNS_INIT)
        .context("The kernel's \"Run /init\" line vanished")?;
    let to_init_guest = console::kernel_timestamp(&text, console::KERNEL_RUNS_INIT);
    drop(vm);
    drop(files);

    // Boot 2: Ctrl-Alt-Del through the i8042 stops the workload with SIGTERM.
    let files = GuestFiles::new(&init, "/e2e/stop.sh", None, false)?;
    let monitor = files.dir.path().join("monitor.sock");
    let mut vm = Vm::spawn(&mut qemu_command(
        &kernel.vmlinux,
        &files,
        &cmdline,
        &monitor,
    ))?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    if !vm.wait_for(console::WAITING_FOR_STOP, deadline) {
        return Err(fail_with_console(
            &vm.console,
            "The second workload never said it was waiting for a stop",
        ));
    }
    let cad = Instant::now();
    send_ctrl_alt_del(&monitor).map_err(|e| fail_with_console(&vm.console, format!("{e:#}")))?;
    let Some((status, _)) = vm.wait_exit(deadline)? else {
        return Err(fail_with_console(
            &vm.console,
            "The VM did not end after Ctrl-Alt-Del",
        ));
    };
    let stop_after_cad = cad.elapsed();
    let text = vm.console.text();
    if show_console {
        eprintln!("----- guest console (boot 2) -----\n{text}----------------------------------");
    }
    if !status.success() {
        return Err(fail_with_console(
            &vm.console,
            format!("qemu exited with {status} in the second boot"),
        ));
    }
    if let Err(e) = console::check_stop(&text) {
        return Err(fail_with_console(
            &vm.console,
            format!("Second boot: {e:#}"),
        ));
    }
    Ok(TcgReport {
        to_init,
        to_init_guest,
        run_total,
        stop_after_cad,
    })
}

/// Presses Ctrl-Alt-Del on the guest's keyboard through qemu's human monitor.
fn send_ctrl_alt_del(monitor: &Path) -> anyhow::Result<()> {
    let mut sock = UnixStream::connect(monitor)
        .with_context(|| format!("Cannot connect to qemu's monitor {}", monitor.display()))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.write_all(b"sendkey ctrl-alt-delete\n")?;
    // The monitor echoes the line as typed, then prints its next prompt once the command ran.
    let mut buf = [0u8; 4096];
    let mut seen = String::new();
    loop {
        if let Some(at) = seen.find("ctrl-alt-delete")
            && seen[at..].contains("(qemu)")
        {
            break;
        }
        let n = sock
            .read(&mut buf)
            .context("qemu's monitor did not answer")?;
        if n == 0 {
            bail!("qemu's monitor closed the connection: {seen:?}");
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hardware KVM
// ---------------------------------------------------------------------------------------------

/// Why this host cannot boot a Linux guest through `/dev/kvm`, if it cannot.
fn kvm_unusable_reason(cpuinfo: &str, pvm_module: bool) -> Option<String> {
    if pvm_module {
        return Some(
            "/dev/kvm is PVM here (module kvm_pvm is loaded): a guest that is not a PVM kernel is \
             emulated instruction by instruction and Linux cannot boot"
                .into(),
        );
    }
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Some(
            "the CPU has no vmx/svm flag, so /dev/kvm (if any) cannot run guests natively".into(),
        );
    }
    None
}

/// A TAP device for the guest's virtio-net, set up as the agent sets up an instance's: a
/// persistent `IFF_TAP | IFF_NO_PI` device whose host end carries the gateway address; removed
/// on drop.
struct Tap {
    name: String,
}

impl Tap {
    fn new(name: String, host_cidr: &str) -> anyhow::Result<Self> {
        util::output(Command::new("ip").args(["tuntap", "add", "dev", &name, "mode", "tap"]))?;
        let tap = Self { name };
        util::output(Command::new("ip").args(["addr", "add", host_cidr, "dev", &tap.name]))?;
        util::output(Command::new("ip").args(["link", "set", &tap.name, "up"]))?;
        Ok(tap)
    }

    /// Frames the host received from the guest.
    fn rx_packets(&self) -> u64 {
        fs::read_to_string(format!(
            "/sys/class/net/{}/statistics/rx_packets",
            self.name
        ))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Why this host cannot run the hardware path, if it cannot (`None`: it can).
pub(crate) fn hardware_unusable_reason() -> Option<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    kvm_unusable_reason(&cpuinfo, Path::new("/sys/module/kvm_pvm").exists())
}

/// Boots the kernel with hearth-vmm on hardware KVM, then (unless `boot_only`) runs the agent
/// suite in microvm mode and the microvm cold-start benchmark; or says why it cannot here.
fn hardware(show_console: bool, boot_only: bool) -> anyhow::Result<()> {
    if let Some(why) = hardware_unusable_reason() {
        println!(
            "e2e: SKIPPED, no boot was attempted: {why}. Neither the agent suite in microvm mode \
             nor `bench cold-start --runtime microvm` ran. Run `cargo xtask e2e --tcg` for the \
             emulated boot, the agent suite in its sandbox mode, and this on a host with \
             hardware virtualization"
        );
        return Ok(());
    }
    if !Path::new("/dev/kvm").exists() {
        bail!(
            "The CPU supports virtualization but /dev/kvm is missing (load kvm_intel or kvm_amd)"
        );
    }
    if !util::is_root() {
        bail!("`cargo xtask e2e` needs root on a hardware-KVM host (the guest's TAP, the agent)");
    }
    let kernel = util::step("kernel", || kernel::build(false))?;
    let init = util::step("static hearth-init", || {
        Ok(hearth_testkit::artifacts::hearth_init())
    })?;
    let vmm = util::step("hearth-vmm (release)", build_vmm)?;
    boot_on_kvm(&kernel.vmlinux, &init, &vmm, show_console)?;
    if boot_only {
        return Ok(());
    }
    agent_suite(&kernel.vmlinux, &init, &vmm)?;
    util::step("cargo xtask bench cold-start --runtime microvm", || {
        let exe = std::env::current_exe().context("Cannot find the xtask binary")?;
        util::run(Command::new(exe).args(["bench", "cold-start", "--runtime", "microvm"]))
    })?;
    println!("e2e: ok: the boot, the agent suite in microvm mode and the benchmark all ran");
    Ok(())
}

/// One boot with hearth-vmm: the run workload, its root on virtio-blk, eth0 on a TAP.
fn boot_on_kvm(vmlinux: &Path, init: &Path, vmm: &Path, show_console: bool) -> anyhow::Result<()> {
    // A /24 of its own per run, like an agent's node subnet: the host end is the gateway.
    let net = 10 + std::process::id() % 240;
    let (host, guest) = (format!("10.213.{net}.1"), format!("10.213.{net}.2/24"));
    let guest_net = GuestNet {
        addr: &guest,
        gateway: &host,
        dns: &host,
    };
    let tap = Tap::new(
        format!("he2e{}", std::process::id() % 100_000),
        &format!("{host}/24"),
    )?;
    let files = GuestFiles::new(init, "/e2e/run.sh", Some(guest_net), true)?;
    let scratch = files
        .scratch
        .as_ref()
        .context("The scratch disk is missing")?;
    let cmdline = format!("{CMDLINE} hearth.standalone={SPEC_PATH}");
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel")
        .arg(vmlinux)
        .arg("--initrd")
        .arg(&files.initramfs)
        .args(["--cmdline", &cmdline])
        .args(["--memory-mib", &MEMORY_MIB.to_string()])
        .arg("--disk")
        .arg(format!("path={},ro", files.rootfs.display()))
        .arg("--disk")
        .arg(format!("path={}", scratch.display()))
        .arg("--net")
        .arg(format!("tap={}", tap.name))
        .args(["--serial", "stdout"]);
    let mut vm = Vm::spawn(&mut cmd)?;
    let Some((status, total)) = vm.wait_exit(Instant::now() + BOOT_TIMEOUT)? else {
        return Err(fail_with_console(
            &vm.console,
            format!("hearth-vmm did not exit within {BOOT_TIMEOUT:?}"),
        ));
    };
    let text = vm.console.text();
    if show_console {
        eprintln!("----- guest console -----\n{text}-------------------------");
    }
    let boot_us = console::check_hardware(&text, status.code(), Some((&guest, &host)))
        .map_err(|e| fail_with_console(&vm.console, format!("{e:#}")))?;
    println!(
        "e2e: ok: hearth-vmm booted the kernel on KVM; hearth-init wrote the boot timer \
         {:.1} ms after the VMM started, configured eth0 {guest} via {host} on TAP {} ({} \
         frames from the guest), ran the workload (exit code {RUN_EXIT_CODE} reported), and the \
         guest reset the VM {:.0} ms after the VMM started",
        boot_us as f64 / 1e3,
        tap.name,
        tap.rx_packets(),
        total.as_secs_f64() * 1e3
    );
    Ok(())
}

/// The agent's end-to-end suites (`agent/tests/suite.rs`, `restart.rs`, `pool.rs`) with the
/// microvm runtime: this kernel, an initramfs holding hearth-init, the release hearth-vmm; no
/// test may skip.
fn agent_suite(vmlinux: &Path, init: &Path, vmm: &Path) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("hearth-e2e-suite-")
        .tempdir()
        .context("Cannot create a temporary directory")?;
    let initrd = dir.path().join("agent-initramfs.cpio");
    write_agent_initramfs(init, &initrd)?;
    util::step("agent suite, microvm runtime (cargo nextest)", || {
        let mut cmd = util::cargo();
        cmd.current_dir(util::root())
            .args([
                "nextest",
                "run",
                "--package",
                "hearth-agent",
                "--no-fail-fast",
            ])
            .args(["--test", "suite", "--test", "restart", "--test", "pool"])
            .env("HEARTH_TEST_RUNTIME", "microvm")
            .env("HEARTH_TEST_KERNEL", vmlinux)
            .env("HEARTH_TEST_INITRD", &initrd)
            .env("HEARTH_TEST_VMM", vmm)
            .env(hearth_testkit::skip::NO_SKIP_ENV, "1");
        util::run(&mut cmd)
    })
}

/// Builds hearth-vmm in release mode and returns the binary.
pub(crate) fn build_vmm() -> anyhow::Result<PathBuf> {
    util::run(util::cargo().current_dir(util::root()).args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "hearth-vmm",
        "--bin",
        "hearth-vmm",
    ]))?;
    Ok(hearth_testkit::artifacts::target_dir().join("release/hearth-vmm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_and_missing_flags_skip() {
        let vmx = "processor : 0\nflags\t\t: fpu vme vmx sse\n";
        let none = "processor : 0\nflags\t\t: fpu vme sse\n";
        assert!(kvm_unusable_reason(vmx, false).is_none());
        assert!(kvm_unusable_reason(vmx, true).unwrap().contains("kvm_pvm"));
        assert!(
            kvm_unusable_reason(none, false)
                .unwrap()
                .contains("vmx/svm")
        );
        let svm = "flags : fpu svm\n";
        assert!(kvm_unusable_reason(svm, false).is_none());
        // A flag name that only contains the letters does not count.
        assert!(kvm_unusable_reason("flags : vmxe svm_lock\n", false).is_some());
    }

    #[test]
    fn spec_is_valid_json_with_the_script() {
        let v: serde_json::Value =
            serde_json::from_str(&spec_json("/e2e/run.sh", Some(QEMU_NET), true)).unwrap();
        assert_eq!(v["entrypoint"][1], "/e2e/run.sh");
        assert_eq!(v["network"]["addresses"][0], GUEST_ADDR);
        let v: serde_json::Value =
            serde_json::from_str(&spec_json("/e2e/stop.sh", None, false)).unwrap();
        assert!(v.get("network").is_none());
    }
}
