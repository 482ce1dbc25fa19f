//! `hearth-agent`: the node daemon.
//!
//! `hearth-agent [--config FILE] [overrides]` runs the agent until SIGTERM/SIGINT;
//! `hearth-agent print-defaults` prints the default config; `hearth-agent ebpf-check` loads
//! the embedded eBPF programs and reports them; `hearth-agent doctor` checks that the host can
//! run the agent (see `docs/install.md`).

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hearth_agent::{
    config::{Config, DEFAULTS_TOML, RuntimeKind},
    daemon::{Daemon, Listeners},
    images::HearthImages,
};

/// Hearth's node agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The config file (TOML); without it the embedded defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides `runtime` (microvm or sandbox).
    #[arg(long)]
    runtime: Option<RuntimeKind>,
    /// Overrides `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Overrides `run_dir`.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Overrides `api.socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Overrides `metrics.listen` ("" turns the endpoint off).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Overrides `sandbox.init_path`.
    #[arg(long)]
    init_path: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the default configuration (every key, with comments).
    PrintDefaults,
    /// Print the effective configuration (file + overrides) and exit.
    PrintConfig,
    /// Load the embedded eBPF programs into the kernel and report what was loaded (needs root).
    EbpfCheck,
    /// Check that this host can run the agent (KVM, kernel, BTF, TCX, cgroups, TUN, bpffs,
    /// disk, ...) and say how to fix what is missing. Reads /etc/hearth/agent.toml when no
    /// --config is given; exits 1 when a check failed.
    Doctor {
        /// Print the checks (and the facts behind them) as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(r) = cli.runtime {
        cfg.runtime = r;
    }
    if let Some(d) = &cli.state_dir {
        cfg.state_dir = d.clone();
    }
    if let Some(d) = &cli.run_dir {
        cfg.run_dir = d.clone();
    }
    if let Some(s) = &cli.socket {
        cfg.api.socket = s.clone();
    }
    if let Some(m) = &cli.metrics_listen {
        cfg.metrics.listen = m.clone();
    }
    if let Some(p) = &cli.init_path {
        cfg.sandbox.init_path = p.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let images = Arc::new(HearthImages::open(&cfg).context("Cannot open the image cache")?);
    let listeners = Listeners::bind(&cfg).await?;
    let socket = cfg.api.socket.clone();
    let daemon = Daemon::start(cfg, images, listeners).await?;
    let node = daemon.node.info()?;
    tracing::info!(
        socket = %socket.display(),
        runtime = %node.runtime,
        instances = node.instances,
        running = node.instances_running,
        "hearth-agent ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining the API"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining the API"),
    }
    daemon.shutdown().await;
    tracing::info!("hearth-agent stopped");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        sub.json().init();
    } else {
        sub.init();
    }
    let result = match cli.command {
        Some(Command::PrintDefaults) => {
            print!("{DEFAULTS_TOML}");
            Ok(())
        }
        Some(Command::PrintConfig) => config(&cli).map(|c| print!("{}", c.to_toml())),
        Some(Command::EbpfCheck) => ebpf_check(),
        Some(Command::Doctor { json }) => {
            hearth_agent::doctor::cli(cli.config.as_deref(), cli.runtime, json).map_err(Into::into)
        }
        None => config(&cli).and_then(|cfg| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("Cannot start the async runtime")?
                .block_on(run(cfg))
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn ebpf_check() -> anyhow::Result<()> {
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
