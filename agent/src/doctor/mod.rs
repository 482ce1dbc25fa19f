//! `hearth-agent doctor`: the preflight check of a host. It reads the host (KVM and the kind
//! of virtualization behind it, kernel version, BTF, a real TCX attach, cgroups, `/dev/net/tun`,
//! loop devices, bpffs, free disk for the image cache, the files the config names, the service
//! manager, the control socket's group) and says, for each check that is not ok, what to do.
//! `cargo xtask install` runs it after installing; `docs/install.md` lists the checks.
//!
//! # Layout
//!
//! - [`facts`]: reading the host into plain data ([`Facts`]).
//! - [`checks`]: judging the facts against the config (pure; every kind of host is a unit test).
//! - `sys`: the active probes (the KVM API ioctl, the TCX attach in a throwaway namespace).
//! - this file: [`Check`], [`Report`], its text and JSON forms, and [`cli`].

pub mod checks;
pub mod facts;
mod sys;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

pub use facts::Facts;

use crate::config::{Config, ConfigError, RuntimeKind};

/// The config the installed service uses; the doctor reads it when no `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/hearth/agent.toml";
/// The group whose members may use the control socket.
pub const SOCKET_GROUP: &str = "hearth";

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but something is worth fixing.
    Warn,
    /// The agent cannot work (with this config) until it is fixed.
    Fail,
    /// Not applicable to this config, or could not be checked.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short name (`kvm`, `virtualization`, `kernel`, `btf`, `tcx`, `cgroups`, ...).
    pub name: &'static str,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub message: String,
    /// What to do about it (for warnings and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Every check for one config on this host.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The config file read, if any (else the built-in defaults).
    pub config: Option<PathBuf>,
    /// The runtime the checks were judged for.
    pub runtime: RuntimeKind,
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// What the checks were judged on.
    pub facts: Facts,
}

impl Report {
    /// Reads this host and judges it for `cfg`.
    pub fn run(cfg: &Config, config: Option<PathBuf>) -> Report {
        let facts = facts::gather(cfg);
        Report {
            config,
            runtime: cfg.runtime,
            checks: checks::evaluate(cfg, &facts),
            facts,
        }
    }

    /// How many checks came out `status`.
    pub fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// Whether no check failed.
    pub fn passed(&self) -> bool {
        self.count(Status::Fail) == 0
    }

    /// The human form: a header, one line per check (with a `fix:` line under each that is
    /// not ok), and a summary.
    pub fn render(&self) -> String {
        let mut s = format!(
            "hearth-agent doctor: config {}, runtime {}\n",
            self.config
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(built-in defaults)".into()),
            self.runtime.as_str()
        );
        for c in &self.checks {
            s.push_str(&format!(
                "{:<5} {:<15} {}\n",
                c.status.label(),
                c.name,
                c.message
            ));
            if let Some(fix) = &c.fix {
                s.push_str(&format!("{:<21} fix: {fix}\n", ""));
            }
        }
        s.push_str(&format!(
            "{} ok, {} warnings, {} failed, {} skipped\n",
            self.count(Status::Ok),
            self.count(Status::Warn),
            self.count(Status::Fail),
            self.count(Status::Skip)
        ));
        s
    }
}

/// Why `hearth-agent doctor` did not pass.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// The config could not be read.
    #[error("Cannot check the host")]
    Config(#[from] ConfigError),
    /// Some checks failed (the report says which).
    #[error("{0} check(s) failed")]
    Failed(usize),
}

/// `hearth-agent [--config FILE] [--runtime R] doctor [--json]`: loads `config` (or
/// [`DEFAULT_CONFIG`] when it exists, else the defaults), applies `runtime`, prints the report
/// on stdout, and fails when a check failed.
pub fn cli(
    config: Option<&Path>,
    runtime: Option<RuntimeKind>,
    json: bool,
) -> Result<(), DoctorError> {
    let path = config
        .map(Path::to_owned)
        .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.is_file()));
    let mut cfg = match &path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(r) = runtime {
        cfg.runtime = r;
    }
    let report = Report::run(&cfg, path);
    let text = if json {
        serde_json::to_string_pretty(&report).expect("the report serializes") + "\n"
    } else {
        report.render()
    };
    // A closed stdout (`| head`) is not the host's fault.
    let _ = std::io::stdout().write_all(text.as_bytes());
    match report.count(Status::Fail) {
        0 => Ok(()),
        n => Err(DoctorError::Failed(n)),
    }
}
