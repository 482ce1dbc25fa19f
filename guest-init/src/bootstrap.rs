//! The `hearth.*` options hearth-init starts from.
//!
//! In a microVM they come from `/proc/cmdline`: the kernel does not hand dotted parameters to
//! init's argv or environment. In the sandbox the agent passes the same `hearth.key=value` words
//! as init's arguments (or in the [`OPTIONS_ENV`] environment variable). Where they come from also decides the [`Mode`]. `docs/hearth-init.md`
//! lists every option.

use std::{collections::BTreeMap, path::PathBuf};

/// Prefix of every option hearth-init reads.
pub const PREFIX: &str = "hearth.";

/// Environment variable with the options (whitespace-separated `hearth.*` words) for a sandbox
/// launcher that cannot pass arguments; arguments win when both are given.
pub const OPTIONS_ENV: &str = "HEARTH_INIT_OPTIONS";

/// The physical address of the VMM's boot timer (Firecracker's convention, kept by hearth-vmm).
pub const DEFAULT_BOOT_TIMER_ADDR: u64 = 0xc000_0000;

/// Why the bootstrap options are unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootstrapError {
    /// An option appeared twice.
    #[error("Option hearth.{0} is given more than once")]
    Duplicate(String),
    /// An option this version does not know (a typo would otherwise be ignored).
    #[error("Unknown option hearth.{0}")]
    Unknown(String),
    /// An option's value is malformed.
    #[error("Option hearth.{key} has an invalid value {value:?}: {why}")]
    Invalid {
        /// Option name without the prefix.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Where hearth-init runs, which decides how it mounts, where it finds its cgroups and how it
/// ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a Linux kernel in a microVM (options from `/proc/cmdline`): devtmpfs, block
    /// devices, switch-root by moving the new root onto `/`, boot timer, `reboot` at the end.
    Vm,
    /// PID 1 of fresh namespaces in the sandbox runtime (options from argv): loop-mounted image,
    /// tmpfs `/dev`, `pivot_root`, the agent's cgroup, `exit` at the end.
    Sandbox,
}

/// How hearth-init reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK to the host on this port (microVM).
    Vsock {
        /// Context id of the host (2).
        cid: u32,
        /// Host port.
        port: u32,
    },
    /// A Unix socket at this path (sandbox, tests).
    Unix {
        /// Socket path, as seen by init before it pivots into the instance root.
        path: PathBuf,
    },
    /// No agent: the spec comes from a file and everything is reported on the console.
    Standalone {
        /// The JSON spec file (see [`crate::spec::StandaloneSpec`]).
        spec: PathBuf,
    },
}

/// Options hearth-init understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// Where init runs.
    pub mode: Mode,
    /// The agent connection.
    pub transport: Transport,
    /// Instance id (empty for a warm-pool member that is assigned later).
    pub instance_id: String,
    /// Physical address of the boot timer to write once connected (microVM only).
    pub boot_timer: Option<u64>,
    /// Most verbose level of init's own diagnostics on its stderr/console.
    pub log_level: tracing::Level,
}

const KNOWN: &[&str] = &[
    "instance",
    "socket",
    "vsock_port",
    "vsock_cid",
    "standalone",
    "boot_timer",
    "log",
];

fn invalid(key: &str, value: &str, why: &'static str) -> BootstrapError {
    BootstrapError::Invalid {
        key: key.into(),
        value: value.into(),
        why,
    }
}

fn parse_u32(key: &str, value: &str) -> Result<u32, BootstrapError> {
    value
        .parse()
        .map_err(|_| invalid(key, value, "not a 32-bit unsigned number"))
}

impl Bootstrap {
    /// Parses whitespace-separated words (a kernel command line, or argv), keeping only
    /// `hearth.*` ones.
    pub fn parse<'a>(
        words: impl IntoIterator<Item = &'a str>,
        mode: Mode,
    ) -> Result<Self, BootstrapError> {
        let mut opts = BTreeMap::new();
        for word in words {
            let Some(rest) = word.strip_prefix(PREFIX) else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            if !KNOWN.contains(&key) {
                return Err(BootstrapError::Unknown(key.to_owned()));
            }
            if opts.insert(key.to_owned(), value.to_owned()).is_some() {
                return Err(BootstrapError::Duplicate(key.to_owned()));
            }
        }
        let get = |k: &str| opts.get(k).map(String::as_str);
        let transport = match (get("standalone"), get("socket"), get("vsock_port")) {
            (Some(spec), None, None) => {
                if spec.is_empty() {
                    return Err(invalid("standalone", spec, "needs the path of a spec file"));
                }
                Transport::Standalone { spec: spec.into() }
            }
            (None, Some(path), None) => {
                if path.is_empty() {
                    return Err(invalid("socket", path, "needs a socket path"));
                }
                Transport::Unix { path: path.into() }
            }
            (None, None, port) => Transport::Vsock {
                cid: match get("vsock_cid") {
                    Some(c) => parse_u32("vsock_cid", c)?,
                    None => 2,
                },
                port: match port {
                    Some(p) => parse_u32("vsock_port", p)?,
                    None => hearth_proto::INIT_VSOCK_PORT,
                },
            },
            _ => {
                return Err(invalid(
                    "socket",
                    get("socket").or(get("standalone")).unwrap_or_default(),
                    "hearth.standalone, hearth.socket and hearth.vsock_port exclude each other",
                ));
            }
        };
        let boot_timer = match (get("boot_timer"), mode) {
            (Some("off"), _) => None,
            (Some(addr), Mode::Vm) => {
                let hex = addr.trim_start_matches("0x");
                Some(
                    u64::from_str_radix(hex, 16)
                        .map_err(|_| invalid("boot_timer", addr, "not a hex address or `off`"))?,
                )
            }
            (Some(addr), Mode::Sandbox) => {
                return Err(invalid(
                    "boot_timer",
                    addr,
                    "the boot timer exists only in a microVM",
                ));
            }
            (None, Mode::Vm) => Some(DEFAULT_BOOT_TIMER_ADDR),
            (None, Mode::Sandbox) => None,
        };
        let log_level = match get("log") {
            None => tracing::Level::INFO,
            Some(l) => l
                .parse()
                .map_err(|_| invalid("log", l, "not one of error, warn, info, debug, trace"))?,
        };
        Ok(Self {
            mode,
            transport,
            instance_id: opts.remove("instance").unwrap_or_default(),
            boot_timer,
            log_level,
        })
    }

    /// Parses a kernel command line (the contents of `/proc/cmdline`): microVM mode.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, BootstrapError> {
        Self::parse(cmdline.split_ascii_whitespace(), Mode::Vm)
    }

    /// Parses init's arguments (without argv\[0\]) if any is a `hearth.*` option: sandbox mode.
    pub fn from_args(args: &[String]) -> Option<Result<Self, BootstrapError>> {
        args.iter()
            .any(|a| a.starts_with(PREFIX))
            .then(|| Self::parse(args.iter().map(String::as_str), Mode::Sandbox))
    }

    /// Sandbox mode from argv, or else from the `hearth.*` words in [`OPTIONS_ENV`].
    pub fn from_args_or_env(
        args: &[String],
        env: Option<&str>,
    ) -> Option<Result<Self, BootstrapError>> {
        Self::from_args(args).or_else(|| {
            let words = env?;
            words
                .split_ascii_whitespace()
                .any(|w| w.starts_with(PREFIX))
                .then(|| Self::parse(words.split_ascii_whitespace(), Mode::Sandbox))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_defaults_to_vsock_and_the_boot_timer() {
        let b = Bootstrap::from_cmdline("console=ttyS0 reboot=k hearth.instance=web-1 quiet\n")
            .unwrap();
        assert_eq!(b.instance_id, "web-1");
        assert_eq!(b.mode, Mode::Vm);
        assert_eq!(
            b.transport,
            Transport::Vsock {
                cid: 2,
                port: hearth_proto::INIT_VSOCK_PORT
            }
        );
        assert_eq!(b.boot_timer, Some(DEFAULT_BOOT_TIMER_ADDR));
        assert_eq!(b.log_level, tracing::Level::INFO);
    }

    #[test]
    fn unix_socket_in_sandbox() {
        let args = vec![
            "hearth.socket=/run/hearth/a.sock".to_owned(),
            "hearth.instance=a".to_owned(),
        ];
        let b = Bootstrap::from_args(&args).unwrap().unwrap();
        assert_eq!(
            b.transport,
            Transport::Unix {
                path: "/run/hearth/a.sock".into()
            }
        );
        assert_eq!(b.mode, Mode::Sandbox);
        assert_eq!(b.boot_timer, None);
        assert!(Bootstrap::from_args(&["quiet".to_owned()]).is_none());
        let b = Bootstrap::from_args_or_env(&[], Some("hearth.socket=/s hearth.instance=e"))
            .unwrap()
            .unwrap();
        assert_eq!(b.instance_id, "e");
        assert_eq!(b.mode, Mode::Sandbox);
        // Arguments win over the environment.
        let b = Bootstrap::from_args_or_env(&args, Some("hearth.socket=/other"))
            .unwrap()
            .unwrap();
        assert_eq!(b.instance_id, "a");
        assert!(Bootstrap::from_args_or_env(&[], Some("quiet")).is_none());
        assert!(Bootstrap::from_args_or_env(&[], None).is_none());
    }

    #[test]
    fn standalone_and_options() {
        let b = Bootstrap::from_cmdline(
            "hearth.standalone=/spec.json hearth.boot_timer=off hearth.log=debug",
        )
        .unwrap();
        assert_eq!(
            b.transport,
            Transport::Standalone {
                spec: "/spec.json".into()
            }
        );
        assert_eq!(b.boot_timer, None);
        assert_eq!(b.log_level, tracing::Level::DEBUG);
        let b =
            Bootstrap::from_cmdline("hearth.boot_timer=0xd0000000 hearth.vsock_port=5000").unwrap();
        assert_eq!(b.boot_timer, Some(0xd000_0000));
        assert_eq!(b.transport, Transport::Vsock { cid: 2, port: 5000 });
    }

    #[test]
    fn bad_options_are_errors() {
        let vm = |s: &str| Bootstrap::from_cmdline(s);
        assert_eq!(
            vm("hearth.instnace=x").unwrap_err(),
            BootstrapError::Unknown("instnace".into())
        );
        assert!(matches!(
            vm("hearth.instance=a hearth.instance=b"),
            Err(BootstrapError::Duplicate(_))
        ));
        for bad in [
            "hearth.vsock_port=http",
            "hearth.socket=/a hearth.vsock_port=1",
            "hearth.standalone=/s hearth.socket=/a",
            "hearth.standalone=",
            "hearth.boot_timer=xyz",
            "hearth.log=loud",
        ] {
            assert!(
                matches!(vm(bad), Err(BootstrapError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            Bootstrap::parse(["hearth.boot_timer=0xc0000000"], Mode::Sandbox),
            Err(BootstrapError::Invalid { .. })
        ));
    }
}
