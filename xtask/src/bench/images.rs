//! `cargo xtask bench images` (issue 5).

/// Options of `cargo xtask bench images`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask bench images` is not built yet (issue 5)")
}
