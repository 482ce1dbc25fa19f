//! `hearth-agent`: the node daemon.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Hearth's node agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the embedded eBPF programs into the kernel and report what was loaded (needs root).
    EbpfCheck,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::EbpfCheck => {
            let ebpf = hearth_agent::ebpf::load().context("eBPF check failed")?;
            let mut names: Vec<_> = ebpf.programs().map(|(name, _)| name.to_owned()).collect();
            names.sort();
            println!(
                "eBPF object: {} bytes, programs loaded: {}",
                hearth_agent::ebpf::OBJECT.len(),
                names.join(", ")
            );
            Ok(())
        }
    }
}
