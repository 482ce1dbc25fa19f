//! The workload process: its command line, environment, user, limits; spawning it (and exec'd
//! commands) with output pipes; turning the output into log records.
//!
//! # Layout
//!
//! - [`user`]: resolving `user[:group]` against the image's `/etc/passwd` and `/etc/group`.
//! - [`rlimit`]: resource limit names.
//! - [`exec`]: one-off commands run on the agent's request.

pub mod exec;
pub mod rlimit;
pub mod user;

use std::{
    collections::BTreeMap,
    io,
    os::{
        fd::OwnedFd,
        unix::{fs::PermissionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use hearth_proto::init::{InstanceSpec, LogStream};
use tokio::io::AsyncReadExt as _;

use crate::{
    logs::{LineSplitter, MAX_RECORD_DATA},
    outbox::Outbox,
    spec::{self, defaults},
    sys::child::{ChildIdentity, ChildSetup},
};

/// Why the workload could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program is not in the image.
    #[error("Executable {program:?} not found (PATH={path})")]
    NotFound {
        /// The program as given.
        program: String,
        /// The PATH searched.
        path: String,
    },
    /// The program exists but cannot be executed.
    #[error("{0} is not executable")]
    NotExecutable(PathBuf),
    /// `fork`/`exec` (or the child's setup) failed.
    #[error("Cannot start {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl SpawnError {
    /// The exit code reported for the failure (shell and container convention).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NotFound { .. } => 127,
            Self::NotExecutable(_) => 126,
            Self::Spawn { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => 127,
                io::ErrorKind::PermissionDenied => 126,
                _ => 125,
            },
        }
    }
}

/// Everything needed to start a process inside the instance as the workload's user.
#[derive(Debug, Clone)]
pub struct ProcessTemplate {
    /// Environment, in order, without duplicates (later spec entries win).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// User, groups, rlimits, cgroup.
    pub setup: ChildSetup,
}

/// The merged environment: the spec's entries (later ones win, first position kept), plus
/// `PATH`, `HOSTNAME` and `HOME` when absent.
pub fn environment(spec: &InstanceSpec, home: &str, hostname: &str) -> Vec<(String, String)> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: &str, overwrite: bool| {
        if !values.contains_key(k) {
            order.push(k.to_owned());
        } else if !overwrite {
            return;
        }
        values.insert(k.to_owned(), v.to_owned());
    };
    for e in &spec.env {
        if let Some((k, v)) = e.split_once('=') {
            set(k, v, true);
        }
    }
    set("PATH", defaults::PATH, false);
    set("HOSTNAME", hostname, false);
    set("HOME", home, false);
    order
        .into_iter()
        .map(|k| {
            let v = values.remove(&k).unwrap_or_default();
            (k, v)
        })
        .collect()
}

impl ProcessTemplate {
    /// The template of the workload of `spec`, running as `identity`.
    pub fn new(
        spec: &InstanceSpec,
        identity: &user::Identity,
        rlimits: Vec<rlimit::Rlimit>,
        cgroup_procs: Vec<Arc<OwnedFd>>,
        hostname: &str,
    ) -> Self {
        Self {
            env: environment(spec, &identity.home, hostname),
            cwd: PathBuf::from(spec::working_dir(spec)),
            setup: ChildSetup {
                cgroup_procs,
                rlimits,
                identity: Some(ChildIdentity {
                    uid: identity.uid,
                    gid: identity.gid,
                    groups: identity.groups.clone(),
                }),
            },
        }
    }

    fn path_var(&self) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or(defaults::PATH, |(_, v)| v.as_str())
    }

    /// Finds `program` the way `execvp` would, relative to the working directory for a
    /// relative path with a `/`.
    pub fn resolve(&self, program: &str) -> Result<PathBuf, SpawnError> {
        let check = |p: &Path| -> Option<Result<PathBuf, SpawnError>> {
            let md = std::fs::metadata(p).ok()?;
            if !md.is_file() {
                return None;
            }
            Some(if md.permissions().mode() & 0o111 == 0 {
                Err(SpawnError::NotExecutable(p.into()))
            } else {
                Ok(p.into())
            })
        };
        if program.contains('/') {
            let p = self.cwd.join(program);
            return check(&p).unwrap_or_else(|| {
                Err(SpawnError::NotFound {
                    program: program.into(),
                    path: self.path_var().into(),
                })
            });
        }
        for dir in self.path_var().split(':').filter(|d| !d.is_empty()) {
            if let Some(found) = check(&Path::new(dir).join(program)) {
                return found;
            }
        }
        Err(SpawnError::NotFound {
            program: program.into(),
            path: self.path_var().into(),
        })
    }

    /// A command for `argv` (non-empty) with this template's environment, directory and setup.
    pub fn command(
        &self,
        argv: &[String],
        extra_env: &[(String, String)],
    ) -> Result<(Command, PathBuf), SpawnError> {
        let program = self.resolve(&argv[0])?;
        let mut cmd = Command::new(&program);
        cmd.arg0(&argv[0]).args(&argv[1..]).env_clear();
        for (k, v) in self.env.iter().chain(extra_env) {
            cmd.env(k, v);
        }
        cmd.current_dir(&self.cwd);
        self.setup.clone().install(&mut cmd);
        Ok((cmd, program))
    }
}

/// A started workload.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid (also its process group and session).
    pub pid: u32,
    /// Its stdout pipe.
    pub stdout: OwnedFd,
    /// Its stderr pipe.
    pub stderr: OwnedFd,
}

/// Starts `argv` with stdin from /dev/null and stdout/stderr into pipes.
pub fn spawn(template: &ProcessTemplate, argv: &[String]) -> Result<Spawned, SpawnError> {
    let (mut cmd, program) = template.command(argv, &[])?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|source| SpawnError::Spawn { program, source })?;
    let pid = child.id();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("both were piped");
    };
    // The child is reaped by the reaper, never through `child`.
    Ok(Spawned {
        pid,
        stdout: stdout.into(),
        stderr: stderr.into(),
    })
}

/// How long an unfinished line waits for its end before it is sent as a partial record.
const PARTIAL_AFTER: Duration = Duration::from_millis(100);

/// Reads one output pipe into log records until end of file.
pub async fn pump(fd: OwnedFd, stream: LogStream, outbox: Arc<Outbox>) {
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("Cannot read the workload's output: {e}");
            return;
        }
    };
    let mut splitter = LineSplitter::new(MAX_RECORD_DATA);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pieces = Vec::new();
    loop {
        let read = if splitter.has_pending() {
            match tokio::time::timeout(PARTIAL_AFTER, pipe.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(p) = splitter.flush(false) {
                        outbox.log(stream, p.data, p.partial);
                    }
                    continue;
                }
            }
        } else {
            pipe.read(&mut buf).await
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                splitter.push(&buf[..n], &mut pieces);
                for p in pieces.drain(..) {
                    outbox.log(stream, p.data, p.partial);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("Reading the workload's output failed: {e}");
                break;
            }
        }
    }
    if let Some(p) = splitter.flush(true) {
        outbox.log(stream, p.data, p.partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_merges_and_defaults() {
        let spec = InstanceSpec {
            env: vec![
                "A=1".into(),
                "PATH=/opt/bin".into(),
                "A=2".into(),
                "B=x=y".into(),
            ],
            ..Default::default()
        };
        let env = environment(&spec, "/home/app", "web");
        assert_eq!(
            env,
            vec![
                ("A".into(), "2".into()),
                ("PATH".into(), "/opt/bin".into()),
                ("B".into(), "x=y".into()),
                ("HOSTNAME".into(), "web".into()),
                ("HOME".into(), "/home/app".into()),
            ]
        );
        let env = environment(&InstanceSpec::default(), "/", "h");
        assert_eq!(env[0], ("PATH".into(), defaults::PATH.into()));
    }

    #[test]
    fn programs_are_found_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(bin.join("data"), "").unwrap();
        let t = ProcessTemplate {
            env: vec![("PATH".into(), format!("/nonexistent:{}", bin.display()))],
            cwd: dir.path().into(),
            setup: ChildSetup::default(),
        };
        assert_eq!(t.resolve("tool").unwrap(), bin.join("tool"));
        assert_eq!(
            t.resolve("./bin/tool").unwrap(),
            dir.path().join("./bin/tool")
        );
        let e = t.resolve("nope").unwrap_err();
        assert_eq!(e.exit_code(), 127);
        let e = t.resolve("bin/data").unwrap_err();
        assert_eq!(e.exit_code(), 126);
    }
}
