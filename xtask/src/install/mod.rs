//! `cargo xtask install` / `uninstall` (issue 9): puts Hearth on a host (or into a DESTDIR)
//! and takes it off again. `docs/install.md` lists every file, its mode and why.
//!
//! Install builds the release binaries (or takes them from `--bin-dir`), the guest kernel (or
//! `--kernel`), packs hearth-init into the microVM initramfs, writes each file only when it
//! differs from what is there (so a second run changes nothing), writes the config only when
//! there is none (showing how an existing one differs from the new defaults), installs the
//! systemd unit, creates the `hearth` group that owns the control socket, runs the preflight
//! (`hearth-agent doctor`) and, with `--start`, enables and starts the unit. With a DESTDIR it
//! only writes files. Uninstall removes what install wrote and keeps state and config unless
//! `--purge`.
//!
//! # Layout
//!
//! - this file: the options, the installed paths ([`Paths`]), the two commands;
//! - [`files`]: idempotent writes and removals below an optional DESTDIR, and the config diff;
//! - [`render`]: the config, the unit, the initramfs, and the input checks;
//! - [`host`]: what touches the running system (group, systemd, instance processes).

mod files;
mod host;
mod render;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util;
use files::Tree;

/// The group whose members may use the control socket.
pub const GROUP: &str = "hearth";
/// The unit's name.
pub const UNIT: &str = "hearth-agent.service";

/// The runtime the written config selects.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Runtime {
    /// A hearth-vmm microVM per instance (needs hardware virtualization).
    Microvm,
    /// hearth-init in Linux namespaces (weaker isolation; no KVM needed).
    Sandbox,
}

impl Runtime {
    fn as_str(self) -> &'static str {
        match self {
            Runtime::Microvm => "microvm",
            Runtime::Sandbox => "sandbox",
        }
    }
}

/// Options of `cargo xtask install`.
#[derive(clap::Args)]
pub struct InstallArgs {
    /// Where the programs go: PREFIX/bin, PREFIX/libexec/hearth.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage every file below DIR instead of / (packaging, tests): no group, no systemctl, no
    /// preflight.
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
    /// The runtime a newly written config selects.
    #[arg(long, value_enum, default_value = "microvm")]
    pub runtime: Runtime,
    /// Install this guest kernel (vmlinux or bzImage) instead of the one `cargo xtask kernel`
    /// builds.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Take hearth-agent, hearthctl, hearth-vmm and the static hearth-init from DIR instead of
    /// building them.
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Enable and start hearth-agent.service (restart it when something changed).
    #[arg(long)]
    pub start: bool,
}

/// Options of `cargo xtask uninstall`.
#[derive(clap::Args)]
pub struct UninstallArgs {
    /// The prefix given to install.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// The DESTDIR given to install.
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
    /// Also remove state and configuration (/var/lib/hearth, /etc/hearth, /run/hearth) and the
    /// hearth group.
    #[arg(long)]
    pub purge: bool,
    /// Uninstall even while instance processes (hearth-vmm, hearth-init) still run.
    #[arg(long)]
    pub force: bool,
}

/// Where everything goes (as installed, without DESTDIR).
#[derive(Debug, Clone)]
pub struct Paths {
    prefix: PathBuf,
}

impl Paths {
    /// The layout for `prefix`.
    pub fn new(prefix: PathBuf) -> Self {
        Self { prefix }
    }
    /// `PREFIX/bin`: hearth-agent, hearthctl.
    pub fn bin_dir(&self) -> PathBuf {
        self.prefix.join("bin")
    }
    /// `PREFIX/libexec/hearth`: hearth-vmm, hearth-init.
    pub fn libexec(&self) -> PathBuf {
        self.prefix.join("libexec/hearth")
    }
    /// hearth-vmm.
    pub fn vmm(&self) -> PathBuf {
        self.libexec().join("hearth-vmm")
    }
    /// The static hearth-init.
    pub fn init(&self) -> PathBuf {
        self.libexec().join("hearth-init")
    }
    /// `/etc/hearth`.
    pub fn config_dir(&self) -> PathBuf {
        PathBuf::from("/etc/hearth")
    }
    /// The agent's config.
    pub fn config(&self) -> PathBuf {
        self.config_dir().join("agent.toml")
    }
    /// The systemd unit.
    pub fn unit(&self) -> PathBuf {
        Path::new("/etc/systemd/system").join(UNIT)
    }
    /// The agent's state directory (its default `state_dir`).
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from("/var/lib/hearth")
    }
    /// The agent's run directory (its default `run_dir`).
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from("/run/hearth")
    }
    /// The guest kernel and initramfs.
    pub fn guest_dir(&self) -> PathBuf {
        self.state_dir().join("guest")
    }
    /// The guest kernel.
    pub fn kernel(&self) -> PathBuf {
        self.guest_dir().join("vmlinux")
    }
    /// The initramfs with hearth-init as `/init`.
    pub fn initrd(&self) -> PathBuf {
        self.guest_dir().join("initramfs.cpio")
    }
}

/// The programs to install.
struct Binaries {
    agent: PathBuf,
    ctl: PathBuf,
    vmm: PathBuf,
    init: PathBuf,
}

fn absolute(p: &Path, what: &str) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("Bad {what} {}", p.display()))
}

fn check_prefix(prefix: &Path) -> anyhow::Result<()> {
    if !prefix.is_absolute() {
        bail!(
            "--prefix must be an absolute path, not {}",
            prefix.display()
        );
    }
    Ok(())
}

/// Builds the release binaries and says where they are.
fn build() -> anyhow::Result<Binaries> {
    let root = util::root();
    util::step(
        "build hearth-agent, hearthctl, hearth-vmm (release)",
        || {
            util::run(util::cargo().current_dir(&root).args([
                "build",
                "--release",
                "--package",
                "hearth-agent",
                "--package",
                "hearth-vmm",
                "--bin",
                "hearth-agent",
                "--bin",
                "hearthctl",
                "--bin",
                "hearth-vmm",
            ]))
        },
    )?;
    let musl = hearth_testkit::artifacts::MUSL_TARGET;
    util::step("build the static hearth-init (release, musl)", || {
        util::run(util::cargo().current_dir(&root).args([
            "build",
            "--release",
            "--package",
            "hearth-init",
            "--bin",
            "hearth-init",
            "--target",
            musl,
        ]))
    })?;
    let target = hearth_testkit::artifacts::target_dir();
    let release = target.join("release");
    Ok(Binaries {
        agent: release.join("hearth-agent"),
        ctl: release.join("hearthctl"),
        vmm: release.join("hearth-vmm"),
        init: target.join(musl).join("release/hearth-init"),
    })
}

/// Installs Hearth.
pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    // Everything that can be wrong with the input is found before anything is written.
    check_prefix(&args.prefix)?;
    let destdir = args
        .destdir
        .as_deref()
        .map(|d| absolute(d, "--destdir"))
        .transpose()?;
    if destdir.is_none() && !util::is_root() {
        bail!("Installing on this host needs root (or stage the files with --destdir DIR)");
    }
    let systemd = host::systemd_running();
    if args.start {
        if destdir.is_some() {
            bail!("--start cannot be combined with --destdir");
        }
        if !systemd {
            bail!(
                "--start needs systemd as the service manager, and it is not running here; \
                 install without --start and run `hearth-agent --config /etc/hearth/agent.toml` \
                 under your supervisor"
            );
        }
    }
    let paths = Paths::new(args.prefix.clone());
    let kernel_bytes = match &args.kernel {
        Some(k) => {
            let bytes = render::read(k)?;
            render::check_kernel(k, &bytes)?;
            Some(bytes)
        }
        None => None,
    };
    if args.bin_dir.is_none() || kernel_bytes.is_none() {
        // Building needs the toolchains, targets and packages setup installs.
        crate::setup::run(&crate::setup::Args { check: false })?;
    }
    let bins = match &args.bin_dir {
        Some(dir) => Binaries {
            agent: dir.join("hearth-agent"),
            ctl: dir.join("hearthctl"),
            vmm: dir.join("hearth-vmm"),
            init: dir.join("hearth-init"),
        },
        None => build()?,
    };
    let agent = render::read(&bins.agent)?;
    let ctl = render::read(&bins.ctl)?;
    let vmm = render::read(&bins.vmm)?;
    let init = render::read(&bins.init)?;
    render::check_static(&bins.init, &init)?;
    let kernel = match kernel_bytes {
        Some(k) => k,
        None => {
            let built = crate::kernel::build(false)?;
            render::read(&built.vmlinux)?
        }
    };
    let defaults = util::output(Command::new(&bins.agent).arg("print-defaults"))
        .context("The hearth-agent to install cannot print its defaults")?;
    let config = render::config(&defaults, &paths, args.runtime.as_str())?;
    check_config(&bins.agent, &config)?;
    let systemd_version = host::systemd_version();
    let unit = render::unit(&paths, systemd_version);

    match &destdir {
        Some(d) => println!("install into {} (DESTDIR):", d.display()),
        None => println!("install:"),
    }
    let mut tree = Tree::new(destdir.clone());
    tree.dir(&paths.bin_dir(), 0o755, false)?;
    tree.file(&paths.bin_dir().join("hearth-agent"), &agent, 0o755)?;
    tree.file(&paths.bin_dir().join("hearthctl"), &ctl, 0o755)?;
    tree.dir(&paths.libexec(), 0o755, true)?;
    tree.file(&paths.vmm(), &vmm, 0o755)?;
    tree.file(&paths.init(), &init, 0o755)?;
    tree.dir(&paths.state_dir(), 0o750, true)?;
    tree.dir(&paths.guest_dir(), 0o755, true)?;
    tree.file(&paths.kernel(), &kernel, 0o644)?;
    tree.file(&paths.initrd(), &render::initramfs(&init), 0o644)?;
    tree.dir(&paths.config_dir(), 0o755, true)?;
    write_config(&mut tree, &paths, &config)?;
    let unit_dir = paths
        .unit()
        .parent()
        .expect("the unit path has a directory")
        .to_owned();
    tree.dir(&unit_dir, 0o755, false)?;
    let unit_outcome = tree.file(&paths.unit(), unit.as_bytes(), 0o644)?;

    let changed = tree.changes();
    if destdir.is_some() {
        println!(
            "{}; on the target host: groupadd --system {GROUP}, systemctl daemon-reload, \
             hearth-agent doctor (see docs/install.md)",
            summary(changed)
        );
        return Ok(());
    }

    let mut host_changes = 0;
    if host::ensure_group(GROUP)? {
        host_changes += 1;
    }
    if systemd && unit_outcome.changed() {
        util::run(Command::new("systemctl").arg("daemon-reload"))?;
        println!("  systemctl daemon-reload");
    }
    println!("{}", summary(changed + host_changes));

    println!("preflight:");
    let doctor = Command::new(paths.bin_dir().join("hearth-agent"))
        .arg("--config")
        .arg(paths.config())
        .arg("doctor")
        .status()
        .context("Cannot run hearth-agent doctor")?;
    if !systemd {
        println!(
            "systemd is not running here: start the agent under your supervisor with \
             `{} --config {}`",
            paths.bin_dir().join("hearth-agent").display(),
            paths.config().display()
        );
        return Ok(());
    }
    if !args.start {
        if host::unit_active() && changed > 0 {
            println!("{UNIT} is running the old files: systemctl restart {UNIT}");
        } else {
            println!("not started; to start now and at boot: systemctl enable --now {UNIT}");
        }
        return Ok(());
    }
    if !doctor.success() {
        bail!("Not starting {UNIT}: the preflight above failed (fix it, then run install again)");
    }
    util::run(Command::new("systemctl").args(["enable", UNIT]))?;
    let verb = if !host::unit_active() {
        "start"
    } else if changed > 0 {
        "restart"
    } else {
        println!("{UNIT} is enabled and running");
        return Ok(());
    };
    util::run(Command::new("systemctl").args([verb, UNIT]))?;
    println!("systemctl {verb} {UNIT}: done (instances keep running across restarts)");
    Ok(())
}

fn summary(changed: usize) -> String {
    if changed == 0 {
        "nothing changed".to_owned()
    } else {
        format!("{changed} changed")
    }
}

/// Has the agent itself parse the config it is about to be given.
fn check_config(agent: &Path, config: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("Cannot create a temporary directory")?;
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config)?;
    util::output(
        Command::new(agent)
            .arg("--config")
            .arg(&path)
            .arg("print-config"),
    )
    .context("The config install would write is refused by the hearth-agent to install")?;
    Ok(())
}

/// Writes the config when there is none; otherwise keeps it and shows how it differs.
fn write_config(tree: &mut Tree, paths: &Paths, config: &str) -> anyhow::Result<()> {
    let target = paths.config();
    let staged = tree.staged(&target);
    match std::fs::read_to_string(&staged) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tree.file(&target, config.as_bytes(), 0o644)?;
        }
        Err(e) => return Err(e).with_context(|| format!("Cannot read {}", staged.display())),
        Ok(existing) if existing == config => {
            tree.file(&target, config.as_bytes(), 0o644)?;
        }
        Ok(existing) => {
            tree.keep(
                &target,
                "yours, never overwritten; it differs from the new defaults:",
            );
            let diff = files::unified_diff(
                &format!("{} (yours)", target.display()),
                &existing,
                "new defaults",
                config,
            )
            .expect("the texts differ");
            for line in diff.lines() {
                println!("      {line}");
            }
        }
    }
    Ok(())
}

/// Removes what install put there.
pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    check_prefix(&args.prefix)?;
    let destdir = args
        .destdir
        .as_deref()
        .map(|d| absolute(d, "--destdir"))
        .transpose()?;
    if destdir.is_none() && !util::is_root() {
        bail!("Uninstalling from this host needs root (or name the --destdir)");
    }
    let paths = Paths::new(args.prefix.clone());
    let systemd = destdir.is_none() && host::systemd_running();
    if destdir.is_none() {
        let running = host::processes_of(&[paths.vmm(), paths.init()]);
        if !running.is_empty() && !args.force {
            bail!(
                "{} instance process(es) still run from this install (pids {}): stop the \
                 instances first (hearthctl stop / destroy), or pass --force to leave them \
                 running without an agent",
                running.len(),
                running
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if systemd && paths.unit().exists() {
            util::run(Command::new("systemctl").args(["disable", "--now", UNIT]))?;
            println!("  systemctl disable --now {UNIT}");
        }
    }
    let mut tree = Tree::new(destdir.clone());
    // Where the config put the agent's directories, for the note below (read before purging).
    let configured = host::configured_dirs(&tree.staged(&paths.config()));
    match &destdir {
        Some(d) => println!("uninstall from {} (DESTDIR):", d.display()),
        None => println!("uninstall:"),
    }
    tree.remove_file(&paths.unit())?;
    tree.remove_file(&paths.bin_dir().join("hearth-agent"))?;
    tree.remove_file(&paths.bin_dir().join("hearthctl"))?;
    tree.remove_file(&paths.vmm())?;
    tree.remove_file(&paths.init())?;
    tree.remove_empty_dir(&paths.libexec())?;
    tree.remove_file(&paths.kernel())?;
    tree.remove_file(&paths.initrd())?;
    tree.remove_empty_dir(&paths.guest_dir())?;
    let mut group_removed = 0;
    if args.purge {
        tree.remove_tree(&paths.config_dir())?;
        tree.remove_tree(&paths.state_dir())?;
        if destdir.is_none() {
            tree.remove_tree(&paths.run_dir())?;
            if host::remove_group(GROUP)? {
                println!("  removed   group {GROUP}");
                group_removed = 1;
            }
        }
        for (key, dir) in configured {
            if !dir.starts_with(paths.state_dir()) && !dir.starts_with(paths.run_dir()) {
                println!(
                    "  note: {key} = {} is outside what install made: not removed",
                    dir.display()
                );
            }
        }
    } else {
        if tree.staged(&paths.config()).exists() {
            tree.keep(&paths.config(), "config; --purge removes it");
        }
        if tree.staged(&paths.state_dir()).exists() {
            tree.keep(&paths.state_dir(), "state; --purge removes it");
        }
    }
    if systemd {
        util::run(Command::new("systemctl").arg("daemon-reload"))?;
    }
    if destdir.is_none() {
        println!(
            "  note: the node network the agent made (its bridge and nftables table) and its \
             eBPF pins stay until reboot; docs/install.md says how to remove them now"
        );
    }
    println!("{}", summary(tree.changes() + group_removed));
    Ok(())
}
