//! `cargo xtask bench init` (issue 4).

/// Options of `cargo xtask bench init`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask bench init` is not built yet (issue 4)")
}
