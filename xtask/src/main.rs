//! `cargo xtask …`: Hearth's project tasks.
//!
//! Every task that builds or runs anything calls [`setup`] first, so a fresh machine needs no
//! other step. Unknown subcommands and flags print usage and exit 2 (clap's convention).

mod bench;
mod demo;
mod e2e;
mod install;
mod kernel;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Hearth's project tasks.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about,
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (apt packages, rustup pieces,
    /// bpf-linker, cargo-fuzz); idempotent.
    Setup(setup::Args),
    /// Set up, then run the main job end to end and say what happened.
    Demo(demo::Args),
    /// Set up, then run formatting and lint checks, every test, and the fuzz smoke runs.
    Test(test::Args),
    /// Benchmarks, each against a baseline measured in the same run.
    Bench(bench::Args),
    /// Build the guest kernel from Debian's linux-source-6.12 and images/kernel's config fragment.
    Kernel(kernel::Args),
    /// Boot the real guest kernel with hearth-init (hardware KVM, or --tcg under qemu).
    E2e(e2e::Args),
    /// Install Hearth on this host.
    Install(install::InstallArgs),
    /// Remove what `install` put on this host.
    Uninstall(install::UninstallArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup(args) => setup::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Kernel(args) => kernel::run(&args).map(|_| ()),
        Task::E2e(args) => e2e::run(&args),
        Task::Install(args) => install::install(&args),
        Task::Uninstall(args) => install::uninstall(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
