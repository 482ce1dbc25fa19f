//! The `hearth.*` options hearth-init starts from.
//!
//! In a microVM they come from `/proc/cmdline`: the kernel does not hand dotted parameters to
//! init's argv or environment. In the sandbox the agent passes the same `hearth.key=value` words
//! as init's arguments.

use std::collections::BTreeMap;

/// Prefix of every option hearth-init reads.
pub const PREFIX: &str = "hearth.";

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

/// How hearth-init reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK to the host (CID 2) on this port (microVM).
    Vsock {
        /// Host port.
        port: u32,
    },
    /// A Unix socket at this path (sandbox, tests).
    Unix {
        /// Socket path, as seen by init before it pivots into the instance root.
        path: String,
    },
}

/// Options hearth-init understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// The agent connection.
    pub transport: Transport,
    /// Instance id (empty for a warm-pool member that is assigned later).
    pub instance_id: String,
}

const KNOWN: &[&str] = &["instance", "vsock_port", "socket"];

impl Bootstrap {
    /// Parses whitespace-separated words (a kernel command line, or argv joined), keeping only
    /// `hearth.*` ones.
    pub fn parse<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Self, BootstrapError> {
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
        let transport = match (opts.get("socket"), opts.get("vsock_port")) {
            (Some(path), None) => Transport::Unix { path: path.clone() },
            (None, port) => Transport::Vsock {
                port: match port {
                    None => hearth_proto::INIT_VSOCK_PORT,
                    Some(p) => p.parse().map_err(|_| BootstrapError::Invalid {
                        key: "vsock_port".into(),
                        value: p.clone(),
                        why: "not a port number",
                    })?,
                },
            },
            (Some(path), Some(_)) => {
                return Err(BootstrapError::Invalid {
                    key: "socket".into(),
                    value: path.clone(),
                    why: "hearth.socket and hearth.vsock_port exclude each other",
                });
            }
        };
        Ok(Self {
            transport,
            instance_id: opts.remove("instance").unwrap_or_default(),
        })
    }

    /// Parses a kernel command line (the contents of `/proc/cmdline`).
    pub fn from_cmdline(cmdline: &str) -> Result<Self, BootstrapError> {
        Self::parse(cmdline.split_ascii_whitespace())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_defaults_to_vsock() {
        let b = Bootstrap::from_cmdline("console=ttyS0 reboot=k hearth.instance=web-1 quiet\n")
            .unwrap();
        assert_eq!(b.instance_id, "web-1");
        assert_eq!(
            b.transport,
            Transport::Vsock {
                port: hearth_proto::INIT_VSOCK_PORT
            }
        );
    }

    #[test]
    fn unix_socket_in_sandbox() {
        let b = Bootstrap::parse(["hearth.socket=/run/hearth/a.sock"]).unwrap();
        assert_eq!(
            b.transport,
            Transport::Unix {
                path: "/run/hearth/a.sock".into()
            }
        );
    }

    #[test]
    fn bad_options_are_errors() {
        assert_eq!(
            Bootstrap::parse(["hearth.instnace=x"]).unwrap_err(),
            BootstrapError::Unknown("instnace".into())
        );
        assert!(matches!(
            Bootstrap::parse(["hearth.instance=a", "hearth.instance=b"]),
            Err(BootstrapError::Duplicate(_))
        ));
        assert!(matches!(
            Bootstrap::parse(["hearth.vsock_port=http"]),
            Err(BootstrapError::Invalid { .. })
        ));
    }
}
