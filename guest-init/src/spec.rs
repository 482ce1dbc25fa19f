//! The instance spec: defaults, validation, and the JSON form standalone mode reads.
//!
//! The agent sends an `InstanceSpec` (protobuf); standalone mode reads the same fields from a
//! JSON file ([`StandaloneSpec`]). Either way [`validate`] checks it before anything is mounted
//! or spawned, so a bad spec changes nothing and is reported as `INIT_ERROR_KIND_BAD_SPEC`.

use std::{net::IpAddr, path::Path, time::Duration};

use hearth_proto::init::{self as proto, InstanceSpec};
use serde::Deserialize;

use crate::{net::parse_cidr, workload::rlimit};

/// Every default hearth-init applies to an absent or zero spec field, in one place.
pub mod defaults {
    use std::time::Duration;

    /// `PATH` of the workload when the image's environment has none.
    pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    /// Working directory when `working_dir` is empty.
    pub const WORKING_DIR: &str = "/";
    /// Interface configured when `network.interface` is empty.
    pub const INTERFACE: &str = "eth0";
    /// How long init waits for the network interface to appear (the agent moves it in).
    pub const INTERFACE_WAIT: Duration = Duration::from_secs(10);
    /// Interval of `Metrics` frames when `metrics_interval_millis` is 0.
    pub const METRICS_INTERVAL: Duration = Duration::from_secs(1);
    /// Readiness timeout when `readiness.timeout_millis` is 0.
    pub const READINESS_TIMEOUT: Duration = Duration::from_secs(60);
    /// First readiness poll interval; doubled up to [`READINESS_MAX_POLL`].
    pub const READINESS_FIRST_POLL: Duration = Duration::from_millis(1);
    /// Longest readiness poll interval.
    pub const READINESS_MAX_POLL: Duration = Duration::from_millis(100);
    /// Stop grace for a Ctrl-Alt-Del or SIGTERM/SIGINT to init when `default_grace_millis` is 0.
    pub const GRACE: Duration = Duration::from_secs(15 * 60);
    /// Stop signal when `stop_signal` is 0.
    pub const STOP_SIGNAL: i32 = libc::SIGTERM;
    /// Writable layer size when `root.disk_size_bytes` is 0 (tmpfs upper only).
    pub const DISK_SIZE: u64 = 1 << 30;
    /// Timeout of an `Exec` whose `timeout_millis` is 0.
    pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
    /// Most bytes of stdout and of stderr an `ExecResult` carries (the rest is cut).
    pub const EXEC_OUTPUT_MAX: usize = 256 * 1024;
    /// After the workload exits: how long init waits for its output pipes to close.
    pub const DRAIN_WAIT: Duration = Duration::from_secs(2);
    /// After `Exited`: how long init waits to deliver everything and for the agent to close the
    /// connection (including reconnecting if the agent is away) before it ends anyway.
    pub const EXIT_LINGER: Duration = Duration::from_secs(10);
    /// How long init waits for `Welcome` after sending `Hello`.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// First reconnect delay; doubled up to [`RECONNECT_MAX`].
    pub const RECONNECT_FIRST: Duration = Duration::from_millis(10);
    /// Longest reconnect delay.
    pub const RECONNECT_MAX: Duration = Duration::from_secs(1);
}

/// Why a spec is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Neither entrypoint nor cmd.
    #[error("The spec has no entrypoint and no cmd")]
    NoCommand,
    /// The command's first word is empty.
    #[error("The spec's command starts with an empty word")]
    EmptyProgram,
    /// An env entry without `=` or with an empty name.
    #[error("Environment entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    /// A path that must be absolute is not.
    #[error("{what} {path:?} is not an absolute path")]
    NotAbsolute {
        /// Which field.
        what: &'static str,
        /// The value.
        path: String,
    },
    /// The hostname is not a valid host name.
    #[error("Hostname {0:?} is not 1 to 64 letters, digits, '-' or '.'")]
    BadHostname(String),
    /// The root image is missing or its filesystem unsupported.
    #[error("Root filesystem: {0}")]
    BadRoot(String),
    /// A readiness port is out of range.
    #[error("Readiness port {0} is not in 1..=65535")]
    BadPort(u32),
    /// The network section is malformed.
    #[error("Network: {0}")]
    BadNetwork(String),
    /// An rlimit is unknown or inconsistent.
    #[error("Rlimit: {0}")]
    BadRlimit(String),
    /// A mount is malformed.
    #[error("Mount at {target:?}: {why}")]
    BadMount {
        /// The target.
        target: String,
        /// What is wrong.
        why: String,
    },
    /// A signal number is out of range.
    #[error("Stop signal {0} is not a valid signal")]
    BadSignal(i32),
    /// The standalone spec file is unreadable or not valid JSON for the format.
    #[error("Standalone spec {path}: {why}")]
    Standalone {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// The workload's argv: entrypoint followed by cmd.
pub fn argv(spec: &InstanceSpec) -> Vec<String> {
    spec.entrypoint.iter().chain(&spec.cmd).cloned().collect()
}

/// The working directory (default `/`).
pub fn working_dir(spec: &InstanceSpec) -> &str {
    if spec.working_dir.is_empty() {
        defaults::WORKING_DIR
    } else {
        &spec.working_dir
    }
}

/// The metrics interval.
pub fn metrics_interval(spec: &InstanceSpec) -> Duration {
    match spec.metrics_interval_millis {
        0 => defaults::METRICS_INTERVAL,
        ms => Duration::from_millis(u64::from(ms).max(10)),
    }
}

/// The readiness timeout.
pub fn readiness_timeout(spec: &InstanceSpec) -> Duration {
    match spec.readiness.as_ref().map_or(0, |r| r.timeout_millis) {
        0 => defaults::READINESS_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
}

/// The readiness ports (validated to fit `u16`).
pub fn readiness_ports(spec: &InstanceSpec) -> Vec<u16> {
    spec.readiness
        .as_ref()
        .map(|r| {
            r.ports
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The stop signal and grace used for a stop init decides on (Ctrl-Alt-Del, SIGTERM to init).
pub fn default_stop(spec: &InstanceSpec) -> (i32, Duration) {
    let signal = if spec.stop_signal == 0 {
        defaults::STOP_SIGNAL
    } else {
        spec.stop_signal
    };
    let grace = match spec.default_grace_millis {
        0 => defaults::GRACE,
        ms => Duration::from_millis(ms),
    };
    (signal, grace)
}

/// The hostname: the spec's, else the instance id cut to a valid name, else `hearth`.
pub fn hostname(spec: &InstanceSpec) -> String {
    if !spec.hostname.is_empty() {
        return spec.hostname.clone();
    }
    let from_id: String = spec
        .instance_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(63)
        .collect();
    if from_id.is_empty() {
        "hearth".into()
    } else {
        from_id
    }
}

fn valid_hostname(h: &str) -> bool {
    (1..=64).contains(&h.len())
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn absolute(what: &'static str, path: &str) -> Result<(), SpecError> {
    if Path::new(path).is_absolute() {
        Ok(())
    } else {
        Err(SpecError::NotAbsolute {
            what,
            path: path.into(),
        })
    }
}

/// Checks everything that can be checked before touching the system.
pub fn validate(spec: &InstanceSpec) -> Result<(), SpecError> {
    let argv = argv(spec);
    match argv.first() {
        None => return Err(SpecError::NoCommand),
        Some(p) if p.is_empty() => return Err(SpecError::EmptyProgram),
        Some(_) => {}
    }
    for e in &spec.env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() && !k.contains('\0') => {}
            _ => return Err(SpecError::BadEnv(e.clone())),
        }
    }
    if !spec.working_dir.is_empty() {
        absolute("Working directory", &spec.working_dir)?;
    }
    let host = hostname(spec);
    if !valid_hostname(&host) {
        return Err(SpecError::BadHostname(host));
    }
    let root = spec
        .root
        .as_ref()
        .ok_or_else(|| SpecError::BadRoot("the spec has no root section".into()))?;
    if root.image.is_empty() {
        return Err(SpecError::BadRoot("root.image is empty".into()));
    }
    absolute("Root image", &root.image)?;
    if !matches!(root.fstype.as_str(), "erofs" | "ext4" | "squashfs") {
        return Err(SpecError::BadRoot(format!(
            "fstype {:?} is not erofs, ext4 or squashfs",
            root.fstype
        )));
    }
    if !root.scratch_device.is_empty() {
        absolute("Scratch device", &root.scratch_device)?;
    }
    if let Some(r) = &spec.readiness
        && let Some(bad) = r.ports.iter().find(|p| !(1..=65535).contains(*p))
    {
        return Err(SpecError::BadPort(*bad));
    }
    if let Some(net) = &spec.network {
        validate_network(net)?;
    }
    for r in &spec.rlimits {
        rlimit::Rlimit::from_spec(r)?;
    }
    for m in &spec.mounts {
        validate_mount(m)?;
    }
    if spec.stop_signal != 0 && nix::sys::signal::Signal::try_from(spec.stop_signal).is_err() {
        return Err(SpecError::BadSignal(spec.stop_signal));
    }
    Ok(())
}

fn validate_network(net: &proto::Network) -> Result<(), SpecError> {
    let bad = |s: String| SpecError::BadNetwork(s);
    if net.interface.len() > 15 || net.interface.contains('/') {
        return Err(bad(format!(
            "interface name {:?} is invalid",
            net.interface
        )));
    }
    for a in &net.addresses {
        parse_cidr(a).map_err(|e| bad(e.to_string()))?;
    }
    for (gw, v4) in [(&net.gateway_v4, true), (&net.gateway_v6, false)] {
        if gw.is_empty() {
            continue;
        }
        match gw.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv4() == v4 => {}
            _ => {
                return Err(bad(format!(
                    "gateway {gw:?} is not an IPv{}",
                    if v4 { 4 } else { 6 }
                )));
            }
        }
    }
    for d in &net.dns_servers {
        d.parse::<IpAddr>()
            .map_err(|_| bad(format!("DNS server {d:?} is not an IP address")))?;
    }
    for h in &net.hosts {
        if h.contains('\n') {
            return Err(bad(format!("hosts line {h:?} contains a newline")));
        }
    }
    for s in &net.dns_search {
        if s.contains(char::is_whitespace) {
            return Err(bad(format!("DNS search domain {s:?} contains white space")));
        }
    }
    if net.mtu != 0 && !(68..=65535).contains(&net.mtu) {
        return Err(bad(format!("MTU {} is not in 68..=65535", net.mtu)));
    }
    Ok(())
}

fn validate_mount(m: &proto::Mount) -> Result<(), SpecError> {
    absolute("Mount target", &m.target)?;
    if m.target == "/" || m.target.split('/').any(|c| c == "..") {
        return Err(SpecError::BadMount {
            target: m.target.clone(),
            why: "the target must be below / without `..`".into(),
        });
    }
    let bind = m.options.iter().any(|o| o == "bind" || o == "rbind");
    if m.fstype.is_empty() && !bind {
        return Err(SpecError::BadMount {
            target: m.target.clone(),
            why: "no fstype and not a bind mount".into(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Standalone JSON
// ---------------------------------------------------------------------------------------------

/// The spec file of standalone mode (`hearth.standalone=PATH`): the fields of `InstanceSpec`
/// in JSON, with the same names; every field is optional except what [`validate`] requires.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandaloneSpec {
    /// `InstanceSpec.instance_id`.
    pub instance_id: String,
    /// `InstanceSpec.entrypoint`.
    pub entrypoint: Vec<String>,
    /// `InstanceSpec.cmd`.
    pub cmd: Vec<String>,
    /// `InstanceSpec.env` ("KEY=VALUE").
    pub env: Vec<String>,
    /// `InstanceSpec.working_dir`.
    pub working_dir: String,
    /// `InstanceSpec.user`.
    pub user: String,
    /// `InstanceSpec.hostname`.
    pub hostname: String,
    /// `InstanceSpec.network`.
    pub network: Option<NetworkJson>,
    /// `InstanceSpec.mounts`.
    pub mounts: Vec<MountJson>,
    /// `InstanceSpec.rlimits`.
    pub rlimits: Vec<RlimitJson>,
    /// `InstanceSpec.root`.
    pub root: Option<RootJson>,
    /// `InstanceSpec.readiness`.
    pub readiness: Option<ReadinessJson>,
    /// `InstanceSpec.metrics_interval_millis`.
    pub metrics_interval_millis: u32,
    /// `InstanceSpec.memory_limit_bytes`.
    pub memory_limit_bytes: u64,
    /// `InstanceSpec.stop_signal`.
    pub stop_signal: i32,
    /// `InstanceSpec.default_grace_millis`.
    pub default_grace_millis: u64,
}

/// `Network` in JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct NetworkJson {
    pub interface: String,
    pub addresses: Vec<String>,
    pub gateway_v4: String,
    pub gateway_v6: String,
    pub dns_servers: Vec<String>,
    pub dns_search: Vec<String>,
    pub mtu: u32,
    pub hosts: Vec<String>,
}

/// `Mount` in JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct MountJson {
    pub source: String,
    pub target: String,
    pub fstype: String,
    pub options: Vec<String>,
    pub read_only: bool,
}

/// `Rlimit` in JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RlimitJson {
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

/// `RootFs` in JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RootJson {
    pub image: String,
    pub fstype: String,
    pub scratch_device: String,
    pub disk_size_bytes: u64,
}

/// `Readiness` in JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ReadinessJson {
    pub ports: Vec<u32>,
    pub timeout_millis: u64,
}

impl From<StandaloneSpec> for InstanceSpec {
    fn from(s: StandaloneSpec) -> Self {
        InstanceSpec {
            instance_id: s.instance_id,
            entrypoint: s.entrypoint,
            cmd: s.cmd,
            env: s.env,
            working_dir: s.working_dir,
            user: s.user,
            hostname: s.hostname,
            network: s.network.map(|n| proto::Network {
                interface: n.interface,
                addresses: n.addresses,
                gateway_v4: n.gateway_v4,
                gateway_v6: n.gateway_v6,
                dns_servers: n.dns_servers,
                dns_search: n.dns_search,
                mtu: n.mtu,
                hosts: n.hosts,
            }),
            mounts: s
                .mounts
                .into_iter()
                .map(|m| proto::Mount {
                    source: m.source,
                    target: m.target,
                    fstype: m.fstype,
                    options: m.options,
                    read_only: m.read_only,
                })
                .collect(),
            rlimits: s
                .rlimits
                .into_iter()
                .map(|r| proto::Rlimit {
                    resource: r.resource,
                    soft: r.soft,
                    hard: r.hard,
                })
                .collect(),
            root: s.root.map(|r| proto::RootFs {
                image: r.image,
                fstype: r.fstype,
                scratch_device: r.scratch_device,
                disk_size_bytes: r.disk_size_bytes,
            }),
            readiness: s.readiness.map(|r| proto::Readiness {
                ports: r.ports,
                timeout_millis: r.timeout_millis,
            }),
            metrics_interval_millis: s.metrics_interval_millis,
            memory_limit_bytes: s.memory_limit_bytes,
            stop_signal: s.stop_signal,
            default_grace_millis: s.default_grace_millis,
        }
    }
}

/// Parses a standalone spec file's contents.
pub fn parse_standalone(path: &str, json: &[u8]) -> Result<InstanceSpec, SpecError> {
    let spec: StandaloneSpec = serde_json::from_slice(json).map_err(|e| SpecError::Standalone {
        path: path.into(),
        why: e.to_string(),
    })?;
    Ok(spec.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> InstanceSpec {
        InstanceSpec {
            instance_id: "web-1".into(),
            entrypoint: vec!["/bin/httpd".into()],
            cmd: vec!["-f".into()],
            env: vec!["A=1".into(), "EMPTY=".into()],
            root: Some(proto::RootFs {
                image: "/dev/vda".into(),
                fstype: "erofs".into(),
                ..Default::default()
            }),
            readiness: Some(proto::Readiness {
                ports: vec![8080],
                timeout_millis: 0,
            }),
            network: Some(proto::Network {
                addresses: vec!["10.0.0.2/24".into(), "fd00::2/64".into()],
                gateway_v4: "10.0.0.1".into(),
                dns_servers: vec!["10.0.0.1".into()],
                mtu: 1400,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn good_spec_and_defaults() {
        let s = good();
        validate(&s).unwrap();
        assert_eq!(argv(&s), vec!["/bin/httpd", "-f"]);
        assert_eq!(working_dir(&s), "/");
        assert_eq!(hostname(&s), "web-1");
        assert_eq!(readiness_ports(&s), vec![8080]);
        assert_eq!(readiness_timeout(&s), defaults::READINESS_TIMEOUT);
        assert_eq!(metrics_interval(&s), defaults::METRICS_INTERVAL);
        assert_eq!(default_stop(&s), (libc::SIGTERM, defaults::GRACE));
    }

    #[test]
    fn bad_specs_say_why() {
        type Mutation = fn(&mut InstanceSpec);
        let cases: Vec<(Mutation, &str)> = vec![
            (
                |s| {
                    s.entrypoint.clear();
                    s.cmd.clear();
                },
                "no entrypoint",
            ),
            (|s| s.env.push("NOEQUALS".into()), "KEY=VALUE"),
            (|s| s.working_dir = "rel".into(), "absolute"),
            (|s| s.hostname = "bad host".into(), "Hostname"),
            (|s| s.root = None, "root section"),
            (
                |s| s.root.as_mut().unwrap().fstype = "vfat".into(),
                "fstype",
            ),
            (|s| s.readiness.as_mut().unwrap().ports.push(70000), "70000"),
            (
                |s| s.network.as_mut().unwrap().gateway_v4 = "fd00::1".into(),
                "gateway",
            ),
            (
                |s| {
                    s.network
                        .as_mut()
                        .unwrap()
                        .addresses
                        .push("10.0.0.3".into())
                },
                "ADDRESS/PREFIX",
            ),
            (
                |s| {
                    s.rlimits.push(proto::Rlimit {
                        resource: "nofiles".into(),
                        soft: 1,
                        hard: 1,
                    })
                },
                "nofiles",
            ),
            (
                |s| {
                    s.mounts.push(proto::Mount {
                        target: "/a/../../etc".into(),
                        fstype: "tmpfs".into(),
                        ..Default::default()
                    })
                },
                "..",
            ),
            (|s| s.stop_signal = 99, "99"),
        ];
        for (mutate, needle) in cases {
            let mut s = good();
            mutate(&mut s);
            let err = validate(&s).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
        }
    }

    #[test]
    fn standalone_json() {
        let json = br#"{
            "instance_id": "e2e",
            "entrypoint": ["/bin/sh", "-c"],
            "cmd": ["echo hello"],
            "root": {"image": "/dev/vda", "fstype": "erofs", "disk_size_bytes": 67108864},
            "network": {"addresses": ["10.0.2.15/24"], "gateway_v4": "10.0.2.2"},
            "readiness": {"ports": [80]}
        }"#;
        let s = parse_standalone("/spec.json", json).unwrap();
        validate(&s).unwrap();
        assert_eq!(argv(&s), vec!["/bin/sh", "-c", "echo hello"]);
        assert_eq!(s.root.unwrap().disk_size_bytes, 64 << 20);
        let err = parse_standalone("/spec.json", br#"{"entrypoint": [], "cmdd": []}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cmdd"), "{err}");
    }
}
