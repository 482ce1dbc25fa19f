//! `cargo xtask install` / `uninstall` (issue 9).

/// Options of `cargo xtask install`.
#[derive(clap::Args)]
pub struct InstallArgs {}

/// Options of `cargo xtask uninstall`.
#[derive(clap::Args)]
pub struct UninstallArgs {
    /// Also remove state and configuration.
    #[arg(long)]
    pub purge: bool,
}

/// Installs Hearth.
pub fn install(_args: &InstallArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask install` is not built yet (issue 9)")
}

/// Removes what install put there.
pub fn uninstall(_args: &UninstallArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask uninstall` is not built yet (issue 9)")
}
