//! The life of an instance, from the first connection to the exit report.
//!
//! 1. Reach the agent (or read the standalone spec) and wait for the spec (a warm-pool member
//!    waits for `assign`, and assembles the root its `Welcome` names meanwhile). The first
//!    connection writes the boot timer in a microVM.
//! 2. Prepare the instance ([`crate::instance`]); a failure is an `InitError` (fatal) and
//!    `Exited{reason: INIT_ERROR}`.
//! 3. Spawn the workload, report `Started`, poll readiness (`Ready`, or a non-fatal
//!    `InitError{READINESS_TIMEOUT}`), send metrics, obey `Signal`, `Stop`, `Exec`; SIGTERM or
//!    SIGINT to init (Ctrl-Alt-Del in a microVM) is a stop with the spec's default grace.
//! 4. When the workload ends: kill what is left, drain its output, report `Exited` with the
//!    exit code and reason (`oom` when the OOM killer did it), deliver everything, return the
//!    exit code (`main` then syncs and reboots or exits).

use std::{sync::Arc, time::Duration};

use hearth_proto::init::{
    ExitReason, Exited, InitError, InitErrorKind, InstanceSpec, LogStream, Ready, Started,
    guest_message::Msg,
};
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::Instant,
};

use crate::{
    bootstrap::{Bootstrap, Mode, Transport},
    console,
    instance::{self, INIT_ERROR_EXIT_CODE, PrepareError},
    link::{self, Dial, HostEvent, LinkHandle},
    logs::LogBuffer,
    metrics,
    outbox::{Outbox, now_nanos},
    readiness,
    reaper::{Exit, Reaper},
    spec::{self, defaults},
    sys::devmem,
    workload::{self, exec},
};

/// Exit code when init itself cannot run (no runtime, no link).
pub const INTERNAL_EXIT_CODE: i32 = 70;

fn kind_name(kind: InitErrorKind) -> &'static str {
    match kind {
        InitErrorKind::Unspecified => "unspecified",
        InitErrorKind::BadSpec => "bad_spec",
        InitErrorKind::UnknownUser => "unknown_user",
        InitErrorKind::Rootfs => "rootfs",
        InitErrorKind::Network => "network",
        InitErrorKind::Spawn => "spawn",
        InitErrorKind::ReadinessTimeout => "readiness_timeout",
        InitErrorKind::Protocol => "protocol",
        InitErrorKind::Internal => "internal",
    }
}

fn reason_name(reason: ExitReason) -> &'static str {
    match reason {
        ExitReason::Unspecified => "unspecified",
        ExitReason::Exit => "exit",
        ExitReason::Signal => "signal",
        ExitReason::Oom => "oom",
        ExitReason::InitError => "init_error",
    }
}

struct Run {
    mode: Mode,
    outbox: Arc<Outbox>,
    link: LinkHandle,
    link_task: tokio::task::JoinHandle<()>,
    events: mpsc::UnboundedReceiver<HostEvent>,
    reaper: Reaper,
}

fn write_boot_timer(addr: Option<u64>) {
    if let Some(addr) = addr {
        match devmem::write_u8(addr, 123) {
            Ok(()) => tracing::debug!("boot timer written at {addr:#x}"),
            Err(e) => tracing::warn!("Cannot write the boot timer at {addr:#x}: {e}"),
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Runs the instance; returns init's exit code (the workload's, or an init error's).
pub async fn run(boot: Bootstrap, t0: std::time::Instant) -> i32 {
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            console::say(&format!("cannot watch children: {e}"));
            return INTERNAL_EXIT_CODE;
        }
    };
    let outbox = Outbox::new(LogBuffer::default());
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();

    // 1. The link and the spec (and a warm-pool member's root, assembled ahead of it).
    let mut ahead = None;
    let (link, link_task, events, spec) = match &boot.transport {
        Transport::Standalone { spec: path } => {
            let (link, task) = link::start_console(outbox.clone());
            let (_tx, events) = mpsc::unbounded_channel();
            let spec = std::fs::read(path)
                .map_err(|e| {
                    PrepareError::new(
                        InitErrorKind::BadSpec,
                        &spec::SpecError::Standalone {
                            path: path.display().to_string(),
                            why: e.to_string(),
                        },
                    )
                })
                .and_then(|json| {
                    spec::parse_standalone(&path.display().to_string(), &json)
                        .map_err(|e| PrepareError::new(InitErrorKind::BadSpec, &e))
                });
            write_boot_timer(boot.boot_timer);
            (link, task, events, spec)
        }
        transport => {
            let dial = match Dial::new(transport) {
                Ok(d) => d,
                Err(e) => {
                    console::say(&format!("cannot reach the agent: {e}"));
                    return INTERNAL_EXIT_CODE;
                }
            };
            let (link, mut events, task) =
                link::start(dial, outbox.clone(), boot.instance_id.clone(), boot_id());
            let spec = loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(HostEvent::Connected { first }) => {
                            if first {
                                write_boot_timer(boot.boot_timer);
                                console::say("connected to the agent");
                            }
                        }
                        Some(HostEvent::Spec(spec)) => break Ok(*spec),
                        Some(HostEvent::Root(root)) => {
                            if ahead.is_none() {
                                // A member that cannot mount its root is of no use: it
                                // reports why and ends, and the pool replaces it.
                                match instance::prepare_root(&root, boot.mode) {
                                    Ok(p) => ahead = Some(p),
                                    Err(e) => break Err(e),
                                }
                            }
                        }
                        Some(HostEvent::Rejected(reason)) => {
                            console::say(&format!("rejected by the agent: {reason}"));
                            return INTERNAL_EXIT_CODE;
                        }
                        Some(other) => tracing::warn!("Ignoring {other:?} before the spec"),
                        None => return INTERNAL_EXIT_CODE,
                    },
                    _ = recv(&mut term) => return 0,
                    _ = recv(&mut int) => return 0,
                }
            };
            (link, task, events, spec)
        }
    };
    let run = Run {
        mode: boot.mode,
        outbox,
        link,
        link_task,
        events,
        reaper,
    };
    let spec = match spec {
        Ok(s) => s,
        Err(e) => return run.fail(e).await,
    };
    run.link.set_spec(&spec.instance_id);
    tracing::info!(instance = %spec.instance_id, "got the spec");

    // 2. Prepare.
    let prepared = match instance::prepare(&spec, run.mode, ahead).await {
        Ok(p) => p,
        Err(e) => return run.fail(e).await,
    };

    // 3. Spawn and supervise.
    run.supervise(&spec, prepared, t0, term, int).await
}

async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// A stop in progress.
struct Stopping {
    deadline: Instant,
    killed: bool,
}

impl Run {
    /// Reports a fatal error before the workload ran, delivers it, returns the exit code.
    async fn fail(self, e: PrepareError) -> i32 {
        console::say(&format!(
            "init_error kind={} fatal=true: {}",
            kind_name(e.kind),
            e.message
        ));
        self.outbox.send(Msg::InitError(InitError {
            kind: e.kind as i32,
            message: e.message,
            port: 0,
            fatal: true,
        }));
        self.exit(Exited {
            exit_code: e.exit_code,
            reason: ExitReason::InitError as i32,
            at_unix_nanos: now_nanos(),
            ..Default::default()
        })
        .await
    }

    /// Sends `Exited`, delivers everything, returns the exit code.
    async fn exit(self, exited: Exited) -> i32 {
        let code = exited.exit_code;
        console::say(&format!(
            "exited code={code} reason={}",
            reason_name(ExitReason::try_from(exited.reason).unwrap_or(ExitReason::Unspecified))
        ));
        self.outbox.send_after_logs(Msg::Exited(exited));
        self.link.finish();
        if tokio::time::timeout(defaults::EXIT_LINGER, self.link_task)
            .await
            .is_err()
        {
            tracing::warn!(
                "Could not deliver everything to the agent within {:?}",
                defaults::EXIT_LINGER
            );
        }
        code
    }

    async fn supervise(
        mut self,
        spec: &InstanceSpec,
        prepared: instance::Prepared,
        t0: std::time::Instant,
        mut term: Option<tokio::signal::unix::Signal>,
        mut int: Option<tokio::signal::unix::Signal>,
    ) -> i32 {
        if self.mode == Mode::Vm {
            // Ctrl-Alt-Del now sends SIGINT to init instead of rebooting: a stop request.
            if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
                tracing::warn!("Cannot disable Ctrl-Alt-Del: {e}");
            }
        }
        let spawned = match workload::spawn(&prepared.template, &prepared.argv) {
            Ok(s) => s,
            Err(e) => {
                let mut err = PrepareError::new(InitErrorKind::Spawn, &e);
                err.exit_code = e.exit_code();
                return self.fail(err).await;
            }
        };
        let pid = spawned.pid;
        let mut exited = self.reaper.watch(pid);
        let spawned_at = Instant::now();
        let pumps = [
            tokio::spawn(workload::pump(
                spawned.stdout,
                LogStream::Stdout,
                self.outbox.clone(),
            )),
            tokio::spawn(workload::pump(
                spawned.stderr,
                LogStream::Stderr,
                self.outbox.clone(),
            )),
        ];
        let started = Started {
            pid,
            at_unix_nanos: now_nanos(),
            init_to_spawn_micros: u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        self.link.remember(Msg::Started(started));
        self.outbox.send(Msg::Started(started));
        console::say(&format!("started pid={pid}"));

        let ports = spec::readiness_ports(spec);
        let timeout = spec::readiness_timeout(spec);
        let address = prepared.address;
        let mut readiness =
            tokio::spawn(async move { readiness::wait(&ports, address, timeout).await });
        let mut readiness_done = false;
        let mut metrics_tick = tokio::time::interval(spec::metrics_interval(spec));
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (default_signal, default_grace) = spec::default_stop(spec);
        let mut stopping: Option<Stopping> = None;
        let mut requested = false;
        let pgid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        let mut events_open = true;

        let exit = loop {
            let stop_at = stopping.as_ref().filter(|s| !s.killed).map(|s| s.deadline);
            tokio::select! {
                e = &mut exited => match e {
                    Ok(exit) => break exit,
                    Err(_) => break Exit::Code(INIT_ERROR_EXIT_CODE),
                },
                ev = self.events.recv(), if events_open => match ev {
                    None => events_open = false,
                    Some(HostEvent::Signal(n)) => match Signal::try_from(n) {
                        Ok(sig) => {
                            if let Err(e) = killpg(pgid, sig) {
                                tracing::warn!("Cannot send {sig} to the workload: {e}");
                            }
                        }
                        Err(_) => tracing::warn!("Ignoring invalid signal {n}"),
                    },
                    Some(HostEvent::Stop { signal, grace }) => {
                        requested = true;
                        let signal = if signal == 0 { default_signal } else { signal };
                        self.stop(pgid, signal, grace, &mut stopping);
                    }
                    Some(HostEvent::Exec(req)) => {
                        let template = prepared.template.clone();
                        let reaper = self.reaper.clone();
                        let outbox = self.outbox.clone();
                        tokio::spawn(async move {
                            let result = exec::run(req, &template, &reaper).await;
                            outbox.send(Msg::ExecResult(result));
                        });
                    }
                    Some(HostEvent::Connected { .. }) => console::say("reconnected to the agent"),
                    Some(HostEvent::Spec(_)) => tracing::warn!("Ignoring a spec while running"),
                    Some(HostEvent::Root(_)) => tracing::warn!("Ignoring a root while running"),
                    Some(HostEvent::Rejected(reason)) => {
                        // The agent no longer knows this instance: nothing to run it for.
                        console::say(&format!("rejected by the agent: {reason}"));
                        requested = true;
                        self.stop(pgid, libc::SIGKILL, Duration::ZERO, &mut stopping);
                    }
                },
                r = &mut readiness, if !readiness_done => {
                    readiness_done = true;
                    match r {
                        Ok(Ok(_)) => {
                            let took = spawned_at.elapsed();
                            let ready = Ready {
                                at_unix_nanos: now_nanos(),
                                spawn_to_ready_micros: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                            };
                            self.link.remember(Msg::Ready(ready));
                            self.outbox.send(Msg::Ready(ready));
                            console::say(&format!("ready after {} ms", took.as_millis()));
                        }
                        Ok(Err(port)) => {
                            let message = format!("Port {port} did not accept connections within {timeout:?}");
                            console::say(&format!("init_error kind=readiness_timeout fatal=false: {message}"));
                            self.outbox.send(Msg::InitError(InitError {
                                kind: InitErrorKind::ReadinessTimeout as i32,
                                message,
                                port: u32::from(port),
                                fatal: false,
                            }));
                        }
                        Err(e) => tracing::error!("Readiness check failed: {e}"),
                    }
                }
                _ = metrics_tick.tick() => {
                    self.outbox.metrics(metrics::sample(&prepared.cgroups, prepared.scratch.as_ref()));
                }
                _ = recv(&mut term) => {
                    requested = true;
                    self.stop(pgid, default_signal, default_grace, &mut stopping);
                }
                _ = recv(&mut int) => {
                    requested = true;
                    self.stop(pgid, default_signal, default_grace, &mut stopping);
                }
                () = sleep_until(stop_at) => {
                    if let Some(s) = stopping.as_mut() {
                        s.killed = true;
                    }
                    console::say("grace period over: sending SIGKILL");
                    self.outbox.log(LogStream::Init, b"grace period over: sending SIGKILL".to_vec(), false);
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
            }
        };
        readiness.abort();

        // 4. The workload is gone: end what it left behind, so its output pipes close.
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        for pump in pumps {
            if tokio::time::timeout(defaults::DRAIN_WAIT, pump)
                .await
                .is_err()
            {
                tracing::warn!(
                    "The workload's output did not close within {:?}",
                    defaults::DRAIN_WAIT
                );
            }
        }
        let oom = prepared.cgroups.oom_kills() > 0
            && matches!(exit, Exit::Signal(libc::SIGKILL) | Exit::Code(137));
        let (reason, signal) = match exit {
            _ if oom => (ExitReason::Oom, libc::SIGKILL),
            Exit::Signal(s) => (ExitReason::Signal, s),
            Exit::Code(_) => (ExitReason::Exit, 0),
        };
        // Final usage, so the last sample includes the end.
        self.outbox.metrics(metrics::sample(
            &prepared.cgroups,
            prepared.scratch.as_ref(),
        ));
        let killed_after_grace = stopping.is_some_and(|s| s.killed);
        self.exit(Exited {
            exit_code: exit.code(),
            reason: reason as i32,
            signal,
            at_unix_nanos: now_nanos(),
            requested,
            killed_after_grace,
        })
        .await
    }

    fn stop(&self, pgid: Pid, signal: i32, grace: Duration, stopping: &mut Option<Stopping>) {
        let sig = Signal::try_from(signal).unwrap_or(Signal::SIGTERM);
        console::say(&format!(
            "stopping: signal={} grace_ms={}",
            sig as i32,
            grace.as_millis()
        ));
        if let Err(e) = killpg(pgid, sig) {
            tracing::warn!("Cannot send {sig} to the workload: {e}");
        }
        let deadline = Instant::now() + grace;
        match stopping {
            // A second stop can only shorten the grace.
            Some(s) if !s.killed => s.deadline = s.deadline.min(deadline),
            Some(_) => {}
            None => {
                *stopping = Some(Stopping {
                    deadline,
                    killed: false,
                })
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
