//! Instances: the model's operations (create, start, stop, destroy, renew, exec, logs) as plain
//! async functions on [`Manager`], which the gRPC handlers, the ingress router and the tests
//! call.
//!
//! Every change of an instance is committed to the store together with its events
//! ([`Entry::commit`]). While an instance's runtime exists, one [`supervisor`] task owns it: it
//! speaks the init protocol, runs the timers (init connect, sleep_after, stop grace) and turns
//! the process's end into the `stopped` event. Lifecycle operations on one instance are
//! serialized by its `op` lock; different instances proceed in parallel.
//!
//! # Layout
//!
//! - [`failpoint`]: test-only crash points on the start path.
//! - [`gate`]: starts in flight, which background work (pool refills) waits for.
//! - [`network`]: addresses, interfaces, NAT and eBPF per instance.
//! - [`router`]: the ingress proxy's view of the instances.
//! - [`spec`]: the spec hearth-init gets.
//! - [`supervisor`]: the per-boot task.
//! - [`timers`]: the deadline arithmetic the supervisor waits on.

pub mod failpoint;
pub mod gate;
pub mod network;
pub mod router;
pub mod spec;
pub mod supervisor;
#[cfg(test)]
mod tests;
pub mod timers;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use hearth_proto::init;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    clock::{Clock, nanos},
    config::Config,
    events::EventLog,
    images::{ImageCache, ImageError, ResolvedImage},
    logs::LogSink,
    model::{self, InvalidRequest, pb},
    runtime::{LaunchRequest, Process, Runtime, RuntimeError},
    store::{Change, Private, StoreError},
};

use supervisor::{Cmd, Supervisor};

/// Why an instance operation failed. The API maps each variant to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// No instance has this id.
    #[error("Instance {0:?} not found")]
    NotFound(String),
    /// The id is taken by an instance with another spec.
    #[error("Instance {0:?} already exists with a different spec")]
    AlreadyExists(String),
    /// The instance's state does not allow the operation.
    #[error("Instance {id:?} is {state}: {what}")]
    WrongState {
        /// The instance.
        id: String,
        /// Its state.
        state: &'static str,
        /// What cannot be done.
        what: &'static str,
    },
    /// The image is not known to the registry.
    #[error("Image {0:?} not found")]
    ImageNotFound(String),
    /// The image could not be made ready.
    #[error("Image {reference:?} is unavailable")]
    Image {
        /// The image.
        reference: String,
        /// Why.
        #[source]
        source: ImageError,
    },
    /// The instance's network could not be set up.
    #[error("Networking of instance {id:?} failed")]
    Network {
        /// The instance.
        id: String,
        /// Why.
        #[source]
        source: network::NetworkError,
    },
    /// The runtime could not launch the instance.
    #[error("Launching instance {id:?} failed")]
    Runtime {
        /// The instance.
        id: String,
        /// Why.
        #[source]
        source: RuntimeError,
    },
    /// The state store failed.
    #[error("The state store failed")]
    Store(#[from] StoreError),
    /// hearth-init is not connected (the request needs it).
    #[error("Instance {0:?} has no connection to hearth-init right now")]
    NotConnected(String),
    /// Reading or writing the instance's logs failed.
    #[error("Logs of instance {id:?} failed")]
    Logs {
        /// The instance.
        id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent is shutting down.
    #[error("The agent is shutting down")]
    ShuttingDown,
    /// A timed operation ran out of time.
    #[error("{0}")]
    Timeout(String),
}

/// One instance, in memory.
pub struct Entry {
    /// Its id.
    pub id: String,
    op: tokio::sync::Mutex<()>,
    view: Mutex<(pb::Instance, Private)>,
    sup: Mutex<Option<mpsc::Sender<Cmd>>>,
    activity: AtomicI64,
    activity_changed: Notify,
    /// Its log.
    pub logs: Arc<LogSink>,
    metrics: Mutex<Option<init::Metrics>>,
    state_tx: watch::Sender<pb::InstanceState>,
    ingress_requests: AtomicU64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn state_of(i: &pb::Instance) -> pb::InstanceState {
    pb::InstanceState::try_from(i.state).unwrap_or(pb::InstanceState::Unspecified)
}

impl Entry {
    fn new(inst: pb::Instance, private: Private, logs: Arc<LogSink>) -> Self {
        let state = state_of(&inst);
        Self {
            id: inst.id.clone(),
            op: tokio::sync::Mutex::new(()),
            activity: AtomicI64::new(0),
            activity_changed: Notify::new(),
            view: Mutex::new((inst, private)),
            sup: Mutex::new(None),
            logs,
            metrics: Mutex::new(None),
            state_tx: watch::channel(state).0,
            ingress_requests: AtomicU64::new(0),
        }
    }

    /// The instance as the API shows it.
    pub fn instance(&self) -> pb::Instance {
        let v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = v.0.clone();
        // The live activity deadline (the stored one may lag by a few seconds).
        if i.activity_deadline_unix_nanos != 0 {
            let sleep = i
                .spec
                .as_ref()
                .and_then(|s| s.sleep_after_millis)
                .unwrap_or(0);
            let last = self.activity.load(Ordering::Relaxed);
            if last != 0 && sleep > 0 {
                i.activity_deadline_unix_nanos =
                    i.activity_deadline_unix_nanos.max(last + sleep * 1_000_000);
            }
        }
        i
    }

    /// The agent-private record.
    pub fn private(&self) -> Private {
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// The state.
    pub fn state(&self) -> pb::InstanceState {
        state_of(&self.view.lock().unwrap_or_else(|e| e.into_inner()).0)
    }

    /// Watches the state.
    pub fn subscribe_state(&self) -> watch::Receiver<pb::InstanceState> {
        self.state_tx.subscribe()
    }

    /// Applies `f` to a copy of the record, commits it with the events `f` returns, then makes
    /// it current. On a store error nothing changes.
    pub fn commit(
        &self,
        events: &EventLog,
        clock: &Clock,
        f: impl FnOnce(&mut pb::Instance, &mut Private) -> Vec<pb::event::Kind>,
    ) -> Result<pb::Instance, StoreError> {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let (mut inst, mut private) = view.clone();
        let kinds = f(&mut inst, &mut private);
        let at = clock.now();
        let evs = kinds
            .into_iter()
            .map(|k| pb::Event {
                seq: 0,
                instance_id: self.id.clone(),
                at_unix_nanos: at,
                kind: Some(k),
            })
            .collect();
        events.commit(Change {
            put: Some((inst.clone(), private.clone())),
            events: evs,
            ..Default::default()
        })?;
        let state = state_of(&inst);
        *view = (inst.clone(), private);
        drop(view);
        self.state_tx.send_replace(state);
        Ok(inst)
    }

    /// Marks activity now (ingress requests, RenewActivity, start).
    pub fn touch(&self, now: i64) {
        self.activity.fetch_max(now, Ordering::Relaxed);
        self.activity_changed.notify_one();
    }

    /// The last activity (Unix ns; 0 = none yet).
    pub fn last_activity(&self) -> i64 {
        self.activity.load(Ordering::Relaxed)
    }

    /// Counts a request the ingress proxied.
    pub fn count_ingress_request(&self) {
        self.ingress_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The latest metrics from hearth-init.
    pub fn init_metrics(&self) -> Option<init::Metrics> {
        *self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn supervisor(&self) -> Option<mpsc::Sender<Cmd>> {
        self.sup.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The instance manager.
pub struct Manager {
    /// The config.
    pub cfg: Arc<Config>,
    /// The clock.
    pub clock: Clock,
    /// The event log (and through it the store).
    pub events: EventLog,
    /// The runtime.
    pub runtime: Arc<dyn Runtime>,
    /// The image cache.
    pub images: Arc<dyn ImageCache>,
    /// The node network (None: instances get loopback only).
    pub net: Option<Arc<network::NodeNet>>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    started_at: i64,
    pool: std::sync::OnceLock<crate::pool::WarmPool>,
    gate: Arc<gate::StartGate>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

/// Result of creating: the instance, and whether this call created it.
pub type Created = (pb::Instance, bool);

impl Manager {
    /// A manager over the stored instances. Call [`Manager::adopt`] next to take over the
    /// instances that were running when the previous agent stopped.
    pub fn new(
        cfg: Arc<Config>,
        events: EventLog,
        runtime: Arc<dyn Runtime>,
        images: Arc<dyn ImageCache>,
        net: Option<Arc<network::NodeNet>>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, InstanceError> {
        let clock = Clock::new();
        let mut entries = HashMap::new();
        for (inst, private) in events.store().load_instances()? {
            let logs = Self::open_logs(&cfg, &inst.id)?;
            let entry = Arc::new(Entry::new(inst, private, logs));
            entries.insert(entry.id.clone(), entry);
        }
        Ok(Arc::new(Self {
            started_at: clock.now(),
            pool: std::sync::OnceLock::new(),
            gate: gate::StartGate::new(),
            cfg,
            clock,
            events,
            runtime,
            images,
            net,
            entries: Mutex::new(entries),
            tracker,
            shutdown,
        }))
    }

    fn open_logs(cfg: &Config, id: &str) -> Result<Arc<LogSink>, InstanceError> {
        let dir = cfg.state_dir.join("instances").join(id).join("logs");
        LogSink::open(&dir, &cfg.logs)
            .map(Arc::new)
            .map_err(|source| InstanceError::Logs {
                id: id.to_owned(),
                source,
            })
    }

    /// When this agent started (Unix ns).
    pub fn started_at(&self) -> i64 {
        self.started_at
    }

    /// Gives the manager the node's warm pools (starts claim their members); set once.
    pub fn set_pool(&self, pool: crate::pool::WarmPool) {
        let _ = self.pool.set(pool);
    }

    /// The node's warm pools, once set.
    pub fn pool(&self) -> Option<&crate::pool::WarmPool> {
        self.pool.get()
    }

    /// The starts in flight (background work waits for them).
    pub fn start_gate(&self) -> Arc<gate::StartGate> {
        self.gate.clone()
    }

    /// The entry of `id`.
    pub fn entry(&self, id: &str) -> Result<Arc<Entry>, InstanceError> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| InstanceError::NotFound(id.to_owned()))
    }

    /// Every entry.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        let mut v: Vec<_> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Creates an instance (idempotent for the same spec).
    pub async fn create(&self, id: &str, spec: pb::InstanceSpec) -> Result<Created, InstanceError> {
        model::validate_id(id)?;
        let spec = model::normalize_spec(spec, &self.cfg.defaults)?;
        if self.shutdown.is_cancelled() {
            return Err(InstanceError::ShuttingDown);
        }
        // Claim the id with an in-memory placeholder, so concurrent creates of the same id
        // agree; nothing is stored until the image resolved.
        let (entry, fresh) = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            match entries.get(id) {
                Some(e) => (e.clone(), false),
                None => {
                    let logs = Self::open_logs(&self.cfg, id)?;
                    let inst = pb::Instance {
                        id: id.to_owned(),
                        spec: Some(spec.clone()),
                        state: pb::InstanceState::Creating as i32,
                        runtime: self.runtime.kind().as_str().to_owned(),
                        ..Default::default()
                    };
                    let e = Arc::new(Entry::new(inst, Private::default(), logs));
                    entries.insert(id.to_owned(), e.clone());
                    (e, true)
                }
            }
        };
        if !fresh {
            let _op = entry.op.lock().await;
            let inst = entry.instance();
            if inst.spec.as_ref() != Some(&spec) {
                return Err(InstanceError::AlreadyExists(id.to_owned()));
            }
            // A concurrent create of the same spec that failed removed its placeholder.
            if self.entry(id).is_err() {
                return Err(InstanceError::NotFound(id.to_owned()));
            }
            return Ok((inst, false));
        }
        let op = entry.op.lock().await;
        let result = self.resolve_image(&spec.image).await;
        let image = match result {
            Ok(i) => i,
            Err(e) => {
                self.entries
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id);
                let _ = entry.logs.remove();
                let _ = std::fs::remove_dir_all(self.instance_dir(id));
                return Err(e);
            }
        };
        let address = match &self.net {
            Some(net) => match net.allocate(id) {
                Ok(a) => a.to_string(),
                Err(source) => {
                    self.entries
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(id);
                    return Err(InstanceError::Network {
                        id: id.to_owned(),
                        source,
                    });
                }
            },
            None => String::new(),
        };
        if let Err(e) = self.images.pin(&image.digest) {
            tracing::warn!(id, error = %e, "cannot pin the image");
        }
        let now = self.clock.now();
        let committed = entry.commit(&self.events, &self.clock, |i, p| {
            i.state = pb::InstanceState::Created as i32;
            i.address = address.clone();
            i.created_at_unix_nanos = now;
            i.image_digest = image.digest.clone();
            p.image = Some(image.clone());
            vec![pb::event::Kind::Created(pb::event::Created {
                image_digest: image.digest.clone(),
            })]
        });
        drop(op);
        match committed {
            Ok(i) => Ok((i, true)),
            Err(e) => {
                self.entries
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id);
                let _ = self.images.unpin(&image.digest);
                if let Some(net) = &self.net {
                    net.release(id);
                }
                Err(e.into())
            }
        }
    }

    async fn resolve_image(&self, reference: &str) -> Result<ResolvedImage, InstanceError> {
        match self.images.lookup(reference) {
            Ok(Some(i)) if i.rootfs.exists() => return Ok(i),
            Ok(_) => {}
            Err(e) => {
                return Err(InstanceError::Image {
                    reference: reference.to_owned(),
                    source: e,
                });
            }
        }
        if !self.cfg.images.pull_on_create {
            return Err(InstanceError::ImageNotFound(reference.to_owned()));
        }
        match self.images.pull(reference, None).await {
            Ok(i) => Ok(i),
            Err(ImageError::NotFound(_)) => Err(InstanceError::ImageNotFound(reference.to_owned())),
            Err(source) => Err(InstanceError::Image {
                reference: reference.to_owned(),
                source,
            }),
        }
    }

    fn instance_dir(&self, id: &str) -> std::path::PathBuf {
        self.cfg.state_dir.join("instances").join(id)
    }

    /// Starts (boots) an instance; a running one is returned unchanged.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<pb::Instance, InstanceError> {
        model::validate_id(id)?;
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        if self.shutdown.is_cancelled() {
            return Err(InstanceError::ShuttingDown);
        }
        let inst = entry.instance();
        match state_of(&inst) {
            pb::InstanceState::Starting
            | pb::InstanceState::Running
            | pb::InstanceState::Healthy => return Ok(inst),
            pb::InstanceState::Created | pb::InstanceState::Stopped | pb::InstanceState::Failed => {
            }
            s => {
                return Err(InstanceError::WrongState {
                    id: id.to_owned(),
                    state: model::state_name(s),
                    what: "it can be started once it has stopped",
                });
            }
        }
        let spec = inst.spec.clone().unwrap_or_default();
        let now = self.clock.now();
        // Phase timings at debug level (where a start spends its time).
        let t0 = std::time::Instant::now();
        // Until its workload is ready, background work (pool refills) waits.
        let guard = self.gate.begin();
        let image = match entry.private().image {
            Some(i) if i.rootfs.exists() => i,
            _ => self.resolve_image(&spec.image).await?,
        };
        let it = spec.instance_type.unwrap_or_default();
        let claimed = match self.pool() {
            Some(pool) => pool.claim(&image.digest, &it).await,
            None => None,
        };
        if let Some(pool) = self.pool() {
            pool.count_start(claimed.is_some());
        }
        if let Some(claimed) = claimed {
            tracing::debug!(
                id,
                us = t0.elapsed().as_micros(),
                "claimed a warm-pool member"
            );
            return self
                .start_warm(&entry, &spec, image, claimed, now, (t0, guard))
                .await;
        }
        // Every boot gets a fresh address: a connection or ARP entry of an earlier boot must
        // never reach this one (the first boot's address is fresh from create). An interface
        // prepared ahead of time brings its own.
        let mut prepared = self.net.as_ref().and_then(|n| n.take_prepared());
        let mut address = inst.address.clone();
        if let Some(p) = &prepared {
            address = p.address().to_string();
        } else if inst.boots > 0
            && let Some(net) = &self.net
        {
            match net.renew_address(id) {
                Ok(a) => address = a.to_string(),
                Err(source) => {
                    return Err(InstanceError::Network {
                        id: id.to_owned(),
                        source,
                    });
                }
            }
        }
        entry.touch(now);
        let committed = entry.commit(&self.events, &self.clock, |i, p| {
            let boot = i.boots + 1;
            begin_boot(i, p, boot, &address, &image, now);
            p.boot_id.clear();
            p.warm_start = false;
            vec![pb::event::Kind::Starting(pb::event::Starting { boot })]
        });
        let inst = match committed {
            Ok(i) => i,
            Err(e) => {
                self.discard_prepared(prepared.take()).await;
                return Err(e.into());
            }
        };
        let boot = inst.boots;
        entry.logs.system(
            boot,
            now,
            &format!("starting boot {boot} from {}", image.reference),
        );
        // Listen before launching: init dials as soon as it runs.
        let socket = self.runtime.control_socket(id);
        let listener = match bind_control_socket(&socket) {
            Ok(l) => l,
            Err(source) => {
                self.discard_prepared(prepared.take()).await;
                let err = RuntimeError::Io {
                    path: socket.clone(),
                    source,
                };
                return self.fail_start(&entry, self.runtime_error(id, err));
            }
        };
        let port = spec::http_port(&spec, Some(&image), self.cfg.defaults.default_port);
        // The microVM's TAP must exist before hearth-vmm opens it.
        let mut network = None;
        let (mut tap, mut mac) = (None, None);
        if let (Some(net), crate::config::RuntimeKind::Microvm) = (&self.net, self.runtime.kind()) {
            let attached = match prepared.take() {
                Some(p) => {
                    let (t, m) = p.tap();
                    net.claim_prepared(p, id, &spec, port)
                        .await
                        .map(|n| (t, m, n))
                }
                None => net.attach_tap(id, &spec, port).await,
            };
            match attached {
                Ok((t, m, n)) => {
                    tap = Some(t);
                    mac = Some(m);
                    network = Some(n);
                }
                Err(source) => {
                    drop(listener);
                    crate::runtime::sandbox::remove_if_exists(&socket);
                    let e = InstanceError::Network {
                        id: id.to_owned(),
                        source,
                    };
                    return self.fail_start(&entry, e);
                }
            }
        }
        let req = LaunchRequest {
            id,
            boot,
            image: &image,
            instance_type: &it,
            tap,
            mac,
            warm: false,
            netns: prepared.as_ref().and_then(|p| p.netns()),
        };
        let rt_state = match self.runtime.launch(&req) {
            Ok(s) => s,
            Err(e) => {
                drop(listener);
                crate::runtime::sandbox::remove_if_exists(&socket);
                self.discard_prepared(prepared.take()).await;
                if let Some(net) = &self.net {
                    net.detach(id).await;
                }
                return self.fail_start(&entry, self.runtime_error(id, e));
            }
        };
        let process = match Process::adopt(&rt_state) {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => {
                // It died at once; the supervisor still reports how.
                tracing::warn!(id, "instance process ended right after launch");
                match Process::adopt(&rt_state) {
                    Ok(Some(p)) => p,
                    _ => {
                        let _ = self.runtime.cleanup(&rt_state);
                        self.discard_prepared(prepared.take()).await;
                        if let Some(net) = &self.net {
                            net.detach(id).await;
                        }
                        let e = RuntimeError::Spawn {
                            what: "the instance process".into(),
                            source: std::io::Error::other("it ended right after launch"),
                        };
                        return self.fail_start(&entry, self.runtime_error(id, e));
                    }
                }
            }
        };
        tracing::debug!(
            id,
            pid = rt_state.pid,
            us = t0.elapsed().as_micros(),
            "launched"
        );
        // A crash from here until the runtime is committed: the restarted agent reaps the boot
        // (`Runtime::reap`) and reports the start as lost.
        failpoint::hit("cold-launched");
        // The sandbox's veth goes into the namespace of its init (or init joined the one
        // prepared with it), before init gets its spec.
        if let (Some(net), crate::config::RuntimeKind::Sandbox) = (&self.net, self.runtime.kind()) {
            let attached = match prepared.take() {
                Some(p) => net.claim_prepared(p, id, &spec, port).await,
                None => net.attach_sandbox(id, rt_state.pid, &spec, port).await,
            };
            match attached {
                Ok(n) => network = Some(n),
                Err(source) => {
                    self.runtime.kill(&rt_state);
                    process.wait().await;
                    let _ = self.runtime.cleanup(&rt_state);
                    net.detach(id).await;
                    let e = InstanceError::Network {
                        id: id.to_owned(),
                        source,
                    };
                    return self.fail_start(&entry, e);
                }
            }
        }
        tracing::debug!(id, us = t0.elapsed().as_micros(), "network attached");
        let inst = entry.commit(&self.events, &self.clock, |_, p| {
            p.runtime = Some(rt_state.clone());
            vec![]
        })?;
        let root = self.runtime.init_rootfs(&image, it.disk_mib << 20);
        let init_spec = spec::init_spec(id, &spec, &image, root, network);
        // A crash from here on: the restarted agent adopts the boot and welcomes its init with
        // the spec rebuilt from the store (`Manager::adopt`).
        failpoint::hit("cold-committed");
        self.spawn_supervisor_with(
            &entry,
            listener,
            process,
            rt_state,
            Some(init_spec),
            supervisor::BootExtras {
                guard: Some(guard),
                ..Default::default()
            },
        );
        Ok(inst)
    }

    /// Starts a boot on a claimed warm-pool member: the member's address and interface pass
    /// to the instance with its policy, one commit records the boot with the member's runtime,
    /// and the supervisor hands init the spec (`assign`) on the member's live connection.
    async fn start_warm(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        spec: &pb::InstanceSpec,
        image: ResolvedImage,
        claimed: crate::pool::Claimed,
        now: i64,
        (t0, guard): (std::time::Instant, gate::StartGuard),
    ) -> Result<pb::Instance, InstanceError> {
        let id = entry.id.as_str();
        let boot = entry.instance().boots + 1;
        let port = spec::http_port(spec, Some(&image), self.cfg.defaults.default_port);
        let member = claimed.name.clone();
        let mut network = None;
        let mut address = entry.instance().address;
        if let Some(net) = &self.net {
            match net.claim_member(&member, id, spec, port).await {
                Ok(n) => {
                    address = n
                        .addresses
                        .first()
                        .and_then(|a| a.split('/').next())
                        .unwrap_or_default()
                        .to_owned();
                    network = Some(n);
                }
                Err(source) => {
                    if let Some(pool) = self.pool() {
                        pool.discard(claimed).await;
                    }
                    let e = InstanceError::Network {
                        id: id.to_owned(),
                        source,
                    };
                    return self.fail_start(entry, e);
                }
            }
        }
        tracing::debug!(id, us = t0.elapsed().as_micros(), "network handed over");
        // A crash here leaves the instance as it was (the start is not committed); the
        // restarted agent removes the member and what of its network carries the instance's
        // name (`Manager::adopt`).
        failpoint::hit("warm-handed-over");
        let parts = claimed.into_parts();
        let boot_id = parts.conn.hello().boot_id.clone();
        entry.touch(now);
        let committed = entry.commit(&self.events, &self.clock, |i, p| {
            begin_boot(i, p, boot, &address, &image, now);
            p.boot_id = boot_id.clone();
            p.runtime = Some(parts.rt.clone());
            p.warm_start = true;
            vec![pb::event::Kind::Starting(pb::event::Starting { boot })]
        });
        let inst = match committed {
            Ok(i) => i,
            Err(e) => {
                // Nothing refers to the member: it goes.
                self.runtime.kill(&parts.rt);
                parts.process.kill();
                parts.process.wait().await;
                let _ = self.runtime.cleanup(&parts.rt);
                if let Some(net) = &self.net {
                    net.detach(id).await;
                }
                return Err(e.into());
            }
        };
        // The claim is durable: the boot (the member's runtime and boot id) is committed, and
        // the spec can be rebuilt from the store. A crash from here on: the restarted agent
        // adopts the boot, and the member's init, which dials again without an instance id,
        // is assigned the spec then (`Supervisor::on_conn`).
        failpoint::hit("warm-committed");
        entry.logs.system(
            boot,
            now,
            &format!(
                "starting boot {boot} from {} on warm-pool member {member}",
                image.reference
            ),
        );
        if let Err(e) = crate::runtime::move_boot_logs(&self.cfg.state_dir, &member, id) {
            tracing::warn!(id, %member, error = %e, "cannot move the member's runtime logs");
        }
        tracing::debug!(id, %member, us = t0.elapsed().as_micros(), "warm boot committed");
        let it = spec.instance_type.unwrap_or_default();
        let root = self.runtime.init_rootfs(&image, it.disk_mib << 20);
        let init_spec = spec::init_spec(id, spec, &image, root, network);
        self.spawn_supervisor_with(
            entry,
            parts.listener,
            parts.process,
            parts.rt,
            Some(init_spec),
            supervisor::BootExtras {
                member_conn: Some(parts.conn),
                guard: Some(guard),
                adopted: false,
            },
        );
        Ok(inst)
    }

    async fn discard_prepared(&self, p: Option<network::PreparedNet>) {
        if let (Some(p), Some(net)) = (p, &self.net) {
            net.discard_prepared(p).await;
        }
    }

    fn runtime_error(&self, id: &str, source: RuntimeError) -> InstanceError {
        InstanceError::Runtime {
            id: id.to_owned(),
            source,
        }
    }

    fn fail_start(
        &self,
        entry: &Arc<Entry>,
        err: InstanceError,
    ) -> Result<pb::Instance, InstanceError> {
        let message = anyhow_chain(&err);
        let kind = match &err {
            InstanceError::Network { .. } => pb::ErrorKind::Network,
            _ => pb::ErrorKind::Runtime,
        };
        let _ = entry.commit(&self.events, &self.clock, |i, _| {
            let error = pb::InstanceError {
                kind: kind as i32,
                message: message.clone(),
            };
            i.state = pb::InstanceState::Failed as i32;
            i.error = Some(error.clone());
            vec![pb::event::Kind::Error(pb::event::Error {
                error: Some(error),
            })]
        });
        Err(err)
    }

    /// The spec hearth-init gets for the current boot, rebuilt from what is stored (instance
    /// spec, resolved image, address): what a restarted agent hands an init that never got its
    /// spec (the agent died between committing the boot and the `Welcome` or `assign`).
    fn boot_spec(
        &self,
        id: &str,
        inst: &pb::Instance,
        private: &Private,
    ) -> Option<init::InstanceSpec> {
        let spec = inst.spec.as_ref()?;
        let image = private.image.as_ref()?;
        let it = spec.instance_type.unwrap_or_default();
        let root = self.runtime.init_rootfs(image, it.disk_mib << 20);
        let network = self.net.as_ref().and_then(|n| n.init_network(id));
        Some(spec::init_spec(id, spec, image, root, network))
    }

    /// Spawns the supervisor of a boot a restarted agent re-adopts.
    fn spawn_adopted(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        listener: tokio::net::UnixListener,
        process: Process,
        rt: crate::runtime::RuntimeState,
        init_spec: Option<init::InstanceSpec>,
    ) {
        self.spawn_supervisor_with(
            entry,
            listener,
            process,
            rt,
            init_spec,
            supervisor::BootExtras {
                adopted: true,
                ..Default::default()
            },
        );
    }

    /// Spawns the supervisor of a boot; a new boot also hands it its start guard and, warm,
    /// the member's connection.
    fn spawn_supervisor_with(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        listener: tokio::net::UnixListener,
        process: Process,
        rt: crate::runtime::RuntimeState,
        init_spec: Option<init::InstanceSpec>,
        extras: supervisor::BootExtras,
    ) {
        let (tx, rx) = mpsc::channel(16);
        *entry.sup.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        let sup = Supervisor::new(
            self.clone(),
            entry.clone(),
            listener,
            process,
            rt,
            init_spec,
            rx,
            self.shutdown.clone(),
        )
        .with_extras(extras);
        self.tracker.spawn(sup.run());
    }

    /// Stops an instance: the stop signal now, SIGKILL when the grace ends. Stopping an
    /// instance that does not run is a no-op.
    pub async fn stop(
        &self,
        id: &str,
        signal: i32,
        grace_millis: Option<i64>,
    ) -> Result<pb::Instance, InstanceError> {
        model::validate_id(id)?;
        model::validate_stop(signal, grace_millis)?;
        let entry = self.entry(id)?;
        let inst = entry.instance();
        let spec = inst.spec.clone().unwrap_or_default();
        let signal = if signal != 0 {
            signal
        } else if spec.stop_signal != 0 {
            spec.stop_signal
        } else {
            libc::SIGTERM
        };
        let grace = grace_millis.or(spec.stop_grace_millis).unwrap_or(0).max(0) as u64;
        self.request_stop(
            &entry,
            signal,
            Duration::from_millis(grace),
            pb::StopCause::Request,
        )
        .await
    }

    pub(crate) async fn request_stop(
        &self,
        entry: &Arc<Entry>,
        signal: i32,
        grace: Duration,
        cause: pb::StopCause,
    ) -> Result<pb::Instance, InstanceError> {
        let Some(tx) = entry.supervisor() else {
            return Ok(entry.instance());
        };
        let (reply, rx) = oneshot::channel();
        if tx
            .send(Cmd::Stop {
                signal,
                grace,
                cause,
                reply,
            })
            .await
            .is_err()
        {
            return Ok(entry.instance());
        }
        let _ = rx.await;
        Ok(entry.instance())
    }

    /// Kills (if running) and removes an instance and its logs. Its events stay.
    pub async fn destroy(&self, id: &str) -> Result<(), InstanceError> {
        model::validate_id(id)?;
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        if let Some(tx) = entry.supervisor() {
            let (reply, rx) = oneshot::channel();
            if tx.send(Cmd::Destroy { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
        // Gone from the map first, so nothing new reaches it.
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let digest = entry.instance().image_digest;
        if let Some(net) = &self.net {
            net.release(id);
        }
        self.events.commit(Change {
            delete: Some(id.to_owned()),
            events: vec![pb::Event {
                seq: 0,
                instance_id: id.to_owned(),
                at_unix_nanos: self.clock.now(),
                kind: Some(pb::event::Kind::Destroyed(Default::default())),
            }],
            ..Default::default()
        })?;
        entry.state_tx.send_replace(pb::InstanceState::Unspecified);
        if let Err(e) = entry.logs.remove() {
            tracing::warn!(id, error = %e, "cannot remove the instance's logs");
        }
        let _ = std::fs::remove_dir_all(self.instance_dir(id));
        if !digest.is_empty()
            && let Err(e) = self.images.unpin(&digest)
        {
            tracing::warn!(id, error = %e, "cannot unpin the image");
        }
        Ok(())
    }

    /// The instance.
    pub fn get(&self, id: &str) -> Result<pb::Instance, InstanceError> {
        model::validate_id(id)?;
        Ok(self.entry(id)?.instance())
    }

    /// Every instance carrying all of `labels`.
    pub fn list(&self, labels: &HashMap<String, String>) -> Vec<pb::Instance> {
        self.entries()
            .iter()
            .map(|e| e.instance())
            .filter(|i| {
                let have = i.spec.as_ref().map(|s| &s.labels);
                labels
                    .iter()
                    .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
            })
            .collect()
    }

    /// Counts as activity for sleep_after.
    pub fn renew(&self, id: &str) -> Result<pb::Instance, InstanceError> {
        model::validate_id(id)?;
        let entry = self.entry(id)?;
        entry.touch(self.clock.now());
        Ok(entry.instance())
    }

    /// Runs a command in the instance through hearth-init.
    pub async fn exec(
        &self,
        id: &str,
        mut exec: init::Exec,
    ) -> Result<init::ExecResult, InstanceError> {
        model::validate_id(id)?;
        if exec.argv.is_empty() {
            return Err(InvalidRequest("argv is empty: name a command to run".into()).into());
        }
        let entry = self.entry(id)?;
        let Some(tx) = entry.supervisor() else {
            return Err(InstanceError::WrongState {
                id: id.to_owned(),
                state: model::state_name(entry.state()),
                what: "exec needs a running instance",
            });
        };
        if exec.timeout_millis == 0 {
            exec.timeout_millis = 60_000;
        }
        let timeout = Duration::from_millis(exec.timeout_millis) + Duration::from_secs(10);
        let (reply, rx) = oneshot::channel();
        tx.send(Cmd::Exec { exec, reply })
            .await
            .map_err(|_| InstanceError::NotConnected(id.to_owned()))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(InstanceError::NotConnected(id.to_owned())),
            Err(_) => Err(InstanceError::Timeout(format!(
                "hearth-init of {id:?} did not answer the exec in time"
            ))),
        }
    }

    /// The instance's log as a stream.
    pub fn logs(
        &self,
        id: &str,
        since: i64,
        tail: usize,
        follow: bool,
    ) -> Result<impl Stream<Item = std::io::Result<pb::LogEntry>> + Send + use<>, InstanceError>
    {
        model::validate_id(id)?;
        let logs = self.entry(id)?.logs.clone();
        Ok(logs.stream(since, tail, follow))
    }

    /// Metrics of one instance.
    pub fn metrics(&self, id: &str) -> Result<pb::InstanceMetrics, InstanceError> {
        model::validate_id(id)?;
        let entry = self.entry(id)?;
        Ok(self.metrics_of(&entry))
    }

    /// Metrics of an entry.
    pub fn metrics_of(&self, entry: &Entry) -> pb::InstanceMetrics {
        let mut m = pb::InstanceMetrics {
            id: entry.id.clone(),
            at_unix_nanos: self.clock.now(),
            log_bytes: entry.logs.bytes(),
            logs_dropped: entry.logs.dropped(),
            ingress_requests: entry.ingress_requests.load(Ordering::Relaxed),
            warm_start: entry.private().warm_start,
            ..Default::default()
        };
        if let Some(im) = entry.init_metrics() {
            m.cpu_usage_micros = im.cpu_usage_micros;
            m.memory_used_bytes = im.memory_used_bytes;
            m.memory_limit_bytes = im.memory_limit_bytes;
            m.oom_kills = im.oom_kills;
            m.rootfs_used_bytes = im.rootfs_used_bytes;
            m.rootfs_total_bytes = im.rootfs_total_bytes;
            m.process_count = im.process_count;
            m.net_rx_bytes = im.net_rx_bytes;
            m.net_tx_bytes = im.net_tx_bytes;
        }
        if let Some(rt) = entry.private().runtime {
            let usage = self.runtime.usage(&rt);
            m.runtime_rss_bytes = usage.rss_bytes;
            m.vmm_boot_time_us = usage.boot_time_us;
            m.vmm_vcpu_exits = usage.vcpu_exits;
        }
        if let Some(c) = self.net.as_ref().and_then(|n| n.counters(&entry.id)) {
            m.ebpf_packets_allowed = c.packets_allowed;
            m.ebpf_packets_dropped = c.packets_dropped;
            m.ebpf_bytes_allowed = c.bytes_allowed;
            m.ebpf_bytes_dropped = c.bytes_dropped;
        }
        m
    }

    /// Waits until the instance reaches one of `states` (or is destroyed), up to `timeout`.
    pub async fn wait_for(
        &self,
        id: &str,
        states: &[pb::InstanceState],
        timeout: Duration,
    ) -> Result<pb::Instance, InstanceError> {
        let entry = self.entry(id)?;
        let mut rx = entry.subscribe_state();
        let wait = async {
            loop {
                let s = *rx.borrow_and_update();
                if states.contains(&s) || s == pb::InstanceState::Unspecified {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            InstanceError::Timeout(format!(
                "instance {id:?} did not reach the awaited state within {timeout:?}"
            ))
        })?;
        Ok(entry.instance())
    }

    /// Takes over the instances whose runtime was running when the previous agent stopped;
    /// finishes those whose process is gone.
    pub async fn adopt(self: &Arc<Self>) -> Result<(), InstanceError> {
        // Image leases live in the cache's memory: take them again for every instance.
        for entry in self.entries() {
            let digest = entry.instance().image_digest;
            if !digest.is_empty()
                && let Err(e) = self.images.pin(&digest)
            {
                tracing::warn!(id = %entry.id, error = %e, "cannot pin the instance's image");
            }
        }
        if let Some(net) = &self.net {
            for entry in self.entries() {
                let inst = entry.instance();
                if let Ok(addr) = inst.address.parse() {
                    net.restore(&entry.id, addr)
                        .map_err(|source| InstanceError::Network {
                            id: entry.id.clone(),
                            source,
                        })?;
                }
            }
        }
        for entry in self.entries() {
            let inst = entry.instance();
            let state = state_of(&inst);
            if state == pb::InstanceState::Creating {
                // A create that never committed: nothing to keep.
                continue;
            }
            if !model::is_active(state) {
                continue;
            }
            let private = entry.private();
            let Some(rt) = private.runtime.clone() else {
                // Whatever the launch had started runs in the instance's cgroup, unknown to
                // anyone: it goes, so the next start begins clean and nothing runs unaccounted.
                if let Err(e) = self.runtime.reap(&entry.id) {
                    tracing::warn!(id = %entry.id, error = %anyhow_chain(&e), "cannot remove what the interrupted launch left");
                }
                entry.commit(&self.events, &self.clock, |i, _| {
                    let error = pb::InstanceError {
                        kind: pb::ErrorKind::Lost as i32,
                        message: "the agent stopped while the instance was being launched".into(),
                    };
                    i.state = pb::InstanceState::Failed as i32;
                    i.error = Some(error.clone());
                    vec![pb::event::Kind::Error(pb::event::Error {
                        error: Some(error),
                    })]
                })?;
                continue;
            };
            // Activity as of the stored deadline (it is persisted lazily, never later).
            let sleep = inst
                .spec
                .as_ref()
                .and_then(|s| s.sleep_after_millis)
                .unwrap_or(0);
            if inst.activity_deadline_unix_nanos != 0 {
                entry.touch(inst.activity_deadline_unix_nanos - sleep * 1_000_000);
            } else {
                // No deadline stored yet (the boot was young): count the adoption as activity.
                entry.touch(self.clock.now());
            }
            let process = Process::adopt(&rt).ok().flatten();
            let listener = bind_control_socket(&rt.control_socket);
            match (process, listener) {
                (Some(p), Ok(l)) => {
                    tracing::info!(id = %entry.id, pid = p.pid(), "re-adopted a running instance");
                    if let Some(net) = &self.net {
                        let spec = inst.spec.clone().unwrap_or_default();
                        if let Err(e) = net.adopt(&entry.id, &spec).await {
                            tracing::warn!(id = %entry.id, error = %anyhow_chain(&e), "cannot re-adopt the instance's network");
                        }
                    }
                    // A claimed member's logs still under its name (a crash right after
                    // the claim) move to the instance now.
                    if let Some(member) = rt.dir.file_name().and_then(|n| n.to_str())
                        && member.starts_with(crate::pool::MEMBER_PREFIX)
                        && self
                            .cfg
                            .state_dir
                            .join("instances")
                            .join(member)
                            .join("runtime.log")
                            .exists()
                        && let Err(e) =
                            crate::runtime::move_boot_logs(&self.cfg.state_dir, member, &entry.id)
                    {
                        tracing::warn!(id = %entry.id, %member, error = %e, "cannot move the member's runtime logs");
                    }
                    let init_spec = self.boot_spec(&entry.id, &inst, &private);
                    self.spawn_adopted(&entry, l, p, rt, init_spec);
                }
                (p, l) => {
                    if let Err(e) = &l {
                        tracing::warn!(id = %entry.id, error = %e, "cannot listen for hearth-init");
                    }
                    if p.is_some() {
                        self.runtime.kill(&rt);
                    }
                    let _ = self.runtime.cleanup(&rt);
                    if let Some(net) = &self.net {
                        net.detach(&entry.id).await;
                    }
                    let requested = state == pb::InstanceState::Stopping;
                    entry.commit(&self.events, &self.clock, |i, p| {
                        let exit = pb::ExitStatus {
                            exit_code: -1,
                            reason: pb::StopReason::RuntimeError as i32,
                            requested,
                            at_unix_nanos: self.clock.now(),
                            ..Default::default()
                        };
                        i.state = pb::InstanceState::Stopped as i32;
                        i.exit = Some(exit);
                        i.stop_deadline_unix_nanos = 0;
                        i.activity_deadline_unix_nanos = 0;
                        p.runtime = None;
                        let mut evs = Vec::new();
                        if !requested {
                            let error = pb::InstanceError {
                                kind: pb::ErrorKind::Lost as i32,
                                message: "the instance ended while the agent was down".into(),
                            };
                            i.error = Some(error.clone());
                            evs.push(pb::event::Kind::Error(pb::event::Error {
                                error: Some(error),
                            }));
                        }
                        evs.push(pb::event::Kind::Stopped(pb::event::Stopped {
                            exit: Some(exit),
                        }));
                        evs
                    })?;
                }
            }
        }
        // Interfaces and eBPF pins named after an instance without a running boot are left
        // from a crash (e.g. after a claim handed a member's interface to an instance whose
        // start was never committed): they go. Members' and prepared interfaces (names
        // starting with `_`) are their owners' to clean.
        if let Some(net) = &self.net {
            let running: std::collections::HashSet<String> = self
                .entries()
                .into_iter()
                .filter(|e| e.private().runtime.is_some())
                .map(|e| e.id.clone())
                .collect();
            net.remove_orphans(|n| !n.starts_with('_') && !running.contains(n))
                .await;
        }
        // Forget placeholders of creates that never committed.
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, e| e.state() != pb::InstanceState::Creating);
        Ok(())
    }

    /// For agent shutdown: stops every running instance (when configured to) and waits for
    /// them, up to `timeout`.
    pub async fn stop_all(&self, timeout: Duration) {
        let mut waits = Vec::new();
        for entry in self.entries() {
            if entry.supervisor().is_none() {
                continue;
            }
            let grace = entry
                .instance()
                .spec
                .and_then(|s| s.stop_grace_millis)
                .unwrap_or(0)
                .max(0) as u64;
            let _ = self
                .request_stop(
                    &entry,
                    libc::SIGTERM,
                    Duration::from_millis(grace).min(timeout),
                    pb::StopCause::Shutdown,
                )
                .await;
            let id = entry.id.clone();
            waits.push(async move {
                self.wait_for(
                    &id,
                    &[pb::InstanceState::Stopped, pb::InstanceState::Failed],
                    timeout + Duration::from_secs(10),
                )
                .await
            });
        }
        futures::future::join_all(waits).await;
    }

    /// Node-level counts for GetNode.
    pub fn allocated(&self) -> (pb::Resources, u32, u32) {
        let mut r = pb::Resources::default();
        let (mut total, mut running) = (0, 0);
        for e in self.entries() {
            total += 1;
            let i = e.instance();
            if model::is_active(state_of(&i)) {
                running += 1;
                let it = i.spec.and_then(|s| s.instance_type).unwrap_or_default();
                r.vcpus += it.vcpus;
                r.memory_mib += it.memory_mib;
                r.disk_mib += it.disk_mib;
            }
        }
        (r, total, running)
    }
}

/// The state every new boot starts from, cold or warm: `starting`, boot number `boot`, no exit,
/// error or deadlines of the previous boot, its fresh address and image.
fn begin_boot(
    i: &mut pb::Instance,
    p: &mut Private,
    boot: u32,
    address: &str,
    image: &crate::images::ResolvedImage,
    now: i64,
) {
    i.state = pb::InstanceState::Starting as i32;
    i.boots = boot;
    i.exit = None;
    i.error = None;
    i.started_at_unix_nanos = 0;
    i.stop_deadline_unix_nanos = 0;
    i.activity_deadline_unix_nanos = 0;
    i.address = address.to_owned();
    p.image = Some(image.clone());
    p.log_seq = 0;
    p.start_requested_at = now;
}

/// Binds the Unix socket hearth-init dials (replacing a stale one), owner-only.
pub fn bind_control_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Renders an error with its sources, `a: b: c`.
pub fn anyhow_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

/// Converts a stop grace (ms) for the wire.
pub fn grace_nanos(grace: Duration) -> i64 {
    nanos(grace)
}
