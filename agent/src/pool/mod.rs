//! Warm pools: instances booted ahead of demand, per image and instance type.
//!
//! A **member** is a booted instance without a workload: its sandbox (or microVM) is up in a
//! cgroup with the instance type's limits, it has a network interface (sandbox: a veth in its
//! namespace; microvm: its TAP) on an address of its own, and its hearth-init has connected
//! without an instance id and was welcomed without a spec. `StartInstance` of an instance whose
//! image digest and instance type match a pool **claims** a ready member
//! ([`WarmPool::claim`]): the manager moves the member's address to the instance, attaches the
//! instance's NAT and eBPF policy, and hands the spec to init with `assign`; from then on it is
//! that instance's boot like any other and is destroyed when the boot ends. A member serves at
//! most one instance; every member gets a fresh writable layer: its init assembles the root
//! (image, writable layer, overlay) when it is welcomed, before any spec, and `assign` only
//! brings the rest.
//!
//! Sizing: each pool has a target (from the config's `[pool] pools` and from `SetWarmPool`,
//! which wins and is kept in `<state_dir>/warm_pools.json`). One refill task launches members
//! in the background, at most `refill_concurrency` booting at once, and never lets the memory
//! of all members (their instance types' memory, booting and retiring ones included) exceed
//! `memory_budget_mib`. A member unclaimed for `idle_ttl` is recycled (destroyed and replaced).
//! A pool's image is pinned in the image cache while the pool exists. Members do not outlive
//! the agent: shutdown destroys them, and a starting agent removes those an earlier one left.
//!
//! # Layout
//!
//! - [`sizing`]: what a refill pass launches and retires (pure, property-tested).
//! - [`member`]: one member's task: launch, handshake, idle, claim, recycle.
//! - [`targets`]: the targets set through the API, kept across restarts.

pub mod member;
pub mod sizing;
pub mod targets;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Config, InstanceDefaults},
    images::{ImageCache, ImageError, ResolvedImage},
    instance::network::NodeNet,
    model::{self, InvalidRequest, pb},
    runtime::Runtime,
};

pub use member::Claimed;

/// Names of members start with this (an instance id cannot: ids are DNS labels).
pub const MEMBER_PREFIX: &str = "_pool";
/// Largest target of one pool.
pub const MAX_SIZE: u32 = 1024;
/// First wait after a failed boot or image resolution; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the refill task looks again without being woken (back-off expiry).
const REFILL_TICK: Duration = Duration::from_secs(1);

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// The targets would need more memory than the budget.
    #[error(
        "The warm pools would need {need_mib} MiB for their members, over the pool budget of {budget_mib} MiB ([pool] memory_budget_mib)"
    )]
    OverBudget {
        /// What all targets together need.
        need_mib: u64,
        /// The budget.
        budget_mib: u64,
    },
    /// The image is not known to the registry (or not cached when the node does not pull).
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
    /// The targets could not be stored.
    #[error("Storing the warm-pool targets failed")]
    Targets(#[from] targets::TargetsError),
    /// The agent is shutting down.
    #[error("The agent is shutting down")]
    ShuttingDown,
}

/// A pool's identity: the image reference and the instance type (defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Image reference as given.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Writable layer in MiB.
    pub disk_mib: u64,
}

impl PoolKey {
    /// The instance type.
    pub fn instance_type(&self) -> pb::InstanceType {
        pb::InstanceType {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
        }
    }

    fn labels(&self) -> String {
        format!(
            "image=\"{}\",vcpus=\"{}\",memory_mib=\"{}\",disk_mib=\"{}\"",
            crate::metrics::label(&self.image),
            self.vcpus,
            self.memory_mib,
            self.disk_mib
        )
    }
}

fn key_of(
    image: &str,
    it: Option<pb::InstanceType>,
    defaults: &InstanceDefaults,
) -> Result<PoolKey, InvalidRequest> {
    if image.trim().is_empty() {
        return Err(InvalidRequest(
            "image is empty: name an image reference".into(),
        ));
    }
    image
        .parse::<hearth_images::reference::Reference>()
        .map_err(|e| InvalidRequest(format!("image {image:?} is not an image reference: {e}")))?;
    let it = model::normalize_type(it, defaults, "instance_type")?;
    Ok(PoolKey {
        image: image.to_owned(),
        vcpus: it.vcpus,
        memory_mib: it.memory_mib,
        disk_mib: it.disk_mib,
    })
}

fn check_size(size: u32) -> Result<(), InvalidRequest> {
    if size > MAX_SIZE {
        return Err(InvalidRequest(format!(
            "size {size} is above the largest pool ({MAX_SIZE})"
        )));
    }
    Ok(())
}

/// The config's pools with the defaults filled in.
fn config_pools(cfg: &Config) -> Result<Vec<(PoolKey, u32)>, InvalidRequest> {
    cfg.pool
        .pools
        .iter()
        .map(|p| {
            check_size(p.size)?;
            let it = pb::InstanceType {
                vcpus: p.vcpus.unwrap_or(0),
                memory_mib: p.memory_mib.unwrap_or(0),
                disk_mib: p.disk_mib.unwrap_or(0),
            };
            Ok((key_of(&p.image, Some(it), &cfg.defaults)?, p.size))
        })
        .collect()
}

fn need_mib<'a>(targets: impl IntoIterator<Item = (&'a PoolKey, u32)>) -> u64 {
    targets
        .into_iter()
        .map(|(k, n)| u64::from(n) * k.memory_mib)
        .sum()
}

/// Checks the `[pool]` section: sizes, images, instance types, and that the pools fit the
/// memory budget.
pub fn validate_config(cfg: &Config) -> Result<(), PoolError> {
    if cfg.pool.refill_concurrency == 0 {
        return Err(InvalidRequest("pool.refill_concurrency must be above 0".into()).into());
    }
    let pools = config_pools(cfg).map_err(|e| InvalidRequest(format!("pool.pools: {}", e.0)))?;
    let need = need_mib(pools.iter().map(|(k, n)| (k, *n)));
    if need > cfg.pool.memory_budget_mib {
        return Err(PoolError::OverBudget {
            need_mib: need,
            budget_mib: cfg.pool.memory_budget_mib,
        });
    }
    Ok(())
}

/// Where a pool's target came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Config,
    Api,
}

/// A ready member as the pool holds it: a way to ask its task for it.
#[derive(Debug)]
struct ReadyMember {
    name: String,
    claim: oneshot::Sender<oneshot::Sender<Claimed>>,
}

/// A live (unclaimed) member's bookkeeping.
#[derive(Debug)]
struct Slot {
    cancel: CancellationToken,
    booting: bool,
    retiring: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    hits: u64,
    misses: u64,
    recycled: u64,
    failed: u64,
}

#[derive(Debug)]
struct Pool {
    source: Source,
    target: u32,
    /// Resolved and pinned.
    image: Option<ResolvedImage>,
    resolving: bool,
    ready: VecDeque<ReadyMember>,
    slots: HashMap<String, Slot>,
    stats: Stats,
    last_error: String,
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
}

impl Pool {
    fn new(source: Source, target: u32) -> Self {
        Self {
            source,
            target,
            image: None,
            resolving: false,
            ready: VecDeque::new(),
            slots: HashMap::new(),
            stats: Stats::default(),
            last_error: String::new(),
            retry_at: None,
            backoff: MIN_BACKOFF,
        }
    }

    fn count(&self, booting: bool) -> u32 {
        self.slots
            .values()
            .filter(|s| !s.retiring && s.booting == booting)
            .count() as u32
    }

    fn retiring(&self) -> u32 {
        self.slots.values().filter(|s| s.retiring).count() as u32
    }

    fn failed(&mut self, why: String) {
        self.stats.failed += 1;
        self.last_error = why;
        self.retry_at = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn succeeded(&mut self) {
        self.last_error.clear();
        self.retry_at = None;
        self.backoff = MIN_BACKOFF;
    }

    fn retire_all(&mut self) {
        self.ready.clear();
        for s in self.slots.values_mut() {
            s.retiring = true;
            s.cancel.cancel();
        }
    }
}

#[derive(Debug, Default)]
struct State {
    pools: BTreeMap<PoolKey, Pool>,
    next_member: u64,
}

/// Starts by kind, for the metrics.
#[derive(Debug, Default)]
struct StartCounts {
    warm: AtomicU64,
    cold: AtomicU64,
}

/// What the pools share with their tasks.
pub(crate) struct Inner {
    cfg: Arc<Config>,
    runtime: Arc<dyn Runtime>,
    net: Option<Arc<NodeNet>>,
    images: Arc<dyn ImageCache>,
    state: Mutex<State>,
    wake: Notify,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    targets_path: PathBuf,
    set_lock: tokio::sync::Mutex<()>,
    starts: StartCounts,
    /// Pools of the config: kept (with target 0) when the API empties them, so the stored
    /// targets keep overriding the config.
    config_keys: std::collections::BTreeSet<PoolKey>,
    /// Starts in flight: members boot when none is (or after a bounded wait).
    gate: std::sync::OnceLock<Arc<crate::instance::gate::StartGate>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The node's warm pools.
#[derive(Debug, Clone)]
pub struct WarmPool {
    inner: Arc<Inner>,
}

impl WarmPool {
    /// The pools of `cfg` plus the targets stored by earlier `SetWarmPool` calls. Nothing is
    /// launched until [`WarmPool::run`].
    pub fn new(
        cfg: Arc<Config>,
        runtime: Arc<dyn Runtime>,
        net: Option<Arc<NodeNet>>,
        images: Arc<dyn ImageCache>,
    ) -> Result<Self, PoolError> {
        let targets_path = targets::path(&cfg.state_dir);
        let mut pools = BTreeMap::new();
        let mut config_keys = std::collections::BTreeSet::new();
        for (key, size) in config_pools(&cfg)? {
            config_keys.insert(key.clone());
            pools.insert(key, Pool::new(Source::Config, size));
        }
        for t in targets::load(&targets_path)? {
            pools.insert(t.key(), Pool::new(Source::Api, t.size));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                runtime,
                net,
                images,
                state: Mutex::new(State {
                    pools,
                    next_member: 1,
                }),
                wake: Notify::new(),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                targets_path,
                config_keys,
                set_lock: tokio::sync::Mutex::new(()),
                starts: StartCounts::default(),
                gate: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Removes what members of an earlier agent left (their cgroups, sockets, run
    /// directories, TAPs), except what the instances in `in_use` (names of run directories of
    /// adopted boots) still use, then starts the refill task. Members boot while no start is
    /// in flight in `gate` (boots take the same kernel locks and CPU a start needs).
    pub async fn run(&self, in_use: &[String], gate: Arc<crate::instance::gate::StartGate>) {
        let _ = self.inner.gate.set(gate);
        member::remove_orphans(&self.inner, in_use).await;
        let inner = self.inner.clone();
        self.inner.tracker.spawn(refill_loop(inner));
    }

    /// Destroys every member and stops the refill task.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.wake.notify_one();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        let mut st = self.inner.lock();
        for pool in st.pools.values_mut() {
            if let Some(img) = pool.image.take()
                && let Err(e) = self.inner.images.unpin(&img.digest)
            {
                tracing::warn!(error = %e, "cannot unpin a pool image");
            }
        }
    }

    /// Takes a ready member for an instance of image `digest` and type `it`, if a pool has
    /// one; counts the hit or miss.
    pub async fn claim(&self, digest: &str, it: &pb::InstanceType) -> Option<Claimed> {
        let matches = |k: &PoolKey, p: &Pool| {
            k.vcpus == it.vcpus
                && k.memory_mib == it.memory_mib
                && k.disk_mib == it.disk_mib
                && p.image.as_ref().is_some_and(|i| i.digest == digest)
        };
        loop {
            let (key, ready) = {
                let mut st = self.inner.lock();
                let mut first_match = None;
                let mut found = None;
                for (k, p) in st.pools.iter_mut() {
                    if !matches(k, p) {
                        continue;
                    }
                    first_match.get_or_insert_with(|| k.clone());
                    if let Some(r) = p.ready.pop_front() {
                        // Claimed members leave the pool's books at once (the pool refills).
                        p.slots.remove(&r.name);
                        found = Some((k.clone(), r));
                        break;
                    }
                }
                match found {
                    Some(f) => f,
                    None => {
                        if let Some(k) = first_match
                            && let Some(p) = st.pools.get_mut(&k)
                        {
                            p.stats.misses += 1;
                        }
                        return None;
                    }
                }
            };
            self.inner.wake.notify_one();
            let (tx, rx) = oneshot::channel();
            if ready.claim.send(tx).is_err() {
                // It ended (died, or the agent shuts down) after it was taken off the queue.
                continue;
            }
            if let Ok(c) = rx.await {
                if let Some(p) = self.inner.lock().pools.get_mut(&key) {
                    p.stats.hits += 1;
                }
                tracing::debug!(member = %c.name, image = %key.image, "claimed a warm-pool member");
                return Some(c);
            }
        }
    }

    /// Destroys a claimed member that could not be used.
    pub async fn discard(&self, claimed: Claimed) {
        member::destroy_claimed(&self.inner, claimed).await;
    }

    /// Counts a start for the metrics.
    pub fn count_start(&self, warm: bool) {
        let c = if warm {
            &self.inner.starts.warm
        } else {
            &self.inner.starts.cold
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// SetWarmPool: sets the target of the pool of `image` and `it` (0 removes it). The image
    /// is resolved (pulled when missing and `images.pull_on_create`) and pinned; the targets
    /// are stored before the call returns.
    pub async fn set(
        &self,
        image: &str,
        it: Option<pb::InstanceType>,
        size: u32,
    ) -> Result<pb::WarmPool, PoolError> {
        let key = key_of(image, it, &self.inner.cfg.defaults)?;
        check_size(size)?;
        let _serial = self.inner.set_lock.lock().await;
        if self.inner.shutdown.is_cancelled() {
            return Err(PoolError::ShuttingDown);
        }
        {
            let st = self.inner.lock();
            let others = st
                .pools
                .iter()
                .filter(|(k, _)| **k != key)
                .map(|(k, p)| (k, p.target));
            let need = need_mib(others) + u64::from(size) * key.memory_mib;
            if need > self.inner.cfg.pool.memory_budget_mib {
                return Err(PoolError::OverBudget {
                    need_mib: need,
                    budget_mib: self.inner.cfg.pool.memory_budget_mib,
                });
            }
        }
        let resolved = if size > 0 {
            Some(resolve(&self.inner, &key.image).await?)
        } else {
            None
        };
        // Store first: what the API confirmed must survive a crash.
        let mut targets: Vec<targets::Target> = {
            let st = self.inner.lock();
            st.pools
                .iter()
                .filter(|(k, p)| p.source == Source::Api && **k != key)
                .map(|(k, p)| targets::Target {
                    image: k.image.clone(),
                    vcpus: k.vcpus,
                    memory_mib: k.memory_mib,
                    disk_mib: k.disk_mib,
                    size: p.target,
                })
                .collect()
        };
        targets.push(targets::Target {
            image: key.image.clone(),
            vcpus: key.vcpus,
            memory_mib: key.memory_mib,
            disk_mib: key.disk_mib,
            size,
        });
        targets.sort_by_key(|t| t.key());
        let path = self.inner.targets_path.clone();
        tokio::task::spawn_blocking(move || targets::save(&path, &targets))
            .await
            .map_err(|_| PoolError::ShuttingDown)??;
        let mut unpin = Vec::new();
        let view = {
            let mut st = self.inner.lock();
            let pool = st
                .pools
                .entry(key.clone())
                .or_insert_with(|| Pool::new(Source::Api, 0));
            pool.source = Source::Api;
            pool.target = size;
            if let Some(new) = resolved {
                if pool
                    .image
                    .as_ref()
                    .is_some_and(|old| old.digest == new.digest)
                {
                    // Already pinned once for this pool.
                    unpin.push(new.digest.clone());
                } else {
                    // Members of another digest would boot the wrong image (a microVM's disk
                    // is attached at launch): replace them.
                    if let Some(old) = pool.image.replace(new) {
                        unpin.push(old.digest);
                    }
                    pool.retire_all();
                }
                pool.succeeded();
            }
            if size == 0 {
                pool.retire_all();
                if let Some(old) = pool.image.take() {
                    unpin.push(old.digest);
                }
            }
            let view = view_of(&key, pool);
            if size == 0 && pool.slots.is_empty() && !self.inner.config_keys.contains(&key) {
                st.pools.remove(&key);
            }
            view
        };
        for d in unpin {
            let _ = self.inner.images.unpin(&d);
        }
        self.inner.wake.notify_one();
        tracing::info!(image = %key.image, size, "warm pool target set");
        Ok(view)
    }

    /// Every pool (ListWarmPools).
    pub fn list(&self) -> pb::ListWarmPoolsResponse {
        let st = self.inner.lock();
        let pools: Vec<pb::WarmPool> = st
            .pools
            .iter()
            .filter(|(_, p)| p.target > 0 || !p.slots.is_empty())
            .map(|(k, p)| view_of(k, p))
            .collect();
        pb::ListWarmPoolsResponse {
            memory_budget_mib: self.inner.cfg.pool.memory_budget_mib,
            memory_used_mib: held_mib(&st),
            pools,
        }
    }

    /// The pools as GetNode shows them.
    pub fn node_entries(&self) -> Vec<pb::WarmPoolEntry> {
        self.list()
            .pools
            .into_iter()
            .map(|p| pb::WarmPoolEntry {
                image: p.image,
                target: p.target,
                ready: p.ready,
                instance_type: p.instance_type,
                booting: p.booting,
            })
            .collect()
    }

    /// The pools' Prometheus series.
    pub fn render_prometheus(&self, out: &mut String) {
        let list = self.list();
        let st = self.inner.lock();
        type Get = fn(&Pool) -> f64;
        let series: [(&str, &str, &str, Get); 7] = [
            (
                "hearth_warm_pool_target",
                "gauge",
                "Members a warm pool keeps ready.",
                |p| f64::from(p.target),
            ),
            (
                "hearth_warm_pool_ready",
                "gauge",
                "Members booted and waiting for a workload.",
                |p| f64::from(p.count(false)),
            ),
            (
                "hearth_warm_pool_booting",
                "gauge",
                "Members launched and not yet ready.",
                |p| f64::from(p.count(true)),
            ),
            (
                "hearth_warm_pool_hits_total",
                "counter",
                "Starts that took a warm-pool member.",
                |p| p.stats.hits as f64,
            ),
            (
                "hearth_warm_pool_misses_total",
                "counter",
                "Starts of a matching instance that found no ready member.",
                |p| p.stats.misses as f64,
            ),
            (
                "hearth_warm_pool_recycled_total",
                "counter",
                "Members replaced after the idle TTL.",
                |p| p.stats.recycled as f64,
            ),
            (
                "hearth_warm_pool_failed_total",
                "counter",
                "Members that failed to boot or died while waiting.",
                |p| p.stats.failed as f64,
            ),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (k, p) in &st.pools {
                let _ = writeln!(out, "{name}{{{}}} {}", k.labels(), get(p));
            }
        }
        let _ = writeln!(
            out,
            "# HELP hearth_warm_pool_memory_mib Memory held by warm-pool members (MiB)."
        );
        let _ = writeln!(out, "# TYPE hearth_warm_pool_memory_mib gauge");
        let _ = writeln!(out, "hearth_warm_pool_memory_mib {}", list.memory_used_mib);
        let _ = writeln!(
            out,
            "# HELP hearth_warm_pool_memory_budget_mib Memory the members may hold (MiB)."
        );
        let _ = writeln!(out, "# TYPE hearth_warm_pool_memory_budget_mib gauge");
        let _ = writeln!(
            out,
            "hearth_warm_pool_memory_budget_mib {}",
            list.memory_budget_mib
        );
        let _ = writeln!(
            out,
            "# HELP hearth_instance_starts_total Instance boots, warm (a pool member) or cold."
        );
        let _ = writeln!(out, "# TYPE hearth_instance_starts_total counter");
        let s = &self.inner.starts;
        let _ = writeln!(
            out,
            "hearth_instance_starts_total{{kind=\"warm\"}} {}",
            s.warm.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "hearth_instance_starts_total{{kind=\"cold\"}} {}",
            s.cold.load(Ordering::Relaxed)
        );
    }
}

fn held_mib(st: &State) -> u64 {
    st.pools
        .iter()
        .map(|(k, p)| p.slots.len() as u64 * k.memory_mib)
        .sum()
}

fn view_of(key: &PoolKey, p: &Pool) -> pb::WarmPool {
    pb::WarmPool {
        image: key.image.clone(),
        instance_type: Some(key.instance_type()),
        image_digest: p
            .image
            .as_ref()
            .map(|i| i.digest.clone())
            .unwrap_or_default(),
        target: p.target,
        ready: p.count(false),
        booting: p.count(true),
        hits: p.stats.hits,
        misses: p.stats.misses,
        recycled: p.stats.recycled,
        failed: p.stats.failed,
        last_error: p.last_error.clone(),
        source: match p.source {
            Source::Config => "config",
            Source::Api => "api",
        }
        .into(),
    }
}

/// Looks the image up in the cache, else pulls it (when the node pulls on create), and pins
/// it (one pin per pool).
async fn resolve(inner: &Inner, reference: &str) -> Result<ResolvedImage, PoolError> {
    let image = match inner.images.lookup(reference) {
        Ok(Some(i)) if i.rootfs.exists() => i,
        Ok(_) if !inner.cfg.images.pull_on_create => {
            return Err(PoolError::ImageNotFound(reference.to_owned()));
        }
        Ok(_) => match inner.images.pull(reference, None).await {
            Ok(i) => i,
            Err(ImageError::NotFound(_)) => {
                return Err(PoolError::ImageNotFound(reference.to_owned()));
            }
            Err(source) => {
                return Err(PoolError::Image {
                    reference: reference.to_owned(),
                    source,
                });
            }
        },
        Err(source) => {
            return Err(PoolError::Image {
                reference: reference.to_owned(),
                source,
            });
        }
    };
    inner
        .images
        .pin(&image.digest)
        .map_err(|source| PoolError::Image {
            reference: reference.to_owned(),
            source,
        })?;
    Ok(image)
}

/// Resolves a pool's image in the background (pools from the config or the stored targets).
async fn resolve_in_background(inner: Arc<Inner>, key: PoolKey) {
    let r = tokio::select! {
        r = resolve(&inner, &key.image) => r,
        () = inner.shutdown.cancelled() => return,
    };
    let mut st = inner.lock();
    let Some(pool) = st.pools.get_mut(&key) else {
        if let Ok(img) = r {
            let _ = inner.images.unpin(&img.digest);
        }
        return;
    };
    pool.resolving = false;
    match r {
        Ok(img) if pool.image.is_none() && pool.target > 0 => {
            tracing::info!(image = %key.image, digest = %img.digest, "warm pool image ready");
            pool.image = Some(img);
            pool.succeeded();
        }
        Ok(img) => {
            let _ = inner.images.unpin(&img.digest);
        }
        Err(e) => {
            let why = crate::instance::anyhow_chain(&e);
            tracing::warn!(image = %key.image, error = %why, "cannot resolve a warm pool's image");
            pool.failed(why);
        }
    }
    drop(st);
    inner.wake.notify_one();
}

/// The refill task: on every wake-up (a claim, a member's end, a target change) and every
/// tick, plans and carries out launches and retirements.
async fn refill_loop(inner: Arc<Inner>) {
    loop {
        refill_once(&inner);
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(REFILL_TICK) => {}
            () = inner.shutdown.cancelled() => break,
        }
    }
}

fn refill_once(inner: &Arc<Inner>) {
    let now = tokio::time::Instant::now();
    let mut st = inner.lock();
    let keys: Vec<PoolKey> = st.pools.keys().cloned().collect();
    let counts: Vec<sizing::PoolCounts> = keys
        .iter()
        .map(|k| {
            let p = &st.pools[k];
            sizing::PoolCounts {
                target: p.target,
                ready: p.count(false),
                booting: p.count(true),
                retiring: p.retiring(),
                member_mib: k.memory_mib,
                can_launch: p.image.is_some() && p.retry_at.is_none_or(|at| at <= now),
            }
        })
        .collect();
    let actions = sizing::plan(
        &counts,
        inner.cfg.pool.refill_concurrency,
        inner.cfg.pool.memory_budget_mib,
    );
    let mut resolve = Vec::new();
    let mut launch = Vec::new();
    for (key, action) in keys.iter().zip(actions) {
        let Some(pool) = st.pools.get_mut(key) else {
            continue;
        };
        for _ in 0..action.retire_ready {
            if let Some(r) = pool.ready.pop_back()
                && let Some(s) = pool.slots.get_mut(&r.name)
            {
                s.retiring = true;
                s.cancel.cancel();
            }
        }
        let mut left = action.retire_booting;
        for s in pool.slots.values_mut() {
            if left == 0 {
                break;
            }
            if s.booting && !s.retiring {
                s.retiring = true;
                s.cancel.cancel();
                left -= 1;
            }
        }
        if pool.image.is_none()
            && pool.target > 0
            && !pool.resolving
            && pool.retry_at.is_none_or(|at| at <= now)
        {
            pool.resolving = true;
            resolve.push(key.clone());
        }
        if action.launch > 0 {
            let image = pool.image.clone().expect("can_launch needs an image");
            for _ in 0..action.launch {
                launch.push((key.clone(), image.clone()));
            }
        }
    }
    if st.pools.is_empty() && resolve.is_empty() && launch.is_empty() {
        return;
    }
    // Pools that were removed and whose last member ended.
    st.pools
        .retain(|k, p| p.target > 0 || !p.slots.is_empty() || inner.config_keys.contains(k));
    for (key, image) in launch {
        let name = loop {
            let n = st.next_member;
            st.next_member += 1;
            let name = format!("{MEMBER_PREFIX}{n}");
            if !inner.runtime.control_socket(&name).exists() {
                break name;
            }
        };
        let cancel = inner.shutdown.child_token();
        if let Some(pool) = st.pools.get_mut(&key) {
            pool.slots.insert(
                name.clone(),
                Slot {
                    cancel: cancel.clone(),
                    booting: true,
                    retiring: false,
                },
            );
        }
        inner
            .tracker
            .spawn(member::run(inner.clone(), key, name, image, cancel));
    }
    drop(st);
    for key in resolve {
        inner
            .tracker
            .spawn(resolve_in_background(inner.clone(), key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_pools_fill_defaults_and_fit_the_budget() {
        let mut cfg = Config::default();
        cfg.pool.pools = vec![crate::config::PoolEntryConfig {
            image: "reg.example/web:v1".into(),
            size: 2,
            vcpus: None,
            memory_mib: Some(128),
            disk_mib: None,
        }];
        let pools = config_pools(&cfg).unwrap();
        assert_eq!(pools[0].0.vcpus, cfg.defaults.vcpus);
        assert_eq!(pools[0].0.memory_mib, 128);
        assert_eq!(pools[0].0.disk_mib, cfg.defaults.disk_mib);
        validate_config(&cfg).unwrap();
        cfg.pool.memory_budget_mib = 255;
        let e = validate_config(&cfg).unwrap_err();
        assert!(
            e.to_string().contains("256 MiB") && e.to_string().contains("255 MiB"),
            "{e}"
        );
        cfg.pool.memory_budget_mib = 1000;
        cfg.pool.pools[0].image = "NOT a reference".into();
        assert!(matches!(validate_config(&cfg), Err(PoolError::Invalid(_))));
        cfg.pool.pools.clear();
        cfg.pool.refill_concurrency = 0;
        assert!(validate_config(&cfg).is_err());
    }

    #[test]
    fn instance_types_are_checked() {
        let d = Config::default().defaults;
        assert!(crate::model::normalize_type(None, &d, "instance_type").is_ok());
        let small = pb::InstanceType {
            memory_mib: 8,
            ..Default::default()
        };
        assert!(crate::model::normalize_type(Some(small), &d, "instance_type").is_err());
        assert!(key_of("", None, &d).is_err());
        assert!(check_size(MAX_SIZE + 1).is_err());
    }
}
