//! `cargo xtask bench vmm` (issue 3).

/// Options of `cargo xtask bench vmm`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask bench vmm` is not built yet (issue 3)")
}
