//! Assembles the agent from its config and runs it: the store, the runtime (exactly the one
//! configured), the instance manager (re-adopting what runs), the API listeners and the
//! metrics endpoint. [`Daemon::shutdown`] drains the API, optionally stops the instances, and
//! detaches from the rest, which keep running.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::net::{TcpListener, UnixListener};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{AgentService, server},
    config::{Config, RuntimeKind},
    events::EventLog,
    images::ImageCache,
    instance::{InstanceError, Manager, network::NodeNet, router::NodeRouter},
    model::pb,
    runtime::{self, Runtime, RuntimeError, Virtualization, cgroup::Layout},
    store::{Store, StoreError},
};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A directory could not be created.
    #[error("Cannot create directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// The store could not be opened.
    #[error("Cannot open the state store")]
    Store(#[from] StoreError),
    /// The configured runtime cannot run here.
    #[error("The configured runtime cannot start")]
    Runtime(#[from] RuntimeError),
    /// Instances could not be loaded or re-adopted.
    #[error("Cannot load the instances")]
    Instances(#[from] InstanceError),
    /// A listener failed.
    #[error("Cannot set up a listener")]
    Api(#[from] server::ApiError),
    /// The node network could not be set up.
    #[error("Cannot set up the node network")]
    Network(#[from] crate::instance::network::NetworkError),
    /// The warm pools could not be set up.
    #[error("Cannot set up the warm pools")]
    Pool(#[from] crate::pool::PoolError),
    /// The ingress proxy could not be set up.
    #[error("Cannot set up the ingress proxy")]
    Ingress(#[from] crate::ingress::IngressError),
    /// The config is invalid.
    #[error("Invalid config")]
    Config(#[from] crate::config::ConfigError),
}

/// The node: what the API handlers and the ingress router reach.
pub struct Node {
    /// The config.
    pub cfg: Arc<Config>,
    /// The instances.
    pub mgr: Arc<Manager>,
    /// The node name.
    pub name: String,
    /// Hardware virtualization on this host.
    pub virt: Virtualization,
    /// The warm pools.
    pub pool: crate::pool::WarmPool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn meminfo_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

fn disk_mib(path: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available() * s.fragment_size() / (1 << 20))
        .unwrap_or(0)
}

impl Node {
    /// GetNode.
    pub fn info(&self) -> Result<pb::Node, StoreError> {
        let (allocated, instances, running) = self.mgr.allocated();
        Ok(pb::Node {
            name: self.name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            runtime: self.mgr.runtime.kind().as_str().into(),
            hardware_virtualization: self.virt.hardware,
            virtualization_note: self.virt.note.clone(),
            capacity: Some(pb::Resources {
                vcpus: std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
                memory_mib: meminfo_total_mib(),
                disk_mib: disk_mib(&self.cfg.state_dir),
            }),
            allocated: Some(allocated),
            instances,
            instances_running: running,
            warm_pool: self.pool.node_entries(),
            last_event_seq: self.mgr.events.last_seq()?,
            started_at_unix_nanos: self.mgr.started_at(),
        })
    }

    /// Metrics of one instance.
    pub fn metrics(&self, id: &str) -> Result<pb::InstanceMetrics, InstanceError> {
        self.mgr.metrics(id)
    }

    /// Metrics of every instance.
    pub fn all_metrics(&self) -> Vec<pb::InstanceMetrics> {
        self.mgr
            .entries()
            .iter()
            .map(|e| self.mgr.metrics_of(e))
            .collect()
    }
}

/// The listeners the daemon serves on (bound by the caller, so tests choose free ones).
#[derive(Debug)]
pub struct Listeners {
    /// The API's Unix socket.
    pub api_unix: UnixListener,
    /// The API's TCP + TLS listener, when configured.
    pub api_tcp: Option<TcpListener>,
    /// The Prometheus endpoint, when configured.
    pub metrics: Option<TcpListener>,
    /// The HTTP ingress proxy, when configured.
    pub ingress: Option<TcpListener>,
}

impl Listeners {
    /// Binds what `cfg` asks for.
    pub async fn bind(cfg: &Config) -> Result<Self, DaemonError> {
        let api_unix =
            server::bind_unix(&cfg.api.socket, cfg.api.socket_mode, &cfg.api.socket_group)?;
        let api_tcp = match &cfg.api.tcp {
            Some(t) => Some(
                TcpListener::bind(t.listen)
                    .await
                    .map_err(|e| server::ApiError::Bind(t.listen.to_string().into(), e))?,
            ),
            None => None,
        };
        let metrics = match cfg.metrics.address()? {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| server::ApiError::Bind(a.to_string().into(), e))?,
            ),
            None => None,
        };
        let ingress = match cfg.ingress_address()? {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| server::ApiError::Bind(a.to_string().into(), e))?,
            ),
            None => None,
        };
        Ok(Self {
            api_unix,
            api_tcp,
            metrics,
            ingress,
        })
    }
}

/// A running agent.
pub struct Daemon {
    /// The node.
    pub node: Arc<Node>,
    api_token: CancellationToken,
    api_tasks: TaskTracker,
    sup_token: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

/// Makes the runtime the config names (never another one).
pub fn make_runtime(cfg: &Config, virt: &Virtualization) -> Result<Arc<dyn Runtime>, RuntimeError> {
    Ok(match cfg.runtime {
        RuntimeKind::Sandbox => Arc::new(runtime::sandbox::Sandbox::new(
            cfg.sandbox.init_path.clone(),
            cfg.run_dir.clone(),
            cfg.state_dir.clone(),
            Layout::host(&cfg.cgroup.parent)?,
        )?),
        RuntimeKind::Microvm => Arc::new(runtime::microvm::Microvm::new(
            cfg.microvm.clone(),
            cfg.run_dir.clone(),
            cfg.state_dir.clone(),
            Layout::host(&cfg.cgroup.parent)?,
            virt,
        )?),
    })
}

impl Daemon {
    /// Starts the agent: opens the store, makes the runtime, re-adopts running instances, and
    /// serves the API on `listeners`.
    pub async fn start(
        cfg: Config,
        images: Arc<dyn ImageCache>,
        listeners: Listeners,
    ) -> Result<Self, DaemonError> {
        cfg.validate()?;
        for dir in [&cfg.state_dir, &cfg.run_dir] {
            std::fs::create_dir_all(dir).map_err(|e| DaemonError::Dir(dir.clone(), e))?;
        }
        let cfg = Arc::new(cfg);
        let virt = runtime::detect_virtualization();
        let runtime = make_runtime(&cfg, &virt)?;
        tracing::info!(
            runtime = runtime.kind().as_str(),
            hardware_virtualization = virt.hardware,
            note = %virt.note,
            "runtime ready"
        );
        let store = Arc::new(Store::open(&cfg.state_dir.join("state.redb"))?);
        let pruned = store.prune_events(cfg.events.keep.max(1))?;
        if pruned > 0 {
            tracing::info!(pruned, "deleted the oldest events");
        }
        let events = EventLog::new(store);
        let tracker = TaskTracker::new();
        let sup_token = CancellationToken::new();
        let net = if cfg.networking {
            Some(NodeNet::setup(&cfg.network, &cfg.bpf_root).await?)
        } else {
            None
        };
        let pool =
            crate::pool::WarmPool::new(cfg.clone(), runtime.clone(), net.clone(), images.clone())?;
        let mgr = Manager::new(
            cfg.clone(),
            events,
            runtime,
            images,
            net.clone(),
            tracker.clone(),
            sup_token.clone(),
        )?;
        mgr.adopt().await?;
        // Claimed members of an earlier agent are boots of adopted instances now.
        let in_use: Vec<String> = mgr
            .entries()
            .iter()
            .filter_map(|e| e.private().runtime)
            .filter_map(|rt| rt.dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        pool.run(&in_use, mgr.start_gate()).await;
        mgr.set_pool(pool.clone());
        if let Some(net) = &net {
            net.start_preparing(cfg.runtime, sup_token.clone(), mgr.start_gate());
        }
        let node = Arc::new(Node {
            name: cfg.node_name(),
            cfg: cfg.clone(),
            mgr,
            virt,
            pool,
        });
        let api_token = CancellationToken::new();
        let api_tasks = TaskTracker::new();
        let svc = AgentService::new(node.clone(), api_token.clone());
        {
            let svc = svc.clone();
            let token = api_token.clone();
            let l = listeners.api_unix;
            api_tasks.spawn(async move {
                if let Err(e) = server::serve_unix(l, svc, token).await {
                    tracing::error!(error = %crate::instance::anyhow_chain(&e), "the API on the Unix socket failed");
                }
            });
        }
        if let (Some(l), Some(tcp)) = (listeners.api_tcp, cfg.api.tcp.clone()) {
            // Fail at start, not later, on unreadable TLS files.
            server::tls_config(&tcp)?;
            let svc = svc.clone();
            let token = api_token.clone();
            api_tasks.spawn(async move {
                if let Err(e) = server::serve_tls(l, &tcp, svc, token).await {
                    tracing::error!(error = %crate::instance::anyhow_chain(&e), "the API on TCP failed");
                }
            });
        }
        if let (Some(l), Some(net)) = (listeners.ingress, &net) {
            let router = Arc::new(NodeRouter::new(node.mgr.clone()));
            let ingress = crate::ingress::Ingress::new(
                cfg.ingress.clone(),
                net.plan.ingress_address.into(),
                router,
            )?;
            let token = api_token.clone();
            let tasks = api_tasks.clone();
            api_tasks.spawn(async move { ingress.serve(l, token, tasks).await });
        }
        if let Some(l) = listeners.metrics {
            let node = node.clone();
            let token = api_token.clone();
            api_tasks.spawn(crate::metrics::serve(l, node, token));
        }
        Ok(Self {
            node,
            api_token,
            api_tasks,
            sup_token,
            tracker,
        })
    }

    /// Graceful shutdown: drain the API (up to the drain timeout), stop the instances when
    /// configured to, then detach from the instances that run on.
    pub async fn shutdown(self) {
        let cfg = self.node.cfg.clone();
        self.api_token.cancel();
        self.api_tasks.close();
        if tokio::time::timeout(cfg.api.drain_timeout, self.api_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("API calls still running after the drain timeout");
        }
        // Members wait for workloads this agent would hand out: they do not outlive it.
        self.node.pool.shutdown().await;
        if cfg.lifecycle.stop_instances_on_shutdown {
            self.node
                .mgr
                .stop_all(cfg.defaults.stop_grace.min(Duration::from_secs(300)))
                .await;
        }
        self.sup_token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
