//! The VM's configuration: one TOML file (`--config`, unknown keys refused) and matching flags
//! that override it. Every default is defined here, in [`defaults`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::EngineKind;

/// Defaults for every optional setting.
pub mod defaults {
    /// Kernel command line when none is given. The VMM appends one
    /// `virtio_mmio.device=4K@<addr>:<irq>` per virtio device.
    pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
    /// vCPUs.
    pub const VCPUS: u8 = 1;
    /// Guest memory in MiB.
    pub const MEMORY_MIB: u64 = 128;
    /// Bytes of serial output the ring keeps.
    pub const SERIAL_RING_BYTES: usize = 64 << 10;
    /// Seccomp filters are on.
    pub const SECCOMP: bool = true;
    /// The guest CID of the vsock device.
    pub const VSOCK_CID: u32 = 3;

    pub(super) fn cmdline() -> String {
        CMDLINE.to_owned()
    }
    pub(super) fn vcpus() -> u8 {
        VCPUS
    }
    pub(super) fn memory_mib() -> u64 {
        MEMORY_MIB
    }
    pub(super) fn serial_ring_bytes() -> usize {
        SERIAL_RING_BYTES
    }
    pub(super) fn seccomp() -> bool {
        SECCOMP
    }
    pub(super) fn vsock_cid() -> u32 {
        VSOCK_CID
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("Cannot read config file {0}")]
    Read(String, #[source] std::io::Error),
    /// The config file is not valid TOML for this schema (unknown keys included).
    #[error("Config file {0} is invalid: {1}")]
    Parse(String, String),
    /// No kernel.
    #[error("No kernel given (--kernel or `kernel` in the config file)")]
    NoKernel,
    /// vCPU count out of range.
    #[error("vCPU count {0} is out of range (1 to {max})", max = crate::arch::x86_64::mptable::MAX_VCPUS)]
    Vcpus(u8),
    /// A `--disk`, `--net` or `--vsock` value could not be parsed.
    #[error("Invalid {what} {value:?}: {why}")]
    Flag {
        /// Which flag.
        what: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// Bad MAC address.
    #[error("Invalid MAC address {0:?} (expected six hex bytes separated by ':')")]
    Mac(String),
    /// Bad TAP name.
    #[error("Invalid TAP device name {0:?} (1 to 15 bytes, no '/' or whitespace)")]
    TapName(String),
    /// Bad vsock CID.
    #[error("Invalid vsock guest CID {0} (must be at least 3)")]
    Cid(u32),
    /// Too many virtio devices.
    #[error("{0} virtio devices configured; at most {max} fit", max = crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES)]
    TooManyDevices(usize),
    /// Serial output spec.
    #[error("Invalid serial output {0:?} (stdout, none, ring or file:PATH)")]
    Serial(String),
}

/// Where the guest's serial output goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// Dropped.
    None,
    /// A bounded ring, read through the control socket's `serial` command.
    Ring,
    /// A file, created (or truncated) by the VMM.
    File(PathBuf),
}

impl std::str::FromStr for SerialOutput {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "none" => Ok(Self::None),
            "ring" => Ok(Self::Ring),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_owned())),
            },
        }
    }
}

impl<'de> Deserialize<'de> for SerialOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for SerialOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Stdout => s.serialize_str("stdout"),
            Self::None => s.serialize_str("none"),
            Self::Ring => s.serialize_str("ring"),
            Self::File(p) => s.serialize_str(&format!("file:{}", p.display())),
        }
    }
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file (raw, a multiple of 512 bytes).
    pub path: PathBuf,
    /// Read-only (the guest sees VIRTIO_BLK_F_RO and writes fail).
    #[serde(default)]
    pub read_only: bool,
    /// Device id the guest reads (at most 20 bytes; `/sys/block/vdX/serial` in Linux).
    #[serde(default)]
    pub id: Option<String>,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: EngineKind,
}

/// The network device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing TAP device in the VMM's network namespace.
    pub tap: String,
    /// The guest's MAC address (`aa:bb:cc:dd:ee:ff`); none = the guest picks one.
    #[serde(default)]
    pub mac: Option<String>,
}

/// The vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID.
    #[serde(default = "defaults::vsock_cid")]
    pub cid: u32,
    /// The host side: a Unix socket the VMM listens on (`CONNECT <port>\n`); guest connections
    /// to host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vmlinux ELF or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (the VMM appends the virtio-mmio device declarations).
    #[serde(default = "defaults::cmdline")]
    pub cmdline: String,
    /// vCPUs (1 to 32).
    #[serde(default = "defaults::vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "defaults::memory_mib")]
    pub memory_mib: u64,
    /// Disks, in the order the guest sees them (vda, vdb, …).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The network device.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// The vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Serial output.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Ring size for `serial = "ring"`.
    #[serde(default = "defaults::serial_ring_bytes")]
    pub serial_ring_bytes: usize,
    /// The control socket (none = no control socket).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Per-thread seccomp filters.
    #[serde(default = "defaults::seccomp")]
    pub seccomp: bool,
}

/// The config file with every key optional, so flags can supply what it lacks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialConfig {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    vcpus: Option<u8>,
    memory_mib: Option<u64>,
    disks: Option<Vec<DiskConfig>>,
    net: Option<NetConfig>,
    vsock: Option<VsockConfig>,
    serial: Option<SerialOutput>,
    serial_ring_bytes: Option<usize>,
    control_socket: Option<PathBuf>,
    seccomp: Option<bool>,
}

/// Settings from the command line; `Some` overrides the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--vcpus`.
    pub vcpus: Option<u8>,
    /// `--memory-mib`.
    pub memory_mib: Option<u64>,
    /// `--disk` (replaces the file's disks when any is given).
    pub disks: Vec<DiskConfig>,
    /// `--net`.
    pub net: Option<NetConfig>,
    /// `--vsock`.
    pub vsock: Option<VsockConfig>,
    /// `--serial`.
    pub serial: Option<SerialOutput>,
    /// `--serial-ring-bytes`.
    pub serial_ring_bytes: Option<usize>,
    /// `--control-socket`.
    pub control_socket: Option<PathBuf>,
    /// `--seccomp`.
    pub seccomp: Option<bool>,
}

impl VmConfig {
    /// Reads `file` (if any), applies `flags`, and validates the result.
    pub fn load(file: Option<&Path>, flags: Overrides) -> Result<Self, ConfigError> {
        let base = match file {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(shown.clone(), e))?;
                toml::from_str::<PartialConfig>(&text)
                    .map_err(|e| ConfigError::Parse(shown, e.message().to_owned()))?
            }
            None => PartialConfig::default(),
        };
        let config = VmConfig {
            kernel: flags.kernel.or(base.kernel).ok_or(ConfigError::NoKernel)?,
            initrd: flags.initrd.or(base.initrd),
            cmdline: flags
                .cmdline
                .or(base.cmdline)
                .unwrap_or_else(defaults::cmdline),
            vcpus: flags.vcpus.or(base.vcpus).unwrap_or(defaults::VCPUS),
            memory_mib: flags
                .memory_mib
                .or(base.memory_mib)
                .unwrap_or(defaults::MEMORY_MIB),
            disks: if flags.disks.is_empty() {
                base.disks.unwrap_or_default()
            } else {
                flags.disks
            },
            net: flags.net.or(base.net),
            vsock: flags.vsock.or(base.vsock),
            serial: flags.serial.or(base.serial).unwrap_or_default(),
            serial_ring_bytes: flags
                .serial_ring_bytes
                .or(base.serial_ring_bytes)
                .unwrap_or(defaults::SERIAL_RING_BYTES),
            control_socket: flags.control_socket.or(base.control_socket),
            seccomp: flags.seccomp.or(base.seccomp).unwrap_or(defaults::SECCOMP),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > crate::arch::x86_64::mptable::MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if let Some(net) = &self.net {
            validate_tap_name(&net.tap)?;
            if let Some(mac) = &net.mac {
                parse_mac(mac)?;
            }
        }
        if let Some(v) = &self.vsock
            && v.cid < 3
        {
            return Err(ConfigError::Cid(v.cid));
        }
        let devices =
            self.disks.len() + usize::from(self.net.is_some()) + usize::from(self.vsock.is_some());
        if devices > crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES as usize {
            return Err(ConfigError::TooManyDevices(devices));
        }
        Ok(())
    }
}

/// Checks a TAP interface name.
pub fn validate_tap_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(ConfigError::TapName(name.to_owned()));
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(ConfigError::Mac(s.to_owned()));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(ConfigError::Mac(s.to_owned()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| ConfigError::Mac(s.to_owned()))?;
    }
    Ok(mac)
}

fn flag_err(what: &'static str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Flag {
        what,
        value: value.to_owned(),
        why: why.into(),
    }
}

/// Splits `k=v,k2,…` into pairs (a bare key has an empty value).
fn key_values(s: &str) -> Vec<(&str, &str)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

/// Parses `--disk path=P[,ro][,id=ID][,engine=io_uring|sync]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        id: None,
        io_engine: EngineKind::default(),
    };
    for (k, v) in key_values(s) {
        match k {
            "path" => disk.path = PathBuf::from(v),
            "ro" | "read_only" => disk.read_only = v.is_empty() || v == "true" || v == "on",
            "id" => disk.id = Some(v.to_owned()),
            "engine" | "io_engine" => {
                disk.io_engine = match v {
                    "io_uring" => EngineKind::IoUring,
                    "sync" => EngineKind::Sync,
                    _ => return Err(flag_err("--disk", s, format!("unknown engine {v:?}"))),
                }
            }
            _ => return Err(flag_err("--disk", s, format!("unknown key {k:?}"))),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(flag_err("--disk", s, "path= is required"));
    }
    Ok(disk)
}

/// Parses `--net tap=NAME[,mac=MAC]`.
pub fn parse_net(s: &str) -> Result<NetConfig, ConfigError> {
    let mut tap = None;
    let mut mac = None;
    for (k, v) in key_values(s) {
        match k {
            "tap" => tap = Some(v.to_owned()),
            "mac" => mac = Some(v.to_owned()),
            _ => return Err(flag_err("--net", s, format!("unknown key {k:?}"))),
        }
    }
    let tap = tap.ok_or_else(|| flag_err("--net", s, "tap= is required"))?;
    Ok(NetConfig { tap, mac })
}

/// Parses `--vsock [cid=N,]uds=PATH`.
pub fn parse_vsock(s: &str) -> Result<VsockConfig, ConfigError> {
    let mut cid = defaults::VSOCK_CID;
    let mut uds = None;
    for (k, v) in key_values(s) {
        match k {
            "cid" => {
                cid = v
                    .parse()
                    .map_err(|_| flag_err("--vsock", s, "cid must be a number"))?
            }
            "uds" | "uds_path" => uds = Some(PathBuf::from(v)),
            _ => return Err(flag_err("--vsock", s, format!("unknown key {k:?}"))),
        }
    }
    let uds_path = uds.ok_or_else(|| flag_err("--vsock", s, "uds= is required"))?;
    Ok(VsockConfig { cid, uds_path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_with_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            r#"
kernel = "/k"
initrd = "/i"
cmdline = "console=ttyS0"
vcpus = 2
memory_mib = 256
serial = "file:/tmp/x"
control_socket = "/run/c.sock"
seccomp = false
[[disks]]
path = "/root.img"
read_only = true
id = "rootfs"
[[disks]]
path = "/scratch.img"
io_engine = "sync"
[net]
tap = "tap0"
mac = "06:00:00:00:00:01"
[vsock]
cid = 7
uds_path = "/run/v.sock"
"#,
        )
        .unwrap();
        let c = VmConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[0].read_only);
        assert_eq!(c.disks[1].io_engine, EngineKind::Sync);
        assert_eq!(c.serial, SerialOutput::File("/tmp/x".into()));
        assert_eq!(c.vsock.unwrap().cid, 7);
        assert!(!c.seccomp);

        let flags = Overrides {
            vcpus: Some(1),
            disks: vec![parse_disk("path=/other,ro,id=x,engine=io_uring").unwrap()],
            ..Default::default()
        };
        let c = VmConfig::load(Some(&path), flags).unwrap();
        assert_eq!((c.vcpus, c.disks.len(), c.memory_mib), (1, 1, 256));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, "kernel = \"/k\"\nmemroy_mib = 5\n").unwrap();
        let e = VmConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("memroy_mib"), "{e}");
        std::fs::write(&path, "kernel = \"/k\"\n[[disks]]\npath=\"/d\"\nfoo=1\n").unwrap();
        assert!(VmConfig::load(Some(&path), Overrides::default()).is_err());
        assert!(matches!(
            VmConfig::load(None, Overrides::default()),
            Err(ConfigError::NoKernel)
        ));
        let flags = |f: Overrides| {
            VmConfig::load(
                None,
                Overrides {
                    kernel: Some("/k".into()),
                    ..f
                },
            )
        };
        assert!(matches!(
            flags(Overrides {
                vcpus: Some(0),
                ..Default::default()
            }),
            Err(ConfigError::Vcpus(0))
        ));
        assert!(matches!(
            flags(Overrides {
                net: Some(parse_net("tap=t0,mac=zz").unwrap()),
                ..Default::default()
            }),
            Err(ConfigError::Mac(_))
        ));
        assert!(matches!(
            flags(Overrides {
                net: Some(parse_net("tap=a-very-long-tap-name").unwrap()),
                ..Default::default()
            }),
            Err(ConfigError::TapName(_))
        ));
        assert!(matches!(
            flags(Overrides {
                vsock: Some(parse_vsock("cid=2,uds=/x").unwrap()),
                ..Default::default()
            }),
            Err(ConfigError::Cid(2))
        ));
        assert!(parse_disk("ro").is_err());
        assert!(parse_disk("path=/x,engine=aio").is_err());
        assert!(parse_vsock("cid=3").is_err());
        assert!("file:".parse::<SerialOutput>().is_err());
        assert_eq!("ring".parse::<SerialOutput>().unwrap(), SerialOutput::Ring);
        assert_eq!(
            parse_mac("06:00:0a:0b:0c:ff").unwrap(),
            [6, 0, 10, 11, 12, 255]
        );
    }
}
