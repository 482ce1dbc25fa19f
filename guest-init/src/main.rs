//! `hearth-init`: PID 1 of a Hearth instance.
//!
//! In the sandbox it is started with `hearth.*` options as arguments; in a microVM it is the
//! kernel's init and reads them from `/proc/cmdline`. See `docs/hearth-init.md`.

use std::{process::ExitCode, time::Instant};

use anyhow::Context as _;
use hearth_init::{
    bootstrap::{Bootstrap, Mode},
    console, diag, supervisor,
};
use nix::mount::MsFlags;

/// Exit code for unusable bootstrap options.
const USAGE_EXIT_CODE: u8 = 2;

/// The kernel's init starts with nothing mounted: /dev for the console and devices, /proc for
/// the command line.
fn early_vm_setup() -> anyhow::Result<()> {
    for (dir, fstype) in [("/dev", "devtmpfs"), ("/proc", "proc"), ("/sys", "sysfs")] {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {dir}"))?;
        match nix::mount::mount(
            Some(fstype),
            dir,
            Some(fstype),
            MsFlags::MS_NOSUID,
            None::<&str>,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(e).with_context(|| format!("Cannot mount {fstype} on {dir}")),
        }
    }
    // Without /dev/console in the initramfs the kernel gave init no stdio: open it now.
    // SAFETY: fcntl(F_GETFD) on a descriptor number only inspects it.
    if unsafe { libc::fcntl(1, libc::F_GETFD) } < 0
        && let Ok(console) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
    {
        use std::os::fd::AsRawFd as _;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which nothing else owns yet.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    Ok(())
}

fn end_vm() -> ! {
    nix::unistd::sync();
    // With `reboot=k` the kernel resets through the i8042: the VMM sees the guest end.
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    console::say(&format!("reboot failed: {err:?}"));
    loop {
        std::thread::park();
    }
}

/// True when the options came from the kernel command line (no sandbox options given).
fn mode_is_vm(args: &[String], env: Option<&str>) -> bool {
    std::process::id() == 1 && Bootstrap::from_args_or_env(args, env).is_none()
}

fn main() -> ExitCode {
    let t0 = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env = std::env::var(hearth_init::bootstrap::OPTIONS_ENV).ok();
    let boot = match Bootstrap::from_args_or_env(&args, env.as_deref()) {
        Some(b) => b,
        None => {
            if std::process::id() != 1 {
                eprintln!(
                    "hearth-init: no hearth.* options and not PID 1; see docs/hearth-init.md"
                );
                return ExitCode::from(USAGE_EXIT_CODE);
            }
            if let Err(e) = early_vm_setup() {
                console::say(&format!("{e:#}"));
                end_vm();
            }
            match std::fs::read_to_string("/proc/cmdline") {
                Ok(cmdline) => Bootstrap::from_cmdline(&cmdline),
                Err(e) => {
                    console::say(&format!("cannot read /proc/cmdline: {e}"));
                    end_vm();
                }
            }
        }
    };
    let boot = match boot {
        Ok(b) => b,
        Err(e) => {
            console::say(&format!("{e}"));
            if mode_is_vm(&args, env.as_deref()) {
                end_vm();
            }
            return ExitCode::from(USAGE_EXIT_CODE);
        }
    };
    diag::Console::install(boot.log_level);
    let mode = boot.mode;
    console::say(&format!(
        "hearth-init {} starting (mode={}, transport={:?})",
        env!("CARGO_PKG_VERSION"),
        match mode {
            Mode::Vm => "vm",
            Mode::Sandbox => "sandbox",
        },
        boot.transport
    ));
    // PID 1 must survive memory pressure; the OOM killer should pick the workload.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!("Cannot protect init from the OOM killer: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            console::say(&format!("cannot start the runtime: {e}"));
            if mode == Mode::Vm {
                end_vm();
            }
            return ExitCode::from(supervisor::INTERNAL_EXIT_CODE as u8);
        }
    };
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(supervisor::run(boot, t0))
    })) {
        Ok(code) => code,
        Err(_) => {
            // The panic message is already on stderr (the console).
            console::say("internal error (panic); ending");
            supervisor::INTERNAL_EXIT_CODE
        }
    };
    nix::unistd::sync();
    match mode {
        Mode::Vm => end_vm(),
        Mode::Sandbox => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(255)),
    }
}
