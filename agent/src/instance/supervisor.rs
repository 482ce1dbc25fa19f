//! The per-boot supervisor: one task per running instance that owns its runtime process, its
//! connection to hearth-init and its timers.
//!
//! It accepts init's connections (a reconnect replaces the old one), answers `Hello` with the
//! spec (first connection of a boot) or a resume point (reconnect), turns init's frames into
//! state changes, events, log records and metrics, carries stop/exec requests to init, kills
//! the runtime when a deadline says so, and turns the process's end into `stopped`. When the
//! agent shuts down it detaches and leaves the instance running.

use std::{collections::HashMap, sync::Arc, time::Duration};

use hearth_proto::{
    channel::{ChannelError, HostChannel},
    init::{self, guest_message::Msg as G, host_message::Msg as H},
};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

use super::{Entry, InstanceError, Manager, state_of, timers};
use crate::{
    model::{self, pb},
    runtime::{ExitInfo, Process, RuntimeState},
};

/// How long a new connection has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long init has, after reporting the exit, for its process to end.
const EXIT_MARGIN_MS: i64 = 10_000;
/// Error events one boot may cause (init can send errors; the store must not fill up).
const MAX_ERROR_EVENTS: u32 = 16;
/// How often a moved activity deadline is written to the store.
const PERSIST_INTERVAL_MS: i64 = 5_000;

/// What a boot hands its supervisor besides the runtime.
#[derive(Default)]
pub struct BootExtras {
    /// A claimed warm-pool member's connection (welcomed without a spec).
    pub member_conn: Option<Conn>,
    /// The start in flight, ended when the workload is ready.
    pub guard: Option<super::gate::StartGuard>,
    /// The boot was re-adopted by a restarted agent: its init may hold its spec already (it
    /// then says `Hello{reconnect}`), or not (the agent died before init got it).
    pub adopted: bool,
}

/// A request to the supervisor.
pub enum Cmd {
    /// Stop with a signal and grace.
    Stop {
        /// The signal.
        signal: i32,
        /// The grace.
        grace: Duration,
        /// Why.
        cause: pb::StopCause,
        /// Answered once `stopping` is committed.
        reply: oneshot::Sender<()>,
    },
    /// SIGKILL now; answered once `stopped` is committed.
    Destroy {
        /// The answer.
        reply: oneshot::Sender<()>,
    },
    /// Run a command through init.
    Exec {
        /// The command.
        exec: init::Exec,
        /// The answer.
        reply: oneshot::Sender<Result<init::ExecResult, InstanceError>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The stop grace and the kill margin ran out without an exit report.
    AfterGrace,
    /// Init reported the exit but its process did not end.
    AfterExit,
    /// Init did not connect in time.
    ConnectTimeout,
    /// A stop came before init connected.
    StopBeforeConnect,
    /// DestroyInstance.
    Destroy,
}

type Conn = HostChannel<UnixStream>;

/// One boot's supervisor.
pub struct Supervisor {
    mgr: Arc<Manager>,
    entry: Arc<Entry>,
    listener: Option<UnixListener>,
    process: Process,
    rt: RuntimeState,
    spec: Option<init::InstanceSpec>,
    cmds: mpsc::Receiver<Cmd>,
    shutdown: CancellationToken,
    conn: Option<Conn>,
    connected_once: bool,
    started: bool,
    exited: Option<init::Exited>,
    init_error: Option<(pb::ErrorKind, bool)>,
    error_events: u32,
    stop_signal_pending: Option<(i32, u64)>,
    stop_requested: bool,
    killed: Option<Kill>,
    destroy_waiters: Vec<oneshot::Sender<()>>,
    execs: HashMap<u64, oneshot::Sender<Result<init::ExecResult, InstanceError>>>,
    next_exec: u64,
    deadlines: timers::Deadlines,
    expired_at: Option<i64>,
    stored_activity_deadline: i64,
    boot: u32,
    /// A claimed warm-pool member's connection, welcomed without a spec: `run` assigns the
    /// spec on it first.
    member_conn: Option<Conn>,
    /// Re-adopted after an agent restart (see [`BootExtras::adopted`]).
    adopted: bool,
    /// Held until the workload is ready (background work waits for it).
    start_guard: Option<super::gate::StartGuard>,
    /// When the runtime was up (this supervisor was made) and when init got the spec (Unix
    /// ns), for the `started` event's breakdown.
    runtime_at: i64,
    spec_at: i64,
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mgr: Arc<Manager>,
        entry: Arc<Entry>,
        listener: UnixListener,
        process: Process,
        rt: RuntimeState,
        spec: Option<init::InstanceSpec>,
        cmds: mpsc::Receiver<Cmd>,
        shutdown: CancellationToken,
    ) -> Self {
        let inst = entry.instance();
        let state = state_of(&inst);
        let now = mgr.clock.now();
        let connect_ms = mgr.cfg.lifecycle.init_connect_timeout.as_millis() as i64;
        let mut deadlines = timers::Deadlines {
            connect: Some(now + connect_ms * 1_000_000),
            ..Default::default()
        };
        let stop_requested = state == pb::InstanceState::Stopping;
        if stop_requested && inst.stop_deadline_unix_nanos != 0 {
            deadlines.kill = Some(timers::kill_deadline(
                inst.stop_deadline_unix_nanos,
                mgr.cfg.lifecycle.kill_margin.as_millis() as i64,
            ));
        }
        Self {
            started: matches!(
                state,
                pb::InstanceState::Running
                    | pb::InstanceState::Healthy
                    | pb::InstanceState::Stopping
            ) && inst.started_at_unix_nanos != 0,
            boot: inst.boots,
            stored_activity_deadline: inst.activity_deadline_unix_nanos,
            mgr,
            entry,
            listener: Some(listener),
            process,
            rt,
            spec,
            cmds,
            shutdown,
            conn: None,
            connected_once: false,
            exited: None,
            init_error: None,
            error_events: 0,
            stop_signal_pending: None,
            stop_requested,
            killed: None,
            destroy_waiters: Vec::new(),
            execs: HashMap::new(),
            next_exec: 1,
            deadlines,
            expired_at: None,
            member_conn: None,
            adopted: false,
            start_guard: None,
            runtime_at: now,
            spec_at: 0,
        }
    }

    /// Adds what a new boot brings besides its runtime.
    pub(super) fn with_extras(mut self, extras: BootExtras) -> Self {
        self.member_conn = extras.member_conn;
        self.start_guard = extras.guard;
        self.adopted = extras.adopted;
        self
    }

    fn id(&self) -> &str {
        &self.entry.id
    }

    /// Runs until the boot ends (or the agent shuts down).
    pub async fn run(mut self) {
        let (conn_tx, mut conn_rx) = mpsc::channel::<Conn>(4);
        let listener = self.listener.take().expect("listener present at start");
        let accept = tokio::spawn(accept_loop(listener, conn_tx, self.id().to_owned()));
        if let Some(conn) = self.member_conn.take() {
            self.on_member(conn).await;
        }
        let info = loop {
            self.update_activity_deadline();
            let next = self.deadlines.next();
            let sleep_at = next.map(|(at, _)| self.mgr.clock.instant_at(at));
            tokio::select! {
                info = self.process.wait() => break Some(info),
                Some(cmd) = self.cmds.recv() => self.on_cmd(cmd).await,
                Some(conn) = conn_rx.recv() => self.on_conn(conn).await,
                msg = recv(&mut self.conn) => self.on_frame(msg).await,
                () = sleep_opt(sleep_at) => {
                    if let Some((_, timer)) = next {
                        self.on_timer(timer).await;
                    }
                }
                () = self.entry.activity_changed.notified() => {}
                () = self.shutdown.cancelled() => break None,
            }
        };
        accept.abort();
        match info {
            Some(info) => self.finish(info).await,
            None => {
                // Agent shutdown: leave the instance running, the next agent adopts it.
                self.persist_activity(true);
                tracing::info!(id = %self.entry.id, "detached from a running instance");
            }
        }
    }

    fn sleep_after_ms(&self) -> i64 {
        self.entry
            .instance()
            .spec
            .and_then(|s| s.sleep_after_millis)
            .unwrap_or(0)
    }

    fn update_activity_deadline(&mut self) {
        let state = self.entry.state();
        let counting = matches!(
            state,
            pb::InstanceState::Running | pb::InstanceState::Healthy
        ) && !self.stop_requested;
        self.deadlines.activity = if counting {
            timers::activity_deadline(
                self.entry.last_activity(),
                self.sleep_after_ms(),
                self.expired_at,
            )
        } else {
            None
        };
        let want = self.deadlines.activity.unwrap_or(0);
        if want != 0 && self.stored_activity_deadline == 0 {
            // The first deadline of a boot is stored at once (a restart must find it).
            self.persist_activity(false);
        } else if want != self.stored_activity_deadline && self.deadlines.persist.is_none() {
            self.deadlines.persist = Some(self.mgr.clock.now() + PERSIST_INTERVAL_MS * 1_000_000);
        }
    }

    /// Stores the activity deadline (lazily: a crash may bring the expiry forward by at most
    /// the persist interval, never push it back).
    fn persist_activity(&mut self, force: bool) {
        self.deadlines.persist = None;
        let want = self.deadlines.activity.unwrap_or(0);
        if want == self.stored_activity_deadline && !force {
            return;
        }
        let r = self
            .entry
            .commit(&self.mgr.events, &self.mgr.clock, |i, _| {
                i.activity_deadline_unix_nanos = want;
                vec![]
            });
        match r {
            Ok(_) => self.stored_activity_deadline = want,
            Err(e) => {
                tracing::warn!(id = %self.entry.id, error = %e, "cannot store the activity deadline")
            }
        }
    }

    fn commit(
        &self,
        f: impl FnOnce(&mut pb::Instance, &mut crate::store::Private) -> Vec<pb::event::Kind>,
    ) {
        if let Err(e) = self.entry.commit(&self.mgr.events, &self.mgr.clock, f) {
            tracing::error!(id = %self.entry.id, error = %e, "cannot store an instance change");
        }
    }

    fn error_event(&mut self, kind: pb::ErrorKind, message: String) {
        if self.error_events >= MAX_ERROR_EVENTS {
            return;
        }
        self.error_events += 1;
        self.entry.logs.system(
            self.boot,
            self.mgr.clock.now(),
            &format!("error ({}): {message}", model::error_kind_name(kind)),
        );
        self.commit(|i, _| {
            let error = pb::InstanceError {
                kind: kind as i32,
                message,
            };
            i.error = Some(error.clone());
            vec![pb::event::Kind::Error(pb::event::Error {
                error: Some(error),
            })]
        });
    }

    fn kill(&mut self, why: Kill) {
        if self.killed.is_none() {
            self.killed = Some(why);
        }
        tracing::info!(id = %self.entry.id, ?why, "killing the instance");
        self.mgr.runtime.kill(&self.rt);
        self.process.kill();
    }

    async fn send(&mut self, msg: H) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        match conn.send(msg).await {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(id = %self.entry.id, error = %e, "connection to hearth-init lost");
                self.conn = None;
                false
            }
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Stop {
                signal,
                grace,
                cause,
                reply,
            } => {
                if !self.stop_requested && self.killed.is_none() {
                    self.stop_requested = true;
                    let now = self.mgr.clock.now();
                    let grace_ms = grace.as_millis() as u64;
                    let deadline = now + super::grace_nanos(grace);
                    self.deadlines.kill = Some(timers::kill_deadline(
                        deadline,
                        self.mgr.cfg.lifecycle.kill_margin.as_millis() as i64,
                    ));
                    self.deadlines.expiry_stop = None;
                    self.entry.logs.system(
                        self.boot,
                        now,
                        &format!("stopping with signal {signal}, grace {grace:?}"),
                    );
                    self.commit(|i, _| {
                        i.state = pb::InstanceState::Stopping as i32;
                        i.stop_deadline_unix_nanos = deadline;
                        vec![pb::event::Kind::Stopping(pb::event::Stopping {
                            signal,
                            grace_millis: grace_ms,
                            cause: cause as i32,
                        })]
                    });
                    if !self.connected_once && !self.adopted {
                        // A fresh boot whose init has not connected: nothing to stop
                        // gracefully yet. (An adopted boot's init reconnects: it gets the
                        // stop then, or is killed if it never got its spec.)
                        self.kill(Kill::StopBeforeConnect);
                    } else if !self
                        .send(H::Stop(init::Stop {
                            signal,
                            grace_millis: grace_ms,
                        }))
                        .await
                    {
                        // Delivered when init reconnects.
                        self.stop_signal_pending = Some((signal, grace_ms));
                    }
                }
                let _ = reply.send(());
            }
            Cmd::Destroy { reply } => {
                self.destroy_waiters.push(reply);
                self.kill(Kill::Destroy);
            }
            Cmd::Exec { mut exec, reply } => {
                exec.request_id = self.next_exec;
                self.next_exec += 1;
                let id = exec.request_id;
                if self.send(H::Exec(exec)).await {
                    self.execs.insert(id, reply);
                } else {
                    let _ = reply.send(Err(InstanceError::NotConnected(self.entry.id.clone())));
                }
            }
        }
    }

    async fn on_conn(&mut self, mut conn: Conn) {
        let hello = conn.hello().clone();
        if !hello.instance_id.is_empty() && hello.instance_id != self.entry.id {
            let _ = conn
                .reject(format!(
                    "this socket belongs to instance {:?}, not {:?}",
                    self.entry.id, hello.instance_id
                ))
                .await;
            return;
        }
        let private = self.entry.private();
        // Init says whether it already has its spec (`reconnect`); a first connection that
        // broke before the Welcome arrived is retried as a first connection again.
        let fresh = !hello.reconnect;
        // Another boot's init (a reconnect, or a fresh Hello to an adopted boot whose id is
        // stored) is not this instance's.
        if (!fresh || self.adopted)
            && !private.boot_id.is_empty()
            && hello.boot_id != private.boot_id
        {
            let _ = conn
                .reject(format!(
                    "boot id {:?} is not this instance's boot {:?}",
                    hello.boot_id, private.boot_id
                ))
                .await;
            return;
        }
        if fresh {
            // A fresh Hello means init has no spec: a new boot, or an adopted one whose agent
            // died before init got the spec (the restarted agent rebuilt it from the store).
            if self.stop_requested {
                // Stopped before its workload ever ran: nothing to start now.
                let _ = conn
                    .reject("the instance was stopped before it started")
                    .await;
                self.kill(Kill::StopBeforeConnect);
                return;
            }
            let Some(spec) = self.spec.clone() else {
                let _ = conn.reject("no spec for this boot").await;
                return;
            };
            // Store the boot id first: a crash after Welcome must not send the spec twice.
            let boot_id = hello.boot_id.clone();
            self.commit(|_, p| {
                p.boot_id = boot_id;
                vec![]
            });
            // A warm-pool member whose assign was lost dials again without an instance id:
            // it is welcomed without a spec and assigned one, as at the claim.
            let sent = if hello.instance_id.is_empty() {
                match conn.welcome(None, 0).await {
                    Ok(()) => conn.send(H::Assign(spec)).await,
                    Err(e) => Err(e),
                }
            } else {
                conn.welcome(Some(spec), 0).await
            };
            if let Err(e) = sent {
                // Init gave up waiting (a busy node); it dials again.
                tracing::info!(id = %self.entry.id, error = %e, "cannot welcome hearth-init");
                return;
            }
            self.spec_at = self.mgr.clock.now();
        } else {
            let resume = self.entry.logs.last_init_seq(self.boot);
            if let Err(e) = conn.welcome(None, resume).await {
                tracing::warn!(id = %self.entry.id, error = %e, "cannot welcome hearth-init");
                return;
            }
        }
        tracing::info!(id = %self.entry.id, reconnect = !fresh, "hearth-init connected");
        self.entry.logs.system(
            self.boot,
            self.mgr.clock.now(),
            &format!(
                "hearth-init {} connected (protocol {}, {})",
                hello.init_version,
                hello.protocol_version,
                if fresh { "spec sent" } else { "reconnect" }
            ),
        );
        self.conn = Some(conn);
        self.connected_once = true;
        self.deadlines.connect = None;
        if let Some((signal, grace_millis)) = self.stop_signal_pending.take() {
            self.send(H::Stop(init::Stop {
                signal,
                grace_millis,
            }))
            .await;
        }
    }

    /// The claimed member's init is connected and welcomed: its spec goes with `assign`. If
    /// that fails, init dials again without an instance id and [`Self::on_conn`] assigns.
    async fn on_member(&mut self, mut conn: Conn) {
        let Some(spec) = self.spec.clone() else {
            return;
        };
        if let Err(e) = conn.send(H::Assign(spec)).await {
            tracing::info!(id = %self.entry.id, error = %e, "cannot assign the spec to the warm-pool member; it dials again");
            return;
        }
        self.spec_at = self.mgr.clock.now();
        let hello = conn.hello().clone();
        tracing::info!(id = %self.entry.id, "spec assigned to a warm-pool member");
        self.entry.logs.system(
            self.boot,
            self.spec_at,
            &format!(
                "hearth-init {} of a warm-pool member got the spec (protocol {})",
                hello.init_version, hello.protocol_version
            ),
        );
        self.conn = Some(conn);
        self.connected_once = true;
        self.deadlines.connect = None;
    }

    async fn on_frame(&mut self, msg: Result<Option<G>, ChannelError>) {
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::info!(id = %self.entry.id, "hearth-init closed its connection");
                self.conn = None;
                return;
            }
            Err(e) => {
                tracing::warn!(id = %self.entry.id, error = %e, "bad frame from hearth-init; dropping the connection");
                self.conn = None;
                return;
            }
        };
        let now = self.mgr.clock.now();
        match msg {
            G::Hello(_) => {
                // Guest-triggered: not worth more than a debug line.
                tracing::debug!(id = %self.entry.id, "hearth-init sent a second Hello");
            }
            G::Started(s) => {
                self.started = true;
                self.entry.touch(now);
                let (runtime_at, spec_at) = (self.runtime_at, self.spec_at);
                self.commit(|i, p| {
                    if i.state == pb::InstanceState::Starting as i32 {
                        i.state = pb::InstanceState::Running as i32;
                    }
                    i.started_at_unix_nanos = now;
                    let since = |at: i64| {
                        if at == 0 || p.start_requested_at == 0 {
                            0
                        } else {
                            ((at - p.start_requested_at).max(0) / 1000) as u64
                        }
                    };
                    vec![pb::event::Kind::Started(pb::event::Started {
                        pid: s.pid,
                        warm: p.warm_start,
                        runtime_micros: since(runtime_at),
                        init_micros: since(spec_at),
                        spawned_micros: since(now),
                    })]
                });
            }
            G::Ready(_) => {
                self.start_guard = None;
                self.commit(|i, p| {
                    if i.state == pb::InstanceState::Running as i32
                        || i.state == pb::InstanceState::Starting as i32
                    {
                        i.state = pb::InstanceState::Healthy as i32;
                    }
                    let micros = ((now - p.start_requested_at).max(0) / 1000) as u64;
                    vec![pb::event::Kind::Ready(pb::event::Ready {
                        start_to_ready_micros: micros,
                    })]
                });
            }
            G::Log(rec) => {
                if rec.seq != 0 && rec.seq <= self.entry.logs.last_init_seq(self.boot) {
                    // Resent after a reconnect and already stored.
                } else {
                    let stream = match init::LogStream::try_from(rec.stream) {
                        Ok(init::LogStream::Stdout) => pb::LogStream::Stdout,
                        Ok(init::LogStream::Stderr) => pb::LogStream::Stderr,
                        _ => pb::LogStream::System,
                    };
                    let entry = pb::LogEntry {
                        timestamp_unix_nanos: if rec.timestamp_unix_nanos != 0 {
                            rec.timestamp_unix_nanos
                        } else {
                            now
                        },
                        stream: stream as i32,
                        data: rec.data,
                        boot: self.boot,
                        partial: rec.partial,
                        seq: rec.seq,
                        index: 0,
                    };
                    if let Err(e) = self.entry.logs.append(entry) {
                        // Not acknowledged: init keeps it and resends after a reconnect.
                        tracing::warn!(id = %self.entry.id, error = %e, "cannot store a log record");
                        return;
                    }
                }
                self.send(H::LogAck(init::LogAck { seq: rec.seq })).await;
            }
            G::LogsDropped(d) => {
                self.entry.logs.add_dropped(d.count);
                self.entry.logs.system(
                    self.boot,
                    now,
                    &format!("hearth-init dropped {} log records (buffer full)", d.count),
                );
            }
            G::Metrics(m) => {
                *self.entry.metrics.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
            }
            G::Exited(e) => {
                tracing::info!(id = %self.entry.id, code = e.exit_code, "workload exited");
                self.exited = Some(e);
                self.deadlines.kill = Some(now + EXIT_MARGIN_MS * 1_000_000);
            }
            G::InitError(e) => {
                let kind = init::InitErrorKind::try_from(e.kind)
                    .map(model::error_kind_from_init)
                    .unwrap_or(pb::ErrorKind::Internal);
                if e.fatal || self.init_error.is_none() {
                    self.init_error = Some((kind, e.fatal));
                }
                let msg: String = e.message.chars().take(4096).collect();
                self.error_event(kind, msg);
            }
            G::ExecResult(r) => {
                if let Some(tx) = self.execs.remove(&r.request_id) {
                    let _ = tx.send(Ok(r));
                }
            }
            G::Pong(_) => {}
        }
    }

    async fn on_timer(&mut self, timer: timers::Timer) {
        use timers::Timer;
        match timer {
            Timer::Connect => {
                self.deadlines.connect = None;
                let after = self.mgr.cfg.lifecycle.init_connect_timeout;
                self.error_event(
                    pb::ErrorKind::InitUnreachable,
                    format!("hearth-init did not connect within {after:?}"),
                );
                self.kill(Kill::ConnectTimeout);
            }
            Timer::Kill => {
                self.deadlines.kill = None;
                let why = if self.exited.is_some() {
                    Kill::AfterExit
                } else {
                    Kill::AfterGrace
                };
                self.kill(why);
            }
            Timer::Activity => {
                let now = self.mgr.clock.now();
                self.expired_at = Some(now);
                self.deadlines.activity = None;
                let stop = self
                    .entry
                    .instance()
                    .spec
                    .map(|s| s.activity_expiry != pb::ActivityExpiry::Notify as i32)
                    .unwrap_or(true);
                self.commit(|_, _| {
                    vec![pb::event::Kind::ActivityExpired(
                        pb::event::ActivityExpired { will_stop: stop },
                    )]
                });
                if stop {
                    let delay = self.mgr.cfg.lifecycle.expiry_stop_delay;
                    self.deadlines.expiry_stop = Some(now + super::grace_nanos(delay));
                }
            }
            Timer::ExpiryStop => {
                self.deadlines.expiry_stop = None;
                // A renewal after the expiry cancels the stop.
                if self
                    .expired_at
                    .is_some_and(|at| self.entry.last_activity() > at)
                {
                    return;
                }
                let spec = self.entry.instance().spec.unwrap_or_default();
                let signal = if spec.stop_signal != 0 {
                    spec.stop_signal
                } else {
                    libc::SIGTERM
                };
                let grace =
                    Duration::from_millis(spec.stop_grace_millis.unwrap_or(0).max(0) as u64);
                let (reply, _rx) = oneshot::channel();
                self.on_cmd(Cmd::Stop {
                    signal,
                    grace,
                    cause: pb::StopCause::ActivityExpired,
                    reply,
                })
                .await;
            }
            Timer::Persist => self.persist_activity(false),
        }
    }

    fn exit_status(&self, info: ExitInfo) -> (pb::ExitStatus, Option<(pb::ErrorKind, String)>) {
        let now = self.mgr.clock.now();
        let oom = self.mgr.runtime.oom_kills(&self.rt) > 0;
        let mut exit = pb::ExitStatus {
            requested: self.stop_requested,
            at_unix_nanos: now,
            ..Default::default()
        };
        let mut error = None;
        if self.killed == Some(Kill::Destroy) {
            exit.exit_code = 137;
            exit.signal = libc::SIGKILL;
            exit.reason = pb::StopReason::Destroyed as i32;
            exit.requested = true;
        } else if let Some(e) = &self.exited {
            exit.exit_code = e.exit_code;
            exit.signal = e.signal;
            exit.requested |= e.requested;
            exit.killed_after_grace = e.killed_after_grace;
            exit.at_unix_nanos = if e.at_unix_nanos != 0 {
                e.at_unix_nanos
            } else {
                now
            };
            let reason = init::ExitReason::try_from(e.reason)
                .map(model::stop_reason_from_init)
                .unwrap_or(pb::StopReason::RuntimeError);
            exit.reason = if oom && e.exit_code == 137 && reason == pb::StopReason::Signal {
                pb::StopReason::Oom
            } else {
                reason
            } as i32;
        } else {
            match self.killed {
                Some(Kill::AfterGrace) => {
                    exit.exit_code = 137;
                    exit.signal = libc::SIGKILL;
                    exit.reason = pb::StopReason::RuntimeError as i32;
                    exit.killed_after_grace = true;
                    error = Some((
                        pb::ErrorKind::InitUnreachable,
                        "hearth-init did not report the exit before the stop grace ended; the instance was killed".to_owned(),
                    ));
                }
                Some(Kill::StopBeforeConnect) => {
                    exit.exit_code = 137;
                    exit.signal = libc::SIGKILL;
                    exit.reason = pb::StopReason::Signal as i32;
                }
                Some(Kill::ConnectTimeout) => {
                    exit.exit_code = 137;
                    exit.signal = libc::SIGKILL;
                    exit.reason = pb::StopReason::RuntimeError as i32;
                }
                _ if oom => {
                    exit.exit_code = 137;
                    exit.signal = libc::SIGKILL;
                    exit.reason = pb::StopReason::Oom as i32;
                }
                _ => {
                    exit.exit_code = info.shell_code();
                    exit.signal = info.signal.unwrap_or(0);
                    exit.reason = pb::StopReason::RuntimeError as i32;
                    error = Some((
                        pb::ErrorKind::Runtime,
                        format!(
                            "the instance's process ended without a report from hearth-init (status {})",
                            info.shell_code()
                        ),
                    ));
                }
            }
        }
        (exit, error)
    }

    async fn finish(mut self, info: ExitInfo) {
        self.conn = None;
        let (exit, error) = self.exit_status(info);
        // Failed: it never got going (and nobody asked it to stop).
        let failed = !self.stop_requested
            && (matches!(self.init_error, Some((_, true))) && !self.started
                || self.killed == Some(Kill::ConnectTimeout)
                || (!self.started && exit.reason == pb::StopReason::RuntimeError as i32));
        let runtime = self.mgr.runtime.clone();
        let rt = self.rt.clone();
        let cleanup = tokio::task::spawn_blocking(move || runtime.cleanup(&rt)).await;
        if let Ok(Err(e)) = cleanup {
            tracing::warn!(id = %self.entry.id, error = %e, "runtime cleanup failed");
        }
        if let Some(net) = &self.mgr.net {
            net.detach(&self.entry.id).await;
        }
        let reason = pb::StopReason::try_from(exit.reason).unwrap_or_default();
        self.entry.logs.system(
            self.boot,
            self.mgr.clock.now(),
            &format!(
                "stopped: exit code {} ({})",
                exit.exit_code,
                model::reason_name(reason)
            ),
        );
        if let Some((kind, message)) = error {
            self.error_event(kind, message);
        }
        let init_error = self.init_error;
        // Detach from the entry before the state says stopped: a start that follows at once
        // installs its own supervisor, which this one must not clear afterwards.
        *self.entry.sup.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.commit(|i, p| {
            i.state = if failed {
                pb::InstanceState::Failed
            } else {
                pb::InstanceState::Stopped
            } as i32;
            if failed && i.error.is_none() {
                i.error = Some(pb::InstanceError {
                    kind: init_error.map(|(k, _)| k).unwrap_or(pb::ErrorKind::Runtime) as i32,
                    message: "the instance failed to start".into(),
                });
            }
            i.exit = Some(exit);
            i.stop_deadline_unix_nanos = 0;
            i.activity_deadline_unix_nanos = 0;
            p.runtime = None;
            p.boot_id.clear();
            vec![pb::event::Kind::Stopped(pb::event::Stopped {
                exit: Some(exit),
            })]
        });
        for (_, tx) in self.execs.drain() {
            let _ = tx.send(Err(InstanceError::NotConnected(self.entry.id.clone())));
        }
        for w in self.destroy_waiters.drain(..) {
            let _ = w.send(());
        }
        // Commands that raced the end.
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                Cmd::Stop { reply, .. } | Cmd::Destroy { reply } => {
                    let _ = reply.send(());
                }
                Cmd::Exec { reply, .. } => {
                    let _ = reply.send(Err(InstanceError::NotConnected(self.entry.id.clone())));
                }
            }
        }
    }
}

async fn recv(conn: &mut Option<Conn>) -> Result<Option<G>, ChannelError> {
    match conn {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<Conn>, id: String) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(id, error = %e, "accept on the control socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = tx.clone();
        let id = id.clone();
        tokio::spawn(async move {
            match HostChannel::accept(stream, HELLO_TIMEOUT).await {
                Ok(conn) => {
                    let _ = tx.send(conn).await;
                }
                Err(e) => tracing::warn!(id, error = %e, "hearth-init handshake failed"),
            }
        });
    }
}
