//! [`Filter`]: one instance's programs and maps — loaded, attached with TCX, pinned, adopted
//! after a restart, updated live, counted, removed. [`PinRoot`]: where the pins live.

use std::{
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    pin::PinError,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        links::FdLink, tc::TcAttachOptions,
    },
};
use hearth_ebpf_common::{
    COUNTER_SLOTS, Config, Counter, Direction, FlowKey, FlowValue, HALF_BITS, LAYOUT_VERSION,
    MAP_ACTIVE, MAP_ALLOW_V4, MAP_ALLOW_V6, MAP_CONFIG, MAP_COUNTERS, MAP_DENY_V4, MAP_DENY_V6,
    MAP_FLOWS, MAP_META, MAP_SPECIAL_V4, MAP_SPECIAL_V6, MAPS, Meta, PROG_EGRESS, PROG_INGRESS,
    RuleSet, Verdict,
};

use super::{
    OBJECT,
    compile::{Compiled, TrieEntry, compile, non_internet},
    counters::Counters,
    policy::{Cidr, Policy, PolicyError},
    sys,
};

/// Why a filter operation failed. Operations that fail change nothing visible: a failed attach
/// removes what it pinned, a failed policy update leaves the previous policy live.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The policy was refused before anything was touched.
    #[error("Invalid policy")]
    Policy(#[source] Box<PolicyError>),
    /// The embedded object could not be parsed or its maps created.
    #[error("Loading the eBPF object failed")]
    Load(#[source] Box<aya::EbpfError>),
    /// The object lacks a program.
    #[error("The eBPF object has no program named {0}")]
    MissingProgram(&'static str),
    /// The object lacks a map.
    #[error("The eBPF object has no map named {0}")]
    MissingMap(&'static str),
    /// The kernel refused a program (the verifier's log is in the source).
    #[error("Loading program {name} into the kernel failed")]
    Program {
        /// Program name.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map operation failed.
    #[error("Accessing map {name} failed")]
    Map {
        /// Map name.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: Box<MapError>,
    },
    /// The pin root is not on bpffs.
    #[error("{0} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    /// A file operation under the pin root failed.
    #[error("Cannot use {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An instance name that cannot be a directory name under the pin root.
    #[error("Invalid instance name {0:?} (1 to 64 of A-Z a-z 0-9 . _ -, not starting with a dot)")]
    InstanceName(String),
    /// The interface does not exist (in the calling thread's network namespace).
    #[error("Interface {name:?} not found")]
    Interface {
        /// Interface name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// State for the instance is already pinned.
    #[error("Instance {0} already has pinned eBPF state (adopt or remove it first)")]
    AlreadyPinned(String),
    /// [`Filter::attach`] on a filter that is attached.
    #[error("The filter is already attached (to {0})")]
    AlreadyAttached(String),
    /// The kernel refused the TCX attachment.
    #[error("Attaching {program} to {ifname} failed")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Interface name.
        ifname: String,
        /// What aya reported.
        #[source]
        source: Box<ProgramError>,
    },
    /// Pinning failed.
    #[error("Pinning {path} failed")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: Box<PinError>,
    },
    /// A pinned link could not be opened, read or detached.
    #[error("Link {path} failed")]
    Link {
        /// The pin path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// No state is pinned for the instance.
    #[error("Instance {0} has no pinned eBPF state")]
    NotPinned(String),
    /// The pinned state is incomplete (a crash during attach) or not ours.
    #[error("Pinned state of instance {instance} is unusable: {why} (remove it and attach again)")]
    Unusable {
        /// Instance name.
        instance: String,
        /// What is wrong.
        why: String,
    },
    /// Test runs need the programs, which only a filter loaded by this process holds.
    #[error("The filter holds no programs (it was adopted); test runs need Filter::load")]
    NoPrograms,
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("Test run of {0} failed")]
    TestRun(&'static str, #[source] Box<ProgramError>),
    /// A test run's return code and counters disagree.
    #[error("Test run of {program}: {what}")]
    TestRunResult {
        /// Program name.
        program: &'static str,
        /// What was inconsistent.
        what: String,
    },
}

// Boxed sources keep `FilterError` (and the errors that wrap it) small.
impl From<PolicyError> for FilterError {
    fn from(e: PolicyError) -> FilterError {
        FilterError::Policy(Box::new(e))
    }
}

impl From<aya::EbpfError> for FilterError {
    fn from(e: aya::EbpfError) -> FilterError {
        FilterError::Load(Box::new(e))
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> FilterError {
    move |source| FilterError::Map {
        name,
        source: Box::new(source),
    }
}

fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> FilterError {
    move |source| FilterError::Program {
        name,
        source: Box::new(source),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FilterError + '_ {
    move |source| FilterError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Load-time choices that cannot change later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Entries of the flow table (an LRU: the least recently used flow is forgotten when full).
    /// Default: [`hearth_ebpf_common::FLOW_TABLE_DEFAULT`] (4096, about 0.5 MiB of kernel memory).
    pub flow_table_size: u32,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            flow_table_size: hearth_ebpf_common::FLOW_TABLE_DEFAULT,
        }
    }
}

/// The bpffs directory under which each instance's links and maps are pinned, one
/// subdirectory per instance: `<root>/<instance>/{link_egress,link_ingress,CONFIG,…}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinRoot {
    path: PathBuf,
}

impl PinRoot {
    /// The production root.
    pub const DEFAULT: &'static str = "/sys/fs/bpf/hearth";

    /// Uses (and creates) `path`, which must be on bpffs.
    pub fn new(path: impl Into<PathBuf>) -> Result<PinRoot, FilterError> {
        let path = path.into();
        if let Err(e) = fs::create_dir_all(&path) {
            // Creating a directory in sysfs where bpffs should be fails with ENOENT.
            let parent_bpffs = path
                .parent()
                .is_some_and(|p| sys::is_bpffs(p).unwrap_or(false));
            if !parent_bpffs && !path.is_dir() {
                return Err(FilterError::NotBpffs(path));
            }
            return Err(io_err(&path)(e));
        }
        if !sys::is_bpffs(&path).map_err(io_err(&path))? {
            return Err(FilterError::NotBpffs(path));
        }
        Ok(PinRoot { path })
    }

    /// Like [`PinRoot::new`], but first mounts a bpffs on `mount_point` if it is not on one
    /// (what systemd does for `/sys/fs/bpf`; the agent calls
    /// `PinRoot::mounting("/sys/fs/bpf", PinRoot::DEFAULT)` at start). `path` must be inside
    /// `mount_point`. The mount belongs to the host, so pins outlive the agent process.
    pub fn mounting(
        mount_point: impl AsRef<Path>,
        path: impl Into<PathBuf>,
    ) -> Result<PinRoot, FilterError> {
        let mount_point = mount_point.as_ref();
        fs::create_dir_all(mount_point).map_err(io_err(mount_point))?;
        if !sys::is_bpffs(mount_point).map_err(io_err(mount_point))? {
            sys::mount_bpffs(mount_point).map_err(io_err(mount_point))?;
            tracing::info!(path = %mount_point.display(), "mounted bpffs");
        }
        PinRoot::new(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The instances with pinned state, sorted: after a restart, adopt each one that should
    /// still exist and [`remove`](PinRoot::remove) the others.
    pub fn instances(&self) -> Result<Vec<String>, FilterError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_err(&self.path))? {
            let entry = entry.map_err(io_err(&self.path))?;
            if entry.file_type().map_err(io_err(&entry.path()))?.is_dir()
                && let Some(name) = entry.file_name().to_str()
                && valid_instance_name(name)
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Detaches and unpins whatever is pinned for `instance` (also incomplete state that
    /// cannot be adopted). Returns whether there was anything.
    pub fn remove(&self, instance: &str) -> Result<bool, FilterError> {
        check_instance_name(instance)?;
        let dir = self.path.join(instance);
        if !dir.exists() {
            return Ok(false);
        }
        for link in [LINK_EGRESS, LINK_INGRESS] {
            let path = dir.join(link);
            if let Ok(fd) = sys::obj_get(&path) {
                detach_quietly(&path, &fd);
            }
        }
        remove_dir(&dir)?;
        Ok(true)
    }
}

const LINK_EGRESS: &str = "link_egress";
const LINK_INGRESS: &str = "link_ingress";

fn valid_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_instance_name(name: &str) -> Result<(), FilterError> {
    if valid_instance_name(name) {
        Ok(())
    } else {
        Err(FilterError::InstanceName(name.to_owned()))
    }
}

/// Removes a pin directory and everything in it (pins are files; unlinking one drops the
/// kernel object once nothing else holds it).
fn remove_dir(dir: &Path) -> Result<(), FilterError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FilterError::Io {
            path: dir.to_owned(),
            source: e,
        }),
    }
}

fn detach_quietly(path: &Path, fd: &OwnedFd) {
    // A link whose interface is gone is already detached; unpinning frees it either way.
    if let Err(e) = sys::link_detach(fd.as_fd()) {
        tracing::debug!(path = %path.display(), error = %e, "link detach failed");
    }
}

/// Where an attached filter is, as pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The instance name (the pin directory's name).
    pub instance: String,
    /// The pin directory.
    pub dir: PathBuf,
    /// The interface name at attach time.
    pub ifname: String,
    /// The interface index the links are attached to; 0 if the interface has disappeared (the
    /// links are then inert until removed).
    pub ifindex: u32,
    /// Kernel id of the link on the tc ingress hook (instance → world).
    pub egress_link_id: u32,
    /// Kernel id of the link on the tc egress hook (world → instance).
    pub ingress_link_id: u32,
}

struct Links {
    egress: OwnedFd,
    ingress: OwnedFd,
}

struct Maps {
    meta: Map,
    counters: Map,
    config: Map,
    active: Map,
    allow_v4: Map,
    allow_v6: Map,
    deny_v4: Map,
    deny_v6: Map,
    special_v4: Map,
    special_v6: Map,
    flows: Map,
}

impl Maps {
    fn build(
        mut get: impl FnMut(&'static str) -> Result<Map, FilterError>,
    ) -> Result<Maps, FilterError> {
        Ok(Maps {
            meta: get(MAP_META)?,
            counters: get(MAP_COUNTERS)?,
            config: get(MAP_CONFIG)?,
            active: get(MAP_ACTIVE)?,
            allow_v4: get(MAP_ALLOW_V4)?,
            allow_v6: get(MAP_ALLOW_V6)?,
            deny_v4: get(MAP_DENY_V4)?,
            deny_v6: get(MAP_DENY_V6)?,
            special_v4: get(MAP_SPECIAL_V4)?,
            special_v6: get(MAP_SPECIAL_V6)?,
            flows: get(MAP_FLOWS)?,
        })
    }

    fn take(ebpf: &mut Ebpf) -> Result<Maps, FilterError> {
        Maps::build(|name| ebpf.take_map(name).ok_or(FilterError::MissingMap(name)))
    }

    fn open(dir: &Path) -> Result<Maps, FilterError> {
        Maps::build(|name| {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    fn all(&self) -> [(&'static str, &Map); 11] {
        [
            (MAP_META, &self.meta),
            (MAP_COUNTERS, &self.counters),
            (MAP_CONFIG, &self.config),
            (MAP_ACTIVE, &self.active),
            (MAP_ALLOW_V4, &self.allow_v4),
            (MAP_ALLOW_V6, &self.allow_v6),
            (MAP_DENY_V4, &self.deny_v4),
            (MAP_DENY_V6, &self.deny_v6),
            (MAP_SPECIAL_V4, &self.special_v4),
            (MAP_SPECIAL_V6, &self.special_v6),
            (MAP_FLOWS, &self.flows),
        ]
    }
}

fn array_get<V: Pod>(map: &Map, name: &'static str, index: u32) -> Result<V, FilterError> {
    let array = Array::<&MapData, V>::try_from(map).map_err(map_err(name))?;
    array.get(&index, 0).map_err(map_err(name))
}

fn array_set<V: Pod>(
    map: &mut Map,
    name: &'static str,
    index: u32,
    value: V,
) -> Result<(), FilterError> {
    let mut array = Array::<&mut MapData, V>::try_from(map).map_err(map_err(name))?;
    array.set(index, value, 0).map_err(map_err(name))
}

/// The key data of an allow/deny trie entry for `half`.
fn half_key<const N: usize>(half: u8, cidr: &Cidr) -> Key<[u8; N]> {
    let mut data = [0u8; N];
    data[0] = half;
    let addr = match cidr.addr() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    data[1..].copy_from_slice(&addr);
    Key::new(HALF_BITS + u32::from(cidr.prefix_len()), data)
}

/// Replaces the entries of `half` in an allow/deny trie with `entries`.
fn write_half<const N: usize>(
    map: &mut Map,
    name: &'static str,
    half: u8,
    entries: &[TrieEntry],
) -> Result<(), FilterError>
where
    [u8; N]: Pod,
{
    let mut trie =
        LpmTrie::<&mut MapData, [u8; N], RuleSet>::try_from(map).map_err(map_err(name))?;
    let stale: Vec<Key<[u8; N]>> = trie
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(name))?
        .into_iter()
        .filter(|k| k.data()[0] == half)
        .collect();
    for key in &stale {
        trie.remove(key).map_err(map_err(name))?;
    }
    for e in entries {
        trie.insert(&half_key::<N>(half, &e.cidr), e.rules, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn write_special<const N: usize>(
    map: &mut Map,
    name: &'static str,
    family: u8,
) -> Result<(), FilterError>
where
    [u8; N]: Pod,
{
    let mut trie = LpmTrie::<&mut MapData, [u8; N], u32>::try_from(map).map_err(map_err(name))?;
    for cidr in non_internet(family) {
        let mut data = [0u8; N];
        match cidr.addr() {
            std::net::IpAddr::V4(a) => data.copy_from_slice(&a.octets()),
            std::net::IpAddr::V6(a) => data.copy_from_slice(&a.octets()),
        }
        trie.insert(&Key::new(u32::from(cidr.prefix_len()), data), 1, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

/// One instance's eBPF filter. See the [module documentation](super) for the lifecycle.
///
/// Dropping a `Filter` never detaches anything: an attached filter stays in force (its links
/// are pinned) until [`Filter::remove`] or [`PinRoot::remove`]; an unattached one is unloaded.
pub struct Filter {
    maps: Maps,
    version: u32,
    ebpf: Option<Ebpf>,
    attachment: Option<(Attachment, Links)>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("version", &self.version)
            .field("programs", &self.ebpf.is_some())
            .field("attachment", &self.attachment.as_ref().map(|(a, _)| a))
            .finish()
    }
}

impl Filter {
    /// Loads both programs and a fresh set of maps into the kernel and writes `policy` as
    /// version 1. Nothing is attached or pinned yet (see [`Filter::attach`]); dropping the
    /// result unloads everything. Needs CAP_BPF (root).
    pub fn load(policy: &Policy, options: &LoadOptions) -> Result<Filter, FilterError> {
        let compiled = compile(policy)?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_FLOWS, options.flow_table_size)
            .load(OBJECT)?;
        for name in [PROG_EGRESS, PROG_INGRESS] {
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(program_err(name))?;
        }
        let mut maps = Maps::take(&mut ebpf)?;
        write_special::<4>(&mut maps.special_v4, MAP_SPECIAL_V4, 4)?;
        write_special::<16>(&mut maps.special_v6, MAP_SPECIAL_V6, 6)?;
        let mut filter = Filter {
            maps,
            version: 0,
            ebpf: Some(ebpf),
            attachment: None,
        };
        filter.write_policy(&compiled, 1)?;
        Ok(filter)
    }

    /// [`Filter::load`] then [`Filter::attach`].
    pub fn load_and_attach(
        root: &PinRoot,
        instance: &str,
        ifname: &str,
        policy: &Policy,
        options: &LoadOptions,
    ) -> Result<Filter, FilterError> {
        let mut filter = Filter::load(policy, options)?;
        filter.attach(root, instance, ifname)?;
        Ok(filter)
    }

    /// Pins the maps under `root/instance`, attaches the programs to interface `ifname` (in
    /// the calling thread's network namespace) with TCX, first in line on both hooks, and pins
    /// the links. From then on the filter is in force until removed, whatever happens to this
    /// process. On failure everything pinned so far is removed.
    pub fn attach(
        &mut self,
        root: &PinRoot,
        instance: &str,
        ifname: &str,
    ) -> Result<&Attachment, FilterError> {
        if let Some((a, _)) = &self.attachment {
            return Err(FilterError::AlreadyAttached(a.ifname.clone()));
        }
        check_instance_name(instance)?;
        let ifindex = sys::ifindex(ifname).map_err(|source| FilterError::Interface {
            name: ifname.to_owned(),
            source,
        })?;
        if self.ebpf.is_none() {
            return Err(FilterError::NoPrograms);
        }
        let dir = root.path.join(instance);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(FilterError::AlreadyPinned(instance.to_owned()));
            }
            Err(e) => return Err(io_err(&dir)(e)),
        }
        match self.attach_in(&dir, ifindex, ifname) {
            Ok((links, egress, ingress)) => {
                let attachment = Attachment {
                    instance: instance.to_owned(),
                    dir,
                    ifname: ifname.to_owned(),
                    ifindex,
                    egress_link_id: egress.id,
                    ingress_link_id: ingress.id,
                };
                tracing::info!(
                    instance,
                    ifname,
                    egress_link = egress.id,
                    ingress_link = ingress.id,
                    "eBPF filter attached"
                );
                Ok(&self.attachment.insert((attachment, links)).0)
            }
            Err(e) => {
                for link in [LINK_EGRESS, LINK_INGRESS] {
                    let path = dir.join(link);
                    if let Ok(fd) = sys::obj_get(&path) {
                        detach_quietly(&path, &fd);
                    }
                }
                if let Err(cleanup) = remove_dir(&dir) {
                    tracing::warn!(error = %cleanup, "cleaning up after a failed attach failed");
                }
                Err(e)
            }
        }
    }

    fn attach_in(
        &mut self,
        dir: &Path,
        ifindex: u32,
        ifname: &str,
    ) -> Result<(Links, sys::LinkInfo, sys::LinkInfo), FilterError> {
        let mut meta = Meta {
            layout_version: LAYOUT_VERSION,
            ifindex,
            ifname: [0; 16],
        };
        let n = ifname.len().min(15);
        meta.ifname[..n].copy_from_slice(&ifname.as_bytes()[..n]);
        array_set(&mut self.maps.meta, MAP_META, 0, meta)?;
        for (name, map) in self.maps.all() {
            let path = dir.join(name);
            map.pin(&path).map_err(|source| FilterError::Pin {
                path,
                source: Box::new(source),
            })?;
        }
        let ebpf = self.ebpf.as_mut().ok_or(FilterError::NoPrograms)?;
        // The ingress hook (what the instance sends) first: a filter that is half attached then
        // fails closed for the instance's own traffic.
        let (egress_fd, egress) = attach_link(
            ebpf,
            PROG_EGRESS,
            ifname,
            TcAttachType::Ingress,
            &dir.join(LINK_EGRESS),
        )?;
        let (ingress_fd, ingress) = attach_link(
            ebpf,
            PROG_INGRESS,
            ifname,
            TcAttachType::Egress,
            &dir.join(LINK_INGRESS),
        )?;
        Ok((
            Links {
                egress: egress_fd,
                ingress: ingress_fd,
            },
            egress,
            ingress,
        ))
    }

    /// Takes over the filter pinned for `instance` (after an agent restart): the same links,
    /// the same maps, the live policy version. Enforcement never stopped.
    pub fn adopt(root: &PinRoot, instance: &str) -> Result<Filter, FilterError> {
        check_instance_name(instance)?;
        let dir = root.path.join(instance);
        if !dir.is_dir() {
            return Err(FilterError::NotPinned(instance.to_owned()));
        }
        let unusable = |why: String| FilterError::Unusable {
            instance: instance.to_owned(),
            why,
        };
        for name in MAPS.iter().chain(&[LINK_EGRESS, LINK_INGRESS]) {
            if !dir.join(name).exists() {
                return Err(unusable(format!("{name} is missing")));
            }
        }
        let maps = Maps::open(&dir).map_err(|e| unusable(format!("{e:#}")))?;
        let meta: Meta = array_get(&maps.meta, MAP_META, 0)?;
        if meta.layout_version != LAYOUT_VERSION {
            return Err(unusable(format!(
                "layout version {} (this agent uses {LAYOUT_VERSION})",
                meta.layout_version
            )));
        }
        let version: u32 = array_get(&maps.active, MAP_ACTIVE, 0)?;
        let mut infos = Vec::new();
        let mut fds = Vec::new();
        for (link, hook) in [
            (LINK_EGRESS, sys::TCX_INGRESS),
            (LINK_INGRESS, sys::TCX_EGRESS),
        ] {
            let path = dir.join(link);
            let fd = sys::obj_get(&path).map_err(|source| FilterError::Link {
                path: path.clone(),
                source,
            })?;
            let info = sys::link_info(fd.as_fd()).map_err(|source| FilterError::Link {
                path: path.clone(),
                source,
            })?;
            // A link whose interface vanished reports no hook any more.
            if info.link_type != sys::LINK_TYPE_TCX
                || (info.ifindex != 0 && info.attach_type != hook)
            {
                return Err(unusable(format!(
                    "{link} is not a TCX link on the expected hook"
                )));
            }
            infos.push(info);
            fds.push(fd);
        }
        let ingress_fd = fds.pop().expect("two links");
        let egress_fd = fds.pop().expect("two links");
        let name_len = meta.ifname.iter().position(|b| *b == 0).unwrap_or(16);
        let attachment = Attachment {
            instance: instance.to_owned(),
            dir,
            ifname: String::from_utf8_lossy(&meta.ifname[..name_len]).into_owned(),
            ifindex: infos[0].ifindex,
            egress_link_id: infos[0].id,
            ingress_link_id: infos[1].id,
        };
        tracing::info!(
            instance,
            ifname = attachment.ifname,
            egress_link = attachment.egress_link_id,
            ingress_link = attachment.ingress_link_id,
            version,
            "eBPF filter adopted"
        );
        Ok(Filter {
            maps,
            version,
            ebpf: None,
            attachment: Some((
                attachment,
                Links {
                    egress: egress_fd,
                    ingress: ingress_fd,
                },
            )),
        })
    }

    /// Moves the pinned state to `root/instance` (an attached filter that changes hands, e.g.
    /// a warm-pool member's becoming its instance's), so that [`Filter::adopt`] and
    /// [`PinRoot::remove`] find it under the new name. Enforcement does not stop.
    pub fn rename(&mut self, root: &PinRoot, instance: &str) -> Result<(), FilterError> {
        check_instance_name(instance)?;
        let Some((attachment, _)) = self.attachment.as_mut() else {
            return Ok(());
        };
        let dir = root.path.join(instance);
        if dir.exists() {
            return Err(FilterError::AlreadyPinned(instance.to_owned()));
        }
        fs::rename(&attachment.dir, &dir).map_err(io_err(&attachment.dir))?;
        attachment.instance = instance.to_owned();
        attachment.dir = dir;
        Ok(())
    }

    /// Where the filter is attached, if it is.
    pub fn attachment(&self) -> Option<&Attachment> {
        self.attachment.as_ref().map(|(a, _)| a)
    }

    /// The live policy version (1 after [`Filter::load`], +1 per update).
    pub fn policy_version(&self) -> u32 {
        self.version
    }

    /// Replaces the policy while the programs keep running: the new policy is written to the
    /// inactive half of the maps and switched to with one map write, so every packet sees
    /// either the old or the new policy. Flows the new policy no longer allows lose their
    /// replies at their next packet. An invalid policy changes nothing.
    pub fn update_policy(&mut self, policy: &Policy) -> Result<(), FilterError> {
        let compiled = compile(policy)?;
        // Keep the halves alternating on wrap-around: u32::MAX is odd, 2 is even.
        let next = self.version.checked_add(1).unwrap_or(2);
        self.write_policy(&compiled, next)
    }

    fn write_policy(&mut self, c: &Compiled, version: u32) -> Result<(), FilterError> {
        let half = (version & 1) as u8;
        let m = &mut self.maps;
        write_half::<5>(&mut m.allow_v4, MAP_ALLOW_V4, half, &c.allow_v4)?;
        write_half::<17>(&mut m.allow_v6, MAP_ALLOW_V6, half, &c.allow_v6)?;
        write_half::<5>(&mut m.deny_v4, MAP_DENY_V4, half, &c.deny_v4)?;
        write_half::<17>(&mut m.deny_v6, MAP_DENY_V6, half, &c.deny_v6)?;
        array_set::<Config>(&mut m.config, MAP_CONFIG, u32::from(half), c.config)?;
        // The switch: from here on packets use the new half.
        array_set::<u32>(&mut m.active, MAP_ACTIVE, 0, version)?;
        self.version = version;
        Ok(())
    }

    /// The instance's counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, FilterError> {
        let array = PerCpuArray::<&MapData, Counter>::try_from(&self.maps.counters)
            .map_err(map_err(MAP_COUNTERS))?;
        let mut slots = Vec::with_capacity(COUNTER_SLOTS as usize);
        for i in 0..COUNTER_SLOTS {
            let mut sum = Counter::default();
            for c in array.get(&i, 0).map_err(map_err(MAP_COUNTERS))?.iter() {
                sum += *c;
            }
            slots.push(sum);
        }
        Ok(Counters::from_slots(slots))
    }

    /// The flow table's entries (for diagnostics and tests).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, FilterError> {
        let map = HashMap::<&MapData, FlowKey, FlowValue>::try_from(&self.maps.flows)
            .map_err(map_err(MAP_FLOWS))?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_FLOWS))
    }

    /// Runs one program on `frame` (an Ethernet frame) with `BPF_PROG_TEST_RUN` and returns
    /// its verdict, read from the counters. Flows it creates or uses are real. Needs a filter
    /// from [`Filter::load`] that carries no live traffic (the counters tell the verdict).
    pub fn classify(&self, direction: Direction, frame: &[u8]) -> Result<Verdict, FilterError> {
        let program = match direction {
            Direction::Egress => PROG_EGRESS,
            Direction::Ingress => PROG_INGRESS,
        };
        let ebpf = self.ebpf.as_ref().ok_or(FilterError::NoPrograms)?;
        let prog: &SchedClassifier = ebpf
            .program(program)
            .ok_or(FilterError::MissingProgram(program))?
            .try_into()
            .map_err(program_err(program))?;
        let before = self.counters()?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .map_err(|e| FilterError::TestRun(program, Box::new(e)))?;
        let counted = self.counters()?.since(&before).nonzero();
        let inconsistent = |what: String| FilterError::TestRunResult { program, what };
        let [(dir, verdict, counter)] = counted[..] else {
            return Err(inconsistent(format!("expected one count, got {counted:?}")));
        };
        if dir != direction || counter.packets != 1 || counter.bytes != frame.len() as u64 {
            return Err(inconsistent(format!(
                "counted {counter:?} under {dir:?}/{verdict:?} for a {} byte frame",
                frame.len()
            )));
        }
        let code = result.return_value as i32;
        let expected = if verdict.is_pass() { -1 } else { 2 };
        if code != expected {
            return Err(inconsistent(format!(
                "returned {code} but counted {verdict:?}"
            )));
        }
        Ok(verdict)
    }

    /// Runs one program on `frame` `repeat` times in the kernel (`BPF_PROG_TEST_RUN`) and
    /// returns the mean time per run: the program's own cost per packet, without the network
    /// stack around it (for benchmarks). Counters and flows are updated as for real packets.
    pub fn time_run(
        &self,
        direction: Direction,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration, FilterError> {
        let program = match direction {
            Direction::Egress => PROG_EGRESS,
            Direction::Ingress => PROG_INGRESS,
        };
        let ebpf = self.ebpf.as_ref().ok_or(FilterError::NoPrograms)?;
        let prog: &SchedClassifier = ebpf
            .program(program)
            .ok_or(FilterError::MissingProgram(program))?
            .try_into()
            .map_err(program_err(program))?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| FilterError::TestRun(program, Box::new(e)))?;
        Ok(result.duration)
    }

    /// Detaches both links now and unpins the links and maps; the kernel frees them once the
    /// last handle closes (this filter's are closed on return).
    pub fn remove(mut self) -> Result<(), FilterError> {
        if let Some((attachment, links)) = self.attachment.take() {
            detach_quietly(&attachment.dir.join(LINK_EGRESS), &links.egress);
            detach_quietly(&attachment.dir.join(LINK_INGRESS), &links.ingress);
            remove_dir(&attachment.dir)?;
            tracing::info!(instance = attachment.instance, "eBPF filter removed");
        }
        Ok(())
    }
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, FilterError> {
    ebpf.program_mut(name)
        .ok_or(FilterError::MissingProgram(name))?
        .try_into()
        .map_err(program_err(name))
}

/// Attaches `name` to `hook` of `ifname` with TCX (first in line), pins the link at `path`
/// and returns an fd of it and its kernel info.
fn attach_link(
    ebpf: &mut Ebpf,
    name: &'static str,
    ifname: &str,
    hook: TcAttachType,
    path: &Path,
) -> Result<(OwnedFd, sys::LinkInfo), FilterError> {
    let attach_err = |source| FilterError::Attach {
        program: name,
        ifname: ifname.to_owned(),
        source: Box::new(source),
    };
    let prog = program_mut(ebpf, name)?;
    let id = prog
        .attach_with_options(ifname, hook, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    let link: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| FilterError::Link {
            path: path.to_owned(),
            source: io::Error::other(e),
        })?;
    // On failure the link is dropped, which detaches it.
    let pinned = link.pin(path).map_err(|source| FilterError::Pin {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    // aya's handle does not lend its fd; the pin keeps the link while we reopen it.
    drop(pinned);
    let link_err = |source| FilterError::Link {
        path: path.to_owned(),
        source,
    };
    let fd = sys::obj_get(path).map_err(link_err)?;
    let info = sys::link_info(fd.as_fd()).map_err(link_err)?;
    Ok((fd, info))
}
