//! The agent's configuration: one TOML file, every key optional.
//!
//! The defaults are written in ONE place, [`DEFAULTS_TOML`], which is also what
//! `hearth-agent --print-defaults` prints and what `docs/agent.md` documents. Unknown keys are
//! errors (`deny_unknown_fields`), so a typo is never silently ignored.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The default configuration, as TOML. Every field of [`Config`] appears here with its default.
pub const DEFAULTS_TOML: &str = r#"# hearth-agent configuration: the defaults.
# Node name reported by GetNode; empty = the host name.
node_name = ""
# Durable state: the instance/event store, instance logs, the image cache.
state_dir = "/var/lib/hearth"
# Sockets and other runtime files.
run_dir = "/run/hearth"
# "microvm" (a hearth-vmm process per instance; needs hardware virtualization) or "sandbox"
# (hearth-init as PID 1 in Linux namespaces; weaker isolation). Never a silent fallback.
runtime = "microvm"
# Node networking: a bridge, an address per instance, veth/TAP, egress NAT, the eBPF policy.
# false: instances get loopback only (and the ingress cannot reach them).
networking = true
# The HTTP ingress proxy's listener; empty = off.
ingress_listen = "0.0.0.0:8080"
# bpffs directory for the instances' eBPF programs.
bpf_root = "/sys/fs/bpf/hearth"

[network]
# The node network; every key and its default is in docs/networking.md (subnet 10.88.0.0/16,
# bridge hearth0, interface prefix hth, gateway .1, ingress address .2, resolver from
# /etc/resolv.conf, MTU 1500, nftables table hearth).

[ingress]
# The ingress proxy; every key and its default is in docs/networking.md (routing by the
# x-hearth-instance header or <id>.<domain>, start_on_request = false, ...).

[api]
# The gRPC API on a Unix socket.
socket = "/run/hearth/agent.sock"
# Mode of the socket file (octal).
socket_mode = 0o660
# Group owning the socket file (its members may use the API); empty = the agent's own group.
socket_group = ""
# Seconds a SIGTERM waits for in-flight calls before the API closes.
drain_timeout = "10s"
# Optional TCP listener with TLS and client-certificate authentication:
# [api.tcp]
# listen = "0.0.0.0:7443"
# cert = "/etc/hearth/agent.crt"
# key = "/etc/hearth/agent.key"
# client_ca = "/etc/hearth/clients-ca.crt"

[metrics]
# Prometheus text endpoint (GET /metrics); empty = off.
listen = "127.0.0.1:9464"

[lifecycle]
# How long hearth-init has to connect after a boot before the instance fails.
init_connect_timeout = "30s"
# After a stop's grace ends, how long hearth-init has to report the exit before the VMM or
# sandbox is killed.
kill_margin = "5s"
# What SIGTERM to the agent does to running instances: false leaves them running (the agent
# re-adopts them when it comes back).
stop_instances_on_shutdown = false
# After activity_expired (with the stop action), how long a RenewActivity can still cancel the
# stop.
expiry_stop_delay = "0s"

[events]
# Events kept in the store (the oldest are deleted at start beyond this); seqs never restart.
keep = 1000000

[defaults]
# Used for fields an instance spec leaves out.
vcpus = 1
memory_mib = 256
disk_mib = 1024
sleep_after = "10m"
stop_grace = "15m"
default_port = 8080

[logs]
# Instance log files are rotated at this size; this many files are kept per instance.
max_file_bytes = 8388608
max_files = 4

[cgroup]
# Instance cgroups live at <agent's own cgroup>/<parent>/<instance id> in every controller the
# agent uses (cgroup v2, or the v1 memory/cpu/pids hierarchies on hybrid hosts).
parent = "hearth"

[sandbox]
# The static hearth-init binary started as PID 1 of every sandbox.
init_path = "/usr/libexec/hearth/hearth-init"

[microvm]
# The hearth-vmm binary, the guest kernel, and what is added to its command line.
vmm_path = "/usr/libexec/hearth/hearth-vmm"
kernel = "/usr/libexec/hearth/vmlinux"
initrd = ""
kernel_cmdline = ""
# Ignore hardware-virtualization detection (tests with no_std guests on PVM hosts).
allow_without_hardware_virtualization = false

[images]
# The image cache directory; empty = <state_dir>/images.
dir = ""
# Registries reached over plain HTTP ("host:port").
insecure_registries = []
# Pull an image that is not cached when an instance is created from it.
pull_on_create = true
# Disk budget of the cache in bytes (0 = no limit).
budget_bytes = 0
# Layers are unpacked on this tmpfs before mkfs (thousands of small files are cheap there and
# costly on a disk file system); its pages are RAM charged to the agent's cgroup. Used when the
# estimated unpacked image fits staging_tmpfs_max_bytes, the tmpfs's free space and half the
# available memory, else the cache's tmp/ on disk. "" = always on disk.
staging_tmpfs = "/dev/shm"
staging_tmpfs_max_bytes = 4294967296
# Unpacked base-layer trees kept (on the staging tmpfs when used, so RAM) to speed up pulls of
# images that share base layers; least recently used go first (0 = keep none).
layer_tree_cache_bytes = 1073741824

[pool]
# Warm pools: instances booted ahead of demand (sandbox or VM up, hearth-init connected and
# waiting for its spec), per image and instance type. A start whose image digest and instance
# type match a pool takes a ready member instead of booting; a member serves one instance and
# is destroyed with it. SetWarmPool (`hearthctl pool set`) changes targets at run time; those
# are kept in <state_dir>/warm_pools.json and win over the pools below.
# Memory (MiB, by the members' instance types) all members together may hold; 0 = no pools.
memory_budget_mib = 2048
# Members booting at once while the pools refill.
refill_concurrency = 2
# An unclaimed member older than this is replaced by a fresh one ("0s": never).
idle_ttl = "10m"
# Pools kept from the start: image and size, and vcpus, memory_mib, disk_mib (the [defaults]
# when left out), e.g. pools = [{ image = "registry.example/web:v1", size = 2 }]
pools = []
"#;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("Invalid config")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("Invalid config: {0}")]
    Invalid(String),
}

/// Which runtime instances run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A hearth-vmm microVM per instance.
    Microvm,
    /// hearth-init in Linux namespaces.
    Sandbox,
}

impl RuntimeKind {
    /// The name used in the config and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Microvm => "microvm",
            Self::Sandbox => "sandbox",
        }
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "microvm" => Ok(Self::Microvm),
            "sandbox" => Ok(Self::Sandbox),
            _ => Err(format!("unknown runtime {s:?} (microvm or sandbox)")),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name (empty: the host name).
    pub node_name: String,
    /// Durable state directory.
    pub state_dir: PathBuf,
    /// Runtime files directory.
    pub run_dir: PathBuf,
    /// The runtime.
    pub runtime: RuntimeKind,
    /// Whether instances get a network.
    pub networking: bool,
    /// The ingress proxy's listener (empty: off).
    pub ingress_listen: String,
    /// bpffs directory for the eBPF programs.
    pub bpf_root: PathBuf,
    /// The node network.
    #[serde(default)]
    pub network: crate::net::NetConfig,
    /// The ingress proxy.
    #[serde(default)]
    pub ingress: crate::ingress::IngressConfig,
    /// The gRPC API.
    pub api: ApiConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Lifecycle timing.
    pub lifecycle: LifecycleConfig,
    /// Event retention.
    pub events: EventsConfig,
    /// Defaults for instance specs.
    pub defaults: InstanceDefaults,
    /// Instance logs.
    pub logs: LogsConfig,
    /// Instance cgroups.
    pub cgroup: CgroupConfig,
    /// The sandbox runtime.
    pub sandbox: SandboxConfig,
    /// The microvm runtime.
    pub microvm: MicrovmConfig,
    /// The image cache.
    pub images: ImagesConfig,
    /// Warm pools.
    pub pool: PoolConfig,
}

/// The gRPC API listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Mode of the socket file.
    pub socket_mode: u32,
    /// Group owning the socket file (empty: the agent's group).
    pub socket_group: String,
    /// How long a shutdown waits for in-flight calls.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// The optional TCP + TLS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpApiConfig>,
}

/// TCP + TLS listener with client-certificate authentication.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpApiConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The server certificate chain (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address; empty string = off.
    pub listen: String,
}

impl MetricsConfig {
    /// The address to listen on, if enabled.
    pub fn address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "metrics.listen {:?} is not an address",
                self.listen
            ))
        })
    }
}

/// Lifecycle timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// Time for hearth-init to connect after a boot.
    #[serde(with = "humantime_serde")]
    pub init_connect_timeout: Duration,
    /// Time after a grace for init to report before the runtime is killed.
    #[serde(with = "humantime_serde")]
    pub kill_margin: Duration,
    /// Whether SIGTERM to the agent stops instances.
    pub stop_instances_on_shutdown: bool,
    /// Time between activity_expired and the stop it causes.
    #[serde(with = "humantime_serde")]
    pub expiry_stop_delay: Duration,
}

/// Event retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Events kept.
    pub keep: u64,
}

/// Defaults for fields an instance spec leaves out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceDefaults {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Writable layer size in MiB.
    pub disk_mib: u64,
    /// Inactivity before activity_expired.
    #[serde(with = "humantime_serde")]
    pub sleep_after: Duration,
    /// Stop grace.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// HTTP port when neither the spec nor the image names one.
    pub default_port: u32,
}

/// Instance log files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// Rotation size.
    pub max_file_bytes: u64,
    /// Files kept per instance (the current one included).
    pub max_files: u32,
}

/// Instance cgroups.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupConfig {
    /// Subtree below the agent's own cgroup.
    pub parent: String,
}

/// The sandbox runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// The static hearth-init.
    pub init_path: PathBuf,
}

/// The microvm runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicrovmConfig {
    /// hearth-vmm.
    pub vmm_path: PathBuf,
    /// Guest kernel (vmlinux ELF).
    pub kernel: PathBuf,
    /// Optional initrd (empty: none).
    pub initrd: PathBuf,
    /// Extra kernel command line.
    pub kernel_cmdline: String,
    /// Run even where detection finds no hardware virtualization.
    pub allow_without_hardware_virtualization: bool,
}

/// The image cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    /// Cache directory (empty: `<state_dir>/images`).
    pub dir: PathBuf,
    /// Registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Pull on create when not cached.
    pub pull_on_create: bool,
    /// Disk budget (0: none).
    pub budget_bytes: u64,
    /// Tmpfs to unpack layers on (empty: on disk).
    pub staging_tmpfs: PathBuf,
    /// Largest estimated unpacked image staged on the tmpfs.
    pub staging_tmpfs_max_bytes: u64,
    /// Unpacked base-layer trees kept for later pulls (0: none).
    pub layer_tree_cache_bytes: u64,
}

/// Warm pools.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Memory all members together may hold (MiB; 0: no pools).
    pub memory_budget_mib: u64,
    /// Members booting at once.
    pub refill_concurrency: u32,
    /// Age at which an unclaimed member is replaced (0: never).
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// Pools kept from the start.
    pub pools: Vec<PoolEntryConfig>,
}

/// One pool of the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolEntryConfig {
    /// Image reference.
    pub image: String,
    /// Members to keep ready.
    pub size: u32,
    /// vCPUs (default: `defaults.vcpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory in MiB (default: `defaults.memory_mib`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Writable layer in MiB (default: `defaults.disk_mib`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str(DEFAULTS_TOML).expect("the embedded defaults parse")
    }
}

/// Merges `overlay` into `base`, table by table (keys in `overlay` win).
fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

impl Config {
    /// Parses a config file's text; keys it leaves out take their defaults.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut value: toml::Value = toml::from_str(DEFAULTS_TOML)?;
        let overlay: toml::Value = toml::from_str(text)?;
        merge(&mut value, overlay);
        let config: Config = value.try_into()?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Checks ranges the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.defaults;
        if d.vcpus == 0 || d.memory_mib == 0 || d.disk_mib == 0 {
            return Err(ConfigError::Invalid(
                "defaults.vcpus, memory_mib and disk_mib must be above 0".into(),
            ));
        }
        if d.default_port == 0 || d.default_port > 65535 {
            return Err(ConfigError::Invalid(
                "defaults.default_port must be 1-65535".into(),
            ));
        }
        if self.logs.max_files == 0 || self.logs.max_file_bytes < 4096 {
            return Err(ConfigError::Invalid(
                "logs.max_files must be above 0 and logs.max_file_bytes at least 4096".into(),
            ));
        }
        if self.cgroup.parent.is_empty()
            || self.cgroup.parent.contains("..")
            || self.cgroup.parent.starts_with('/')
        {
            return Err(ConfigError::Invalid(
                "cgroup.parent must be a relative path without ..".into(),
            ));
        }
        self.metrics.address()?;
        self.ingress_address()?;
        crate::pool::validate_config(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The ingress listener address, if enabled.
    pub fn ingress_address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.ingress_listen.is_empty() || !self.networking {
            return Ok(None);
        }
        self.ingress_listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "ingress_listen {:?} is not an address",
                self.ingress_listen
            ))
        })
    }

    /// The node name (the host name when not configured).
    pub fn node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into())
    }

    /// The image cache directory.
    pub fn images_dir(&self) -> PathBuf {
        if self.images.dir.as_os_str().is_empty() {
            self.state_dir.join("images")
        } else {
            self.images.dir.clone()
        }
    }

    /// Renders the config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.runtime, RuntimeKind::Microvm);
        assert_eq!(c.defaults.sleep_after, Duration::from_secs(600));
        assert_eq!(c.defaults.stop_grace, Duration::from_secs(900));
        assert_eq!(c.api.socket_mode, 0o660);
        assert!(c.api.tcp.is_none());
    }

    #[test]
    fn partial_file_overrides_only_its_keys() {
        let c = Config::from_toml(
            "runtime = \"sandbox\"\n[defaults]\nsleep_after = \"2s\"\n[api]\nsocket = \"/tmp/x.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.runtime, RuntimeKind::Sandbox);
        assert_eq!(c.defaults.sleep_after, Duration::from_secs(2));
        assert_eq!(c.defaults.stop_grace, Duration::from_secs(900));
        assert_eq!(c.api.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.api.socket_mode, 0o660);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(Config::from_toml("runtim = \"sandbox\"").is_err());
        assert!(Config::from_toml("[defaults]\nsleep_afterr = \"1s\"").is_err());
        assert!(Config::from_toml("runtime = \"qemu\"").is_err());
        assert!(Config::from_toml("[cgroup]\nparent = \"../x\"").is_err());
        assert!(Config::from_toml("[metrics]\nlisten = \"nope\"").is_err());
    }

    #[test]
    fn docs_show_the_defaults_verbatim() {
        let doc = include_str!("../../docs/agent.md");
        assert!(
            doc.contains(DEFAULTS_TOML),
            "docs/agent.md must quote DEFAULTS_TOML exactly"
        );
    }

    #[test]
    fn round_trips_through_toml() {
        let c = Config::default();
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }
}
