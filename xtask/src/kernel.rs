//! `cargo xtask kernel`: builds the guest kernel (issue 3).

use std::path::PathBuf;

/// Options of `cargo xtask kernel`.
#[derive(clap::Args)]
pub struct Args {
    /// Rebuild even when a kernel for the current config fragment is cached.
    #[arg(long)]
    pub force: bool,
}

/// Builds (or finds cached) and returns the kernel image path.
pub fn run(_args: &Args) -> anyhow::Result<PathBuf> {
    anyhow::bail!("`cargo xtask kernel` is not built yet (issue 3)")
}
