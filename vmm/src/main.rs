//! `hearth-vmm`: runs one microVM. See `docs/vmm.md` and `--help`.

use std::path::PathBuf;

use clap::Parser;
use hearth_vmm::{
    builder::{self, Cleanup},
    config::{self, Overrides, SerialOutput, VmConfig},
    exit::{EXIT_CODES_HELP, EXIT_USAGE, EXIT_VMM_ERROR},
    metrics::process_start,
};

/// Runs one microVM: boots a Linux kernel (vmlinux ELF or bzImage) with virtio-mmio disks, a
/// network device on a TAP, a vsock device bridged to Unix sockets, a serial console and a
/// control socket. Flags override the config file.
#[derive(Parser, Debug)]
#[command(name = "hearth-vmm", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    /// TOML config file (unknown keys are refused).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel: vmlinux ELF or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: "console=ttyS0 reboot=k panic=1 pci=off"; the VMM appends
    /// the virtio-mmio device declarations).
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// vCPUs (1 to 32; default 1).
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB (default 128).
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// A disk: path=PATH[,ro][,id=ID][,engine=io_uring|sync] (repeatable; replaces the config
    /// file's disks).
    #[arg(long, value_name = "SPEC", value_parser = config::parse_disk)]
    disk: Vec<config::DiskConfig>,
    /// The network device: tap=NAME[,mac=aa:bb:cc:dd:ee:ff] (the TAP must exist).
    #[arg(long, value_name = "SPEC", value_parser = config::parse_net)]
    net: Option<config::NetConfig>,
    /// The vsock device: [cid=N,]uds=PATH (guest CID default 3).
    #[arg(long, value_name = "SPEC", value_parser = config::parse_vsock)]
    vsock: Option<config::VsockConfig>,
    /// Serial output: stdout (default), none, ring, or file:PATH.
    #[arg(long, value_name = "OUTPUT", value_parser = |s: &str| s.parse::<SerialOutput>())]
    serial: Option<SerialOutput>,
    /// Bytes the serial ring keeps (default 65536).
    #[arg(long, value_name = "BYTES")]
    serial_ring_bytes: Option<usize>,
    /// Control socket path.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Seccomp filters: on (default) or off.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    seccomp: Option<bool>,
    /// Log level for the VMM's own messages on stderr (error, warn, info, debug, trace).
    #[arg(long, default_value = "warn", env = "HEARTH_VMM_LOG")]
    log_level: tracing::Level,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("expected on or off, not {s:?}")),
    }
}

fn main() {
    // The boot timer measures from here.
    process_start();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_target(false)
        .init();

    let flags = Overrides {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        vcpus: cli.vcpus,
        memory_mib: cli.memory_mib,
        disks: cli.disk,
        net: cli.net,
        vsock: cli.vsock,
        serial: cli.serial,
        serial_ring_bytes: cli.serial_ring_bytes,
        control_socket: cli.control_socket,
        seccomp: cli.seccomp,
    };
    let config = match VmConfig::load(cli.config.as_deref(), flags) {
        Ok(c) => c,
        Err(e) => fail(&e, &mut Cleanup::default()),
    };
    let mut cleanup = Cleanup::default();
    let vmm = match builder::build(config, &mut cleanup) {
        Ok(v) => v,
        Err(e) => fail(&e, &mut cleanup),
    };
    match vmm.run() {
        Ok(reason) => {
            tracing::info!("VM ended: {reason}");
            if let hearth_vmm::exit::ExitReason::GuestError(e)
            | hearth_vmm::exit::ExitReason::VmmError(e) = &reason
            {
                eprintln!("hearth-vmm: {e}");
            }
            cleanup.run(true);
            std::process::exit(reason.code());
        }
        Err(e) => fail(&e, &mut cleanup),
    }
}

/// Prints the error chain on one line, removes what the VMM created, exits 1.
fn fail(e: &dyn std::error::Error, cleanup: &mut Cleanup) -> ! {
    let mut line = format!("hearth-vmm: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{line}");
    cleanup.run(false);
    std::process::exit(EXIT_VMM_ERROR);
}
