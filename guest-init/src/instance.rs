//! Preparing the instance from its spec, in order: check the spec, find or create the
//! cgroups, assemble the root and switch into it, extra mounts, host name and `/etc` files,
//! network, user, limits. The result is everything needed to spawn the workload.
//!
//! Every failure is a [`PrepareError`] with the `InitErrorKind` the agent gets and the exit
//! code reported for it.

use std::{
    fs::File,
    net::IpAddr,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
};

use hearth_proto::init::{InitErrorKind, InstanceSpec, RootFs};
use nix::{mount::MntFlags, sched::CloneFlags};

use crate::{
    bootstrap::Mode,
    cgroup::Cgroups,
    net::{self, NetPlan},
    rootfs::{self, STAGING, Scratch, mounts},
    spec::{self, defaults},
    sys::loopdev,
    workload::{ProcessTemplate, rlimit::Rlimit, user},
};

/// Why the instance could not be prepared.
#[derive(Debug)]
pub struct PrepareError {
    /// What kind of failure, for the agent.
    pub kind: InitErrorKind,
    /// The whole error chain.
    pub message: String,
    /// The exit code reported in `Exited`.
    pub exit_code: i32,
}

/// Exit code for failures before the workload ran (Docker's convention for runtime errors).
pub const INIT_ERROR_EXIT_CODE: i32 = 125;

impl PrepareError {
    /// An error of `kind` from `err` (its whole chain).
    pub fn new(kind: InitErrorKind, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self {
            kind,
            message,
            exit_code: INIT_ERROR_EXIT_CODE,
        }
    }
}

/// A prepared instance.
#[derive(Debug)]
pub struct Prepared {
    /// The workload's argv.
    pub argv: Vec<String>,
    /// How processes are started inside the instance.
    pub template: ProcessTemplate,
    /// Usage and OOM accounting.
    pub cgroups: Cgroups,
    /// The writable layer's root (for its usage).
    pub scratch: Option<File>,
    /// The instance's first address (for readiness of a workload that binds only it).
    pub address: Option<IpAddr>,
}

fn rootfs_err(e: rootfs::RootfsError) -> PrepareError {
    PrepareError::new(InitErrorKind::Rootfs, &e)
}

/// A root assembled before the spec came (a warm-pool member): the image mounted, a fresh
/// writable layer, the overlay and the pseudo filesystems, not yet switched into. The spec's
/// extra mounts and the switch follow in [`prepare`].
#[derive(Debug)]
pub struct PreparedRoot {
    /// What it was assembled from.
    pub root: RootFs,
    layout: rootfs::Layout,
    scratch: Option<File>,
    sandbox_cgroups: Option<Cgroups>,
}

/// Sandbox: finds init's cgroup (while the host's `/proc` and `/sys` are visible) and gives
/// init a cgroup namespace, so the workload's cgroup2 mount shows this cgroup as its root.
/// Done once per boot, before the root is assembled.
fn enter_sandbox_cgroups(mode: Mode) -> Option<Cgroups> {
    match mode {
        Mode::Sandbox => {
            let cg = Cgroups::sandbox();
            if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP) {
                tracing::warn!("Cannot create a cgroup namespace: {e}");
            }
            Some(cg)
        }
        Mode::Vm => None,
    }
}

/// Mounts the image, the writable layer, the overlay and the pseudo filesystems; returns the
/// layout and the scratch handle.
fn mount_root(root: &RootFs, mode: Mode) -> Result<(rootfs::Layout, Option<File>), PrepareError> {
    rootfs::make_private().map_err(rootfs_err)?;
    let image = PathBuf::from(&root.image);
    let meta = std::fs::metadata(&image).map_err(|source| {
        rootfs_err(rootfs::RootfsError::Source {
            path: image.clone(),
            source,
        })
    })?;
    // An image file is attached to a loop device; a block device is used as it is. The device
    // stays open until the image is mounted (closing it earlier would detach it).
    let (device, _loop_dev) = if meta.file_type().is_block_device() {
        (image.clone(), None)
    } else {
        let dev = loopdev::attach_read_only(&image).map_err(|source| {
            rootfs_err(rootfs::RootfsError::Loop {
                image: image.clone(),
                source,
            })
        })?;
        (dev.path.clone(), Some(dev))
    };
    let scratch = if root.scratch_device.is_empty() {
        Scratch::Tmpfs {
            size: if root.disk_size_bytes == 0 {
                defaults::DISK_SIZE
            } else {
                root.disk_size_bytes
            },
        }
    } else {
        Scratch::Device {
            path: root.scratch_device.clone().into(),
        }
    };
    let (layout, steps) =
        rootfs::overlay_steps(Path::new(STAGING), &device, &root.fstype, &scratch);
    rootfs::apply(&steps).map_err(rootfs_err)?;
    let scratch_file = File::open(&layout.scratch).ok();
    rootfs::apply(&rootfs::pseudo_steps(&layout.root, mode)).map_err(rootfs_err)?;
    Ok((layout, scratch_file))
}

/// Assembles `root` ahead of the spec (a warm-pool member told its root in `Welcome`).
pub fn prepare_root(root: &RootFs, mode: Mode) -> Result<PreparedRoot, PrepareError> {
    let t = std::time::Instant::now();
    let sandbox_cgroups = enter_sandbox_cgroups(mode);
    let (layout, scratch) = mount_root(root, mode)?;
    tracing::debug!(
        took_us = t.elapsed().as_micros(),
        "root assembled ahead of the spec"
    );
    Ok(PreparedRoot {
        root: root.clone(),
        layout,
        scratch,
        sandbox_cgroups,
    })
}

/// Gives up a prepared root the spec does not want: everything below the staging tmpfs is
/// detached at once (the loop device detaches itself when its mount is gone).
fn discard_root(p: PreparedRoot) -> Option<Cgroups> {
    drop(p.scratch);
    if let Err(e) = nix::mount::umount2(STAGING, MntFlags::MNT_DETACH) {
        tracing::warn!("Cannot detach the prepared root at {STAGING}: {e}");
    }
    p.sandbox_cgroups
}

/// Prepares everything; on success the process is inside the instance root. `ahead` is the
/// root a warm-pool member assembled before the spec: used when the spec names the same root,
/// else discarded.
pub async fn prepare(
    spec: &InstanceSpec,
    mode: Mode,
    ahead: Option<PreparedRoot>,
) -> Result<Prepared, PrepareError> {
    spec::validate(spec).map_err(|e| PrepareError::new(InitErrorKind::BadSpec, &e))?;
    let argv = spec::argv(spec);
    let hostname = spec::hostname(spec);
    let net_plan = spec
        .network
        .as_ref()
        .map(NetPlan::from_spec)
        .transpose()
        .map_err(|e| PrepareError::new(InitErrorKind::BadSpec, &e))?;
    let rlimits = spec
        .rlimits
        .iter()
        .map(Rlimit::from_spec)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PrepareError::new(InitErrorKind::BadSpec, &e))?;

    if mode == Mode::Sandbox && spec.memory_limit_bytes > 0 {
        tracing::info!("memory_limit_bytes is enforced by the agent's cgroup in the sandbox");
    }
    let want = spec.root.clone().unwrap_or_default();
    let (sandbox_cgroups, layout, scratch) = match ahead {
        Some(p) if p.root == want => (p.sandbox_cgroups, p.layout, p.scratch),
        ahead => {
            // The cgroup namespace is entered once per boot, also when a root is discarded.
            let cgroups = match ahead {
                Some(p) => {
                    tracing::info!(
                        "The spec names another root than the one prepared; assembling it"
                    );
                    discard_root(p)
                }
                None => enter_sandbox_cgroups(mode),
            };
            let (layout, scratch) = mount_root(&want, mode)?;
            (cgroups, layout, scratch)
        }
    };
    // Bind sources are outside the instance: mount before leaving the host's root.
    mounts::mount_all(&spec.mounts, &layout.root).map_err(rootfs_err)?;
    rootfs::switch_root(&layout.root, mode).map_err(rootfs_err)?;

    let cgroups = match sandbox_cgroups {
        Some(cg) => cg,
        None => Cgroups::vm(spec.memory_limit_bytes).unwrap_or_else(|e| {
            tracing::warn!(
                "No workload cgroup ({}); reporting VM-wide figures",
                PrepareError::new(InitErrorKind::Internal, &e).message
            );
            Cgroups::vm_wide()
        }),
    };

    nix::unistd::sethostname(&hostname).map_err(|e| {
        PrepareError::new(
            InitErrorKind::Internal,
            &std::io::Error::other(format!("Cannot set the hostname to {hostname:?}: {e}")),
        )
    })?;
    rootfs::write_file(Path::new("/etc/hostname"), &format!("{hostname}\n"), 0o644)
        .map_err(rootfs_err)?;
    let extra_hosts = spec
        .network
        .as_ref()
        .map(|n| n.hosts.clone())
        .unwrap_or_default();
    rootfs::write_file(
        Path::new("/etc/hosts"),
        &net::hosts_file(&hostname, net_plan.as_ref(), &extra_hosts),
        0o644,
    )
    .map_err(rootfs_err)?;
    if let Some(resolv) = spec.network.as_ref().and_then(net::resolv_conf) {
        rootfs::write_file(Path::new("/etc/resolv.conf"), &resolv, 0o644).map_err(rootfs_err)?;
    }

    net::configure(net_plan.as_ref(), defaults::INTERFACE_WAIT)
        .await
        .map_err(|e| PrepareError::new(InitErrorKind::Network, &e))?;

    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let identity = user::resolve(&spec.user, &read("/etc/passwd"), &read("/etc/group"))
        .map_err(|e| PrepareError::new(InitErrorKind::UnknownUser, &e))?;

    let cwd = spec::working_dir(spec);
    if let Err(e) = std::fs::create_dir_all(cwd) {
        return Err(PrepareError::new(
            InitErrorKind::Spawn,
            &std::io::Error::new(
                e.kind(),
                format!("Cannot create working directory {cwd}: {e}"),
            ),
        ));
    }
    let template = ProcessTemplate::new(spec, &identity, rlimits, cgroups.join_fds(), &hostname);
    Ok(Prepared {
        argv,
        template,
        cgroups,
        scratch,
        address: net_plan.as_ref().and_then(NetPlan::first_address),
    })
}
