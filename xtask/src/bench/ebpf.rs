//! `cargo xtask bench ebpf` (issue 6).

/// Options of `cargo xtask bench ebpf`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask bench ebpf` is not built yet (issue 6)")
}
