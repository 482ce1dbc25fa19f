//! `cargo xtask bench …`: each benchmark measures Hearth and a named baseline in the same run
//! and prints the ratio; `--json` prints one JSON object instead of the table.

mod cold_start;
mod ebpf;
mod images;
mod init;
pub mod stats;
mod vmm;

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// hearth-vmm: process start to first guest instruction and to exit, VMM memory overhead;
    /// baseline: qemu -M microvm -enable-kvm.
    Vmm(vmm::Args),
    /// hearth-init: exec to Ready for busybox httpd in the sandbox; baseline: runc run.
    Init(init::Args),
    /// Image pull + unpack + rootfs image; baseline: skopeo copy + umoci unpack + mkfs.
    Images(images::Args),
    /// Throughput and latency through a veth pair with and without the eBPF programs.
    Ebpf(ebpf::Args),
    /// StartInstance to first HTTP response, cold and warm; baseline: runc run.
    ColdStart(cold_start::Args),
}

/// Runs the chosen benchmark (after setup).
pub fn run(args: &Args) -> anyhow::Result<()> {
    crate::setup::run(&crate::setup::Args { check: false })?;
    match &args.which {
        Which::Vmm(a) => vmm::run(a),
        Which::Init(a) => init::run(a),
        Which::Images(a) => images::run(a),
        Which::Ebpf(a) => ebpf::run(a),
        Which::ColdStart(a) => cold_start::run(a),
    }
}
