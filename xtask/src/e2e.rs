//! `cargo xtask e2e`: boots the real guest kernel with hearth-init (issue 3).

/// Options of `cargo xtask e2e`.
#[derive(clap::Args)]
pub struct Args {
    /// Boot under qemu's software emulation (TCG) instead of hearth-vmm on hardware KVM.
    #[arg(long)]
    pub tcg: bool,
}

/// Runs the end-to-end boot.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask e2e` is not built yet (issue 3)")
}
