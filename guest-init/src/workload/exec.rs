//! One-off commands run inside the instance on the agent's request (`Exec` → `ExecResult`),
//! like Cloudflare's `exec`: same environment, user, limits and cgroup as the workload unless
//! the request overrides them; output captured up to a cap; killed at the timeout.

use std::{os::fd::OwnedFd, process::Stdio, time::Duration};

use hearth_proto::init::{Exec, ExecResult};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{ProcessTemplate, user};
use crate::{reaper::Reaper, spec::defaults, sys::child::ChildIdentity};

/// Reads a pipe to its end (or until `until` fires), keeping at most `cap` bytes.
async fn collect(fd: Option<OwnedFd>, cap: usize) -> Vec<u8> {
    let Some(fd) = fd else {
        return Vec::new();
    };
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                let room = cap.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn failed(request_id: u64, error: String) -> ExecResult {
    ExecResult {
        request_id,
        exit_code: -1,
        error,
        ..Default::default()
    }
}

/// Runs `req` and reports its result (never fails: errors are in `ExecResult.error`).
pub async fn run(req: Exec, template: &ProcessTemplate, reaper: &Reaper) -> ExecResult {
    let id = req.request_id;
    if req.argv.first().is_none_or(String::is_empty) {
        return failed(id, "Exec has no command".into());
    }
    let mut t = template.clone();
    if !req.user.is_empty() {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        match user::resolve(&req.user, &read("/etc/passwd"), &read("/etc/group")) {
            Ok(identity) => {
                t.setup.identity = Some(ChildIdentity {
                    uid: identity.uid,
                    gid: identity.gid,
                    groups: identity.groups,
                });
                if let Some(home) = t.env.iter_mut().find(|(k, _)| k == "HOME") {
                    home.1 = identity.home;
                }
            }
            Err(e) => return failed(id, e.to_string()),
        }
    }
    if !req.working_dir.is_empty() {
        t.cwd = req.working_dir.clone().into();
    }
    let extra: Vec<(String, String)> = req
        .env
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let (mut cmd, program) = match t.command(&req.argv, &extra) {
        Ok(c) => c,
        Err(e) => return failed(id, e.to_string()),
    };
    cmd.stdin(if req.stdin.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(id, format!("Cannot start {}: {e}", program.display())),
    };
    let pid = child.id();
    let exited = reaper.watch(pid);
    if let Some(stdin) = child.stdin.take() {
        let data = req.stdin;
        if let Ok(mut w) = tokio::net::unix::pipe::Sender::from_owned_fd(stdin.into()) {
            tokio::spawn(async move {
                // The command may not read it all; that is its business.
                let _ = w.write_all(&data).await;
            });
        }
    }
    let stdout = tokio::spawn(collect(
        child.stdout.take().map(OwnedFd::from),
        defaults::EXEC_OUTPUT_MAX,
    ));
    let stderr = tokio::spawn(collect(
        child.stderr.take().map(OwnedFd::from),
        defaults::EXEC_OUTPUT_MAX,
    ));
    let timeout = match req.timeout_millis {
        0 => defaults::EXEC_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    let mut timed_out = false;
    tokio::pin!(exited);
    let exit = tokio::select! {
        e = &mut exited => e,
        () = tokio::time::sleep(timeout) => {
            timed_out = true;
            // The command leads its own process group: take all of it.
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            exited.await
        }
    };
    // Background processes may hold the pipes open: do not wait for them for long.
    let grab = |h: tokio::task::JoinHandle<Vec<u8>>| async move {
        tokio::time::timeout(defaults::DRAIN_WAIT, h)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    let (stdout, stderr) = (grab(stdout).await, grab(stderr).await);
    match exit {
        Ok(exit) => ExecResult {
            request_id: id,
            exit_code: if timed_out { -1 } else { exit.code() },
            stdout,
            stderr,
            error: if timed_out {
                format!("Timed out after {timeout:?}")
            } else {
                String::new()
            },
            timed_out,
        },
        Err(_) => failed(id, "Lost track of the command".into()),
    }
}
