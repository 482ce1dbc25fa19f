//! What a guest console must show, checked by pure functions over its text.
//!
//! Three sources write to the console: the kernel (`[    0.123456] ...` lines), hearth-init in
//! standalone mode (its diagnostics and the exit report, format in `docs/hearth-init.md`), and
//! the workload, whose lines carry [`WORKLOAD`] so they cannot be mistaken for anything else.

use anyhow::bail;

/// Prefix of every line the e2e workloads print.
pub const WORKLOAD: &str = "e2e-workload: ";
/// The stop workload prints this once its SIGTERM trap is set.
pub const WAITING_FOR_STOP: &str = "e2e-workload: waiting for a stop";
/// The kernel hands over to the initramfs' init.
pub const KERNEL_RUNS_INIT: &str = "Run /init as init process";
/// The kernel restarts the machine (`reboot(RB_AUTOBOOT)` with `reboot=k`).
const KERNEL_REBOOTS: &str = "reboot: Restarting system";
/// The kernel's i8042 + AT keyboard drivers bound (the path of Ctrl-Alt-Del).
const KEYBOARD_BOUND: &str = "input: AT Raw Set 2 keyboard";

/// The kernel mounted the image (the overlay's lower layer) from the first virtio disk.
const ROOT_MOUNTED: &str = "erofs: (device vda): mounted";
/// The kernel mounted the scratch disk (the overlay's upper layer).
const SCRATCH_MOUNTED: &str = "EXT4-fs (vdb): mounted filesystem";
/// hearth-init wrote 123 to the boot timer (at `hearth.log=debug`).
const BOOT_TIMER_WRITTEN: &str = "boot timer written at 0xc0000000";
/// hearth-init's exit report on the console (standalone mode).
const EXIT_REPORT: &str = "hearth-init: exited ";
/// hearth-init relays the workload's output line by line with these prefixes.
const STDOUT: &str = "stdout: ";
const STDERR: &str = "stderr: ";
/// hearth-init starts a stop (here: because of Ctrl-Alt-Del) with the spec's signal.
const INIT_STOPS: &str = "hearth-init: stopping: signal=15";

/// The exit report's fields: `code=N reason=WORD`.
#[derive(Debug, PartialEq, Eq)]
pub struct ExitReport {
    /// Exit code (128+n for a signal).
    pub code: i32,
    /// `exit`, `signal`, `oom`, `init_error`.
    pub reason: String,
}

/// Finds the last exit report on the console.
pub fn exit_report(text: &str) -> Option<ExitReport> {
    let line = text.lines().rev().find(|l| l.contains(EXIT_REPORT))?;
    let rest = &line[line.find(EXIT_REPORT)? + EXIT_REPORT.len()..];
    let mut code = None;
    let mut reason = None;
    for word in rest.split_whitespace() {
        if let Some(v) = word.strip_prefix("code=") {
            code = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("reason=") {
            reason = Some(v.trim_matches(['"', ',']).to_owned());
        }
    }
    Some(ExitReport {
        code: code?,
        reason: reason?,
    })
}

/// The kernel's timestamp (seconds since boot) on the first line containing `needle`.
pub fn kernel_timestamp(text: &str, needle: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(needle))?;
    let inner = line.trim_start().strip_prefix('[')?;
    inner.split(']').next()?.trim().parse().ok()
}

/// Collects failed expectations so one run names all of them.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn expect(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failed.push(what.into());
        }
    }

    fn contains(&mut self, text: &str, needle: &str, what: &str) {
        self.expect(
            text.contains(needle),
            format!("{what} (no line with {needle:?})"),
        );
    }

    fn exit(&mut self, text: &str, code: i32, reason: &str) {
        match exit_report(text) {
            None => self.failed.push(format!(
                "hearth-init reported no exit (no line with {EXIT_REPORT:?} and code=, reason=)"
            )),
            Some(r) => self.expect(
                r.code == code && r.reason == reason,
                format!(
                    "hearth-init reported code={} reason={}, expected code={code} reason={reason}",
                    r.code, r.reason
                ),
            ),
        }
    }

    fn common(&mut self, text: &str) {
        self.contains(text, KERNEL_RUNS_INIT, "the kernel did not run /init");
        self.expect(
            !text.contains("Kernel panic"),
            "the kernel panicked (\"Kernel panic\" on the console)",
        );
        self.contains(
            text,
            KERNEL_REBOOTS,
            "the VM did not end by the guest's reboot",
        );
    }

    /// The workload saw eth0 with `addr` and a default route via `gateway`.
    fn network(&mut self, text: &str, addr: &str, gateway: &str) {
        self.contains(
            text,
            &format!("{STDOUT}{WORKLOAD}eth0={addr}"),
            "eth0 does not carry the spec's address",
        );
        self.contains(
            text,
            &format!("{STDOUT}{WORKLOAD}route=default via {gateway}"),
            "there is no default route via the spec's gateway",
        );
    }

    fn finish(self) -> anyhow::Result<()> {
        if self.failed.is_empty() {
            Ok(())
        } else {
            bail!(
                "{} check(s) failed:\n  - {}",
                self.failed.len(),
                self.failed.join("\n  - ")
            )
        }
    }
}

/// The first TCG boot: root assembled, network configured, the workload's output and exit code
/// reported, and the VM ended by reboot.
pub fn check_run(text: &str, addr: &str, gateway: &str) -> anyhow::Result<()> {
    let mut c = Checks::default();
    c.common(text);
    c.contains(
        text,
        ROOT_MOUNTED,
        "the kernel did not mount the erofs image on /dev/vda",
    );
    c.contains(
        text,
        SCRATCH_MOUNTED,
        "the kernel did not mount the ext4 scratch disk /dev/vdb",
    );
    c.contains(
        text,
        BOOT_TIMER_WRITTEN,
        "hearth-init did not write the boot timer through /dev/mem",
    );
    let out = |rest: &str| format!("{STDOUT}{WORKLOAD}{rest}");
    c.contains(
        text,
        &out("started uid=0 host=e2e-guest greeting=hello"),
        "the workload did not start with the spec's hostname and environment",
    );
    c.contains(
        text,
        &out("root=overlay"),
        "the workload's root is not the overlay hearth-init assembles",
    );
    c.contains(
        text,
        &out("wrote=written"),
        "the workload could not write to its root",
    );
    c.network(text, addr, gateway);
    c.contains(
        text,
        &format!("{STDERR}{WORKLOAD}to stderr"),
        "the workload's stderr did not reach the console as stderr",
    );
    c.exit(text, super::RUN_EXIT_CODE, "exit");
    c.finish()
}

/// The second TCG boot: Ctrl-Alt-Del reached init through the i8042, the workload got SIGTERM,
/// its exit was reported, and the VM ended by reboot.
pub fn check_stop(text: &str) -> anyhow::Result<()> {
    let mut c = Checks::default();
    c.common(text);
    c.contains(
        text,
        KEYBOARD_BOUND,
        "the kernel's i8042/AT keyboard driver did not bind",
    );
    c.contains(
        text,
        INIT_STOPS,
        "hearth-init did not take Ctrl-Alt-Del as a stop request",
    );
    c.contains(
        text,
        &format!("{STDOUT}{WORKLOAD}got SIGTERM"),
        "the workload did not get SIGTERM after Ctrl-Alt-Del",
    );
    c.exit(text, super::STOP_EXIT_CODE, "exit");
    c.finish()
}

/// The VMM's boot-timer line (`docs/vmm.md`), tagged by the runner as the VMM's stderr.
const BOOT_TIMER_LINE: &str = "hearth-vmm boot-timer: guest_boot_us=";

/// The hearth-vmm boot on hardware KVM: init ran the workload, configured eth0 with
/// `network`'s (address, gateway) when given, the boot timer was hit, and the VMM ended because
/// the guest reset. Returns the boot time in microseconds.
pub fn check_hardware(
    text: &str,
    vmm_exit: Option<i32>,
    network: Option<(&str, &str)>,
) -> anyhow::Result<u64> {
    let mut c = Checks::default();
    c.common(text);
    if let Some((addr, gateway)) = network {
        c.network(text, addr, gateway);
    }
    c.contains(
        text,
        ROOT_MOUNTED,
        "the kernel did not mount the erofs image on /dev/vda",
    );
    c.contains(
        text,
        &format!("{STDOUT}{WORKLOAD}root=overlay"),
        "the workload's root is not the overlay hearth-init assembles",
    );
    c.exit(text, super::RUN_EXIT_CODE, "exit");
    let boot_us = text.lines().find_map(|l| {
        let at = l.find(BOOT_TIMER_LINE)?;
        l[at + BOOT_TIMER_LINE.len()..].trim().parse::<u64>().ok()
    });
    c.expect(
        boot_us.is_some(),
        format!(
            "hearth-vmm printed no {BOOT_TIMER_LINE:?} line: init did not write the boot timer"
        ),
    );
    c.expect(
        vmm_exit == Some(0),
        format!("hearth-vmm exited with {vmm_exit:?}, not 0 (the guest's reset)"),
    );
    c.finish()?;
    Ok(boot_us.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "\
[    0.664010] Run /init as init process
hearth-init[DEBUG]: boot timer written at 0xc0000000
[    0.7] erofs: (device vda): mounted with root inode @ nid 36.
[    0.8] EXT4-fs (vdb): mounted filesystem 0b r/w with ordered data mode.
stdout: e2e-workload: started uid=0 host=e2e-guest greeting=hello
stdout: e2e-workload: root=overlay
stdout: e2e-workload: eth0=10.0.2.15/24
stdout: e2e-workload: route=default via 10.0.2.2 dev eth0
stdout: e2e-workload: wrote=written
stderr: e2e-workload: to stderr
hearth-init: exited code=7 reason=exit
[    0.960028] reboot: Restarting system
";

    #[test]
    fn a_good_run_passes() {
        check_run(RUN, "10.0.2.15/24", "10.0.2.2").unwrap();
        assert_eq!(kernel_timestamp(RUN, KERNEL_RUNS_INIT), Some(0.664010));
    }

    #[test]
    fn every_missing_piece_is_named() {
        let bad = RUN
            .replace("root=overlay", "root=rootfs")
            .replace("code=7", "code=1")
            .replace("reboot: Restarting system", "Kernel panic - not syncing");
        let err = check_run(&bad, "10.0.2.15/24", "10.0.2.2")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("4 check(s) failed"), "{err}");
        assert!(err.contains("overlay") && err.contains("code=1") && err.contains("panicked"));
    }

    #[test]
    fn hardware_boot_needs_the_boot_timer_and_a_reset() {
        let text = format!("{RUN}[vmm stderr] hearth-vmm boot-timer: guest_boot_us=81234\n");
        assert_eq!(check_hardware(&text, Some(0), None).unwrap(), 81234);
        let net = Some(("10.0.2.15/24", "10.0.2.2"));
        assert_eq!(check_hardware(&text, Some(0), net).unwrap(), 81234);
        let err = check_hardware(&text, Some(0), Some(("10.213.9.2/24", "10.213.9.1")))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("2 check(s)") && err.contains("eth0"),
            "{err}"
        );
        let err = check_hardware(RUN, Some(3), None).unwrap_err().to_string();
        assert!(
            err.contains("boot-timer") && err.contains("Some(3)"),
            "{err}"
        );
    }

    #[test]
    fn exit_report_parses() {
        assert_eq!(
            exit_report("x\nhearth-init: exited code=143 reason=signal\n"),
            Some(ExitReport {
                code: 143,
                reason: "signal".into()
            })
        );
        assert_eq!(exit_report("hearth-init: exited code=x\n"), None);
        assert_eq!(exit_report("nothing\n"), None);
    }
}
