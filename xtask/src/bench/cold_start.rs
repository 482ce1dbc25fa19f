//! `cargo xtask bench cold-start` (issue 8).

/// Options of `cargo xtask bench cold-start`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask bench cold-start` is not built yet (issue 8)")
}
