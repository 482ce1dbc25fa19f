//! The instances' network, as the lifecycle uses it: an address per instance (allocated at
//! create; every boot gets a fresh one, so no connection or ARP entry of an earlier boot
//! reaches it), its host-side interface (veth for the sandbox, TAP for the microVM) on the node
//! bridge, egress NAT per its policy, and the eBPF programs on that interface (attached before
//! the workload starts, removed when the boot ends). Built on [`crate::net`] and
//! [`crate::ebpf`].
//!
//! Attaching the eBPF programs costs two TCX links, each a kernel grace period (~25 ms
//! together here), and loading them the verifier (~0.1 s): neither is on the start path when it
//! can be avoided. Filters are loaded ahead of time ([`Stash`]); interfaces with their filter
//! attached (a policy that lets nothing through) are made ahead of time for cold starts
//! ([`PreparedNet`], sandbox: in a network namespace of their own, which the instance joins)
//! and for warm-pool members when they boot. A start then only moves the address to the
//! instance, relabels the interface, and swaps the instance's policy in.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::Path,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use hearth_proto::init;

use crate::{
    ebpf::{
        Direction, Filter, FilterError, LoadOptions, NodeAddr, PinRoot, Policy,
        policy::{PolicyError, Rule},
        stash::Stash,
    },
    model::pb,
    net::{AddressPool, InstanceNet, NetConfig, NetError, NetnsRef, Network, NodePlan},
};

/// Why an instance's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// Addresses, interfaces or NAT failed.
    #[error("Instance networking failed")]
    Net(#[from] NetError),
    /// The eBPF programs could not be loaded, attached or removed.
    #[error("The eBPF network policy failed")]
    Filter(#[from] FilterError),
    /// The egress policy does not compile.
    #[error("Invalid egress policy")]
    Policy(#[from] PolicyError),
    /// The instance has no address.
    #[error("Instance {0:?} has no network address")]
    NoAddress(String),
}

/// eBPF counters of one instance, summed over both directions.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetCounters {
    /// Packets let through.
    pub packets_allowed: u64,
    /// Packets dropped.
    pub packets_dropped: u64,
    /// Bytes let through.
    pub bytes_allowed: u64,
    /// Bytes dropped.
    pub bytes_dropped: u64,
}

/// Filters kept loaded ahead of time for the next starts.
const STASHED_FILTERS: usize = 2;
/// Interfaces kept ready for the next cold starts.
const PREPARED_NETS: usize = 2;
/// Names (address holders, pin directories, interface aliases) of prepared interfaces start
/// with this (an instance id cannot).
pub const PREPARED_PREFIX: &str = "_net";

/// An interface made ahead of time for a cold start: an address of its own, the interface on
/// the bridge with the eBPF programs attached (nothing allowed yet), and (sandbox) the network
/// namespace holding the instance's end, `eth0`, for the instance to join.
#[derive(Debug)]
pub struct PreparedNet {
    name: String,
    inst: InstanceNet,
    netns: Option<OwnedFd>,
}

impl PreparedNet {
    /// The network namespace to join (sandbox).
    pub fn netns(&self) -> Option<BorrowedFd<'_>> {
        self.netns.as_ref().map(|f| f.as_fd())
    }

    /// The TAP name and the guest MAC (microvm).
    pub fn tap(&self) -> (String, String) {
        (self.inst.host_ifname.clone(), self.inst.mac.to_string())
    }

    /// The address the instance will have.
    pub fn address(&self) -> Ipv4Addr {
        self.inst.address
    }
}

/// A new network namespace, held by the returned fd (made on a thread of its own, which ends:
/// no thread of the agent changes namespace).
fn new_netns() -> std::io::Result<OwnedFd> {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

/// The node network plus the per-instance eBPF filters.
pub struct NodeNet {
    /// The resolved plan.
    pub plan: NodePlan,
    net: Arc<Network>,
    pool: Mutex<AddressPool>,
    bpf: PinRoot,
    filters: Mutex<HashMap<String, Filter>>,
    stash: Stash,
    nat: tokio::sync::mpsc::UnboundedSender<NatChange>,
    prepared: Mutex<Vec<PreparedNet>>,
    prepare_wake: Arc<Notify>,
    prepared_seq: AtomicU64,
}

/// Keeps [`PREPARED_NETS`] interfaces ready until the node network goes or the agent stops;
/// what is left is removed then.
async fn prepare_loop(
    weak: Weak<NodeNet>,
    wake: Arc<Notify>,
    runtime: crate::config::RuntimeKind,
    shutdown: CancellationToken,
    gate: Arc<super::gate::StartGate>,
) {
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(this) = weak.upgrade() else {
            return;
        };
        if shutdown.is_cancelled() {
            let left: Vec<PreparedNet> = this
                .prepared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect();
            for p in left {
                this.discard_prepared(p).await;
            }
            return;
        }
        let have = this
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        if have < PREPARED_NETS {
            // Out of the way of starts in flight (the same kernel locks).
            drop(this);
            tokio::select! {
                () = gate.quiet(super::gate::MAX_HOLD) => {}
                () = shutdown.cancelled() => continue,
            }
            let Some(this) = weak.upgrade() else {
                return;
            };
            match this.prepare_one(runtime).await {
                Ok(p) => {
                    this.prepared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(p);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %anyhow_chain(&e), "cannot prepare an interface ahead of time");
                    drop(this);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(5)) => {}
                        () = shutdown.cancelled() => {}
                    }
                    continue;
                }
            }
        }
        drop(this);
        tokio::select! {
            () = notified => {}
            () = shutdown.cancelled() => {}
        }
    }
}

fn anyhow_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::instance::anyhow_chain(e)
}

/// A change of an instance's NAT membership, carried out in order by one task.
struct NatChange {
    inst: InstanceNet,
    internet: bool,
    /// Answered once done (allowing waits for it; denying does not, see [`NodeNet::set_nat`]).
    done: Option<tokio::sync::oneshot::Sender<Result<(), NetError>>>,
}

async fn nat_worker(
    net: Arc<Network>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<NatChange>,
) {
    while let Some(c) = changes.recv().await {
        let r = net.set_internet(&c.inst, c.internet).await;
        match c.done {
            Some(done) => {
                let _ = done.send(r);
            }
            None => {
                if let Err(e) = r {
                    tracing::warn!(id = %c.inst.id, error = %e, "cannot update the instance's NAT");
                }
            }
        }
    }
}

impl std::fmt::Debug for NodeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeNet")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

fn policy(
    inst: &InstanceNet,
    plan: &NodePlan,
    spec: &pb::InstanceSpec,
    port: u32,
) -> Result<Policy, NetworkError> {
    let mut p = Policy::new(inst.mac.0);
    p.instance_ipv4 = Some(inst.address);
    p.gateway = NodeAddr::v4(plan.gateway);
    p.dns = NodeAddr::v4(plan.resolver);
    p.ingress_proxy = NodeAddr::v4(plan.ingress_address);
    p.http_ports = u16::try_from(port).ok().into_iter().collect();
    let egress = spec.egress.clone().unwrap_or_default();
    p.internet = egress.internet;
    for c in &egress.allow_cidrs {
        p.allow.push(c.parse::<Rule>()?);
    }
    for c in &egress.deny_cidrs {
        p.deny.push(c.parse::<Rule>()?);
    }
    Ok(p)
}

impl NodeNet {
    /// Sets up the node network (bridge, addresses, NAT table; idempotent) and the eBPF pin
    /// root.
    pub async fn setup(cfg: &NetConfig, bpf_root: &Path) -> Result<Arc<Self>, NetworkError> {
        let plan = cfg.plan()?;
        let net = Network::connect(plan.clone())?;
        net.setup_node().await?;
        let bpf = PinRoot::mounting("/sys/fs/bpf", bpf_root)?;
        let net = Arc::new(net);
        let (nat, changes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(nat_worker(net.clone(), changes));
        Ok(Arc::new(Self {
            pool: Mutex::new(AddressPool::new(&plan)),
            plan,
            net,
            bpf,
            filters: Mutex::new(HashMap::new()),
            stash: Stash::new(STASHED_FILTERS, LoadOptions::default()),
            nat,
            prepared: Mutex::new(Vec::new()),
            prepare_wake: Arc::new(Notify::new()),
            prepared_seq: AtomicU64::new(1),
        }))
    }

    /// Starts keeping interfaces ready for cold starts (after the instances' addresses were
    /// restored: prepared ones take free addresses). First removes what an earlier agent
    /// prepared and left.
    pub fn start_preparing(
        self: &Arc<Self>,
        runtime: crate::config::RuntimeKind,
        shutdown: CancellationToken,
        gate: Arc<super::gate::StartGate>,
    ) {
        let weak = Arc::downgrade(self);
        let wake = self.prepare_wake.clone();
        tokio::spawn(async move {
            if let Some(this) = weak.upgrade() {
                this.remove_orphans(|n| n.starts_with(PREPARED_PREFIX))
                    .await;
            }
            prepare_loop(weak, wake, runtime, shutdown, gate).await;
        });
    }

    /// A prepared interface, if one is ready (the next is prepared in the background).
    pub fn take_prepared(&self) -> Option<PreparedNet> {
        let p = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        self.prepare_wake.notify_one();
        p
    }

    /// A prepared interface becomes instance `id`'s (like a warm-pool member's, see
    /// [`NodeNet::claim_member`]); the namespace fd is closed (the instance holds it now).
    pub async fn claim_prepared(
        &self,
        p: PreparedNet,
        id: &str,
        spec: &pb::InstanceSpec,
        port: u32,
    ) -> Result<init::Network, NetworkError> {
        let r = self.claim_member(&p.name, id, spec, port).await;
        if r.is_err() {
            self.release(&p.name);
        }
        r
    }

    /// Removes a prepared interface that was not used.
    pub async fn discard_prepared(&self, p: PreparedNet) {
        self.detach(&p.name).await;
        self.release(&p.name);
    }

    async fn prepare_one(
        self: &Arc<Self>,
        runtime: crate::config::RuntimeKind,
    ) -> Result<PreparedNet, NetworkError> {
        let n = self.prepared_seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREPARED_PREFIX}{n}");
        let inst = self.allocate_net(&name)?;
        let made = async {
            let netns = match runtime {
                crate::config::RuntimeKind::Sandbox => {
                    let fd = tokio::task::spawn_blocking(new_netns)
                        .await
                        .map_err(|e| NetError::Netns(std::io::Error::other(e)))?
                        .map_err(NetError::Netns)?;
                    self.net
                        .attach_veth(&inst, NetnsRef::Fd(fd.as_fd()))
                        .await?;
                    Some(fd)
                }
                crate::config::RuntimeKind::Microvm => {
                    self.net.attach_tap(&inst).await?;
                    None
                }
            };
            let this = self.clone();
            let i = inst.clone();
            tokio::task::spawn_blocking(move || this.attach_member_filter(&i))
                .await
                .map_err(|e| NetError::Netns(std::io::Error::other(e)))??;
            Ok::<_, NetworkError>(netns)
        }
        .await;
        match made {
            Ok(netns) => Ok(PreparedNet { name, inst, netns }),
            Err(e) => {
                self.detach(&name).await;
                self.release(&name);
                Err(e)
            }
        }
    }

    /// Sets the instance's NAT membership. Allowing waits until it is in force. Denying is
    /// queued and returns at once: it only removes a membership a previous holder of the
    /// address might have left (its detach removes it), the eBPF policy is what keeps an
    /// instance without internet off the internet, and one task applies every change in
    /// order, so a later allow for the address cannot be overtaken.
    async fn set_nat(&self, inst: &InstanceNet, internet: bool) -> Result<(), NetworkError> {
        let (done, wait) = if internet {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let change = NatChange {
            inst: inst.clone(),
            internet,
            done,
        };
        if self.nat.send(change).is_err() {
            // The worker is gone (the runtime shuts down): do it here.
            return Ok(self.net.set_internet(inst, internet).await?);
        }
        if let Some(rx) = wait {
            match rx.await {
                Ok(r) => r?,
                Err(_) => self.net.set_internet(inst, internet).await?,
            }
        }
        Ok(())
    }

    /// Gives `id` an address (the one it holds, else the next free one).
    pub fn allocate(&self, id: &str) -> Result<Ipv4Addr, NetworkError> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        Ok(pool.allocate(id)?.address)
    }

    /// Records the stored address of `id` (after a restart).
    pub fn restore(&self, id: &str, address: Ipv4Addr) -> Result<(), NetworkError> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.insert(id, address)?;
        Ok(())
    }

    /// Frees the address of `id`.
    pub fn release(&self, id: &str) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(id);
    }

    /// What hearth-init configures for `id` at its current address (None without one).
    pub fn init_network(&self, id: &str) -> Option<init::Network> {
        self.instance(id).ok().map(|i| i.init_network())
    }

    fn instance(&self, id: &str) -> Result<InstanceNet, NetworkError> {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .ok_or_else(|| NetworkError::NoAddress(id.to_owned()))
    }

    fn attach_filter(
        &self,
        inst: &InstanceNet,
        spec: &pb::InstanceSpec,
        port: u32,
    ) -> Result<(), NetworkError> {
        let p = policy(inst, &self.plan, spec, port)?;
        // A filter left from an earlier boot (a crash between attach and detach) goes first.
        let _ = self.bpf.remove(&inst.id);
        // Loaded ahead of time (the verifier takes ~0.1 s), given the policy, attached.
        let t = std::time::Instant::now();
        let stashed = self.stash.len();
        let mut f = self.stash.take(&p)?;
        let took = t.elapsed();
        f.attach(&self.bpf, &inst.id, &inst.host_ifname)?;
        tracing::debug!(
            id = %inst.id,
            stashed,
            load_us = took.as_micros(),
            attach_us = (t.elapsed() - took).as_micros(),
            "eBPF filter in force"
        );
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inst.id.clone(), f);
        Ok(())
    }

    /// Sandbox: a veth into the network namespace of `pid`, NAT per the policy, the eBPF
    /// programs on its host end; returns what hearth-init configures.
    pub async fn attach_sandbox(
        &self,
        id: &str,
        pid: i32,
        spec: &pb::InstanceSpec,
        port: u32,
    ) -> Result<init::Network, NetworkError> {
        let inst = self.instance(id)?;
        let _ = self.net.detach(&inst).await;
        self.net
            .attach_veth(&inst, NetnsRef::Pid(pid as u32))
            .await?;
        self.finish_attach(&inst, spec, port).await?;
        Ok(inst.init_network())
    }

    /// MicroVM: the TAP (for hearth-vmm to open), NAT, the eBPF programs; returns the TAP name,
    /// the guest MAC and what hearth-init configures.
    pub async fn attach_tap(
        &self,
        id: &str,
        spec: &pb::InstanceSpec,
        port: u32,
    ) -> Result<(String, String, init::Network), NetworkError> {
        let inst = self.instance(id)?;
        let _ = self.net.detach(&inst).await;
        self.net.attach_tap(&inst).await?;
        self.finish_attach(&inst, spec, port).await?;
        Ok((
            inst.host_ifname.clone(),
            inst.mac.to_string(),
            inst.init_network(),
        ))
    }

    async fn finish_attach(
        &self,
        inst: &InstanceNet,
        spec: &pb::InstanceSpec,
        port: u32,
    ) -> Result<(), NetworkError> {
        let internet = spec.egress.as_ref().is_some_and(|e| e.internet);
        let r = async {
            self.set_nat(inst, internet).await?;
            self.attach_filter(inst, spec, port)
        }
        .await;
        if r.is_err() {
            let _ = self.net.detach(inst).await;
        }
        r
    }

    /// Warm-pool member of the sandbox: an address of its own and a veth into the network
    /// namespace of `pid`, without NAT or eBPF (the member runs no workload; its instance's
    /// policy is attached at the claim, [`NodeNet::claim_member`]).
    pub async fn attach_member_veth(&self, member: &str, pid: i32) -> Result<(), NetworkError> {
        let inst = self.allocate_net(member)?;
        self.net
            .attach_veth(&inst, NetnsRef::Pid(pid as u32))
            .await?;
        self.attach_member_filter(&inst)
    }

    /// The eBPF programs on a member's interface with a policy that lets nothing through:
    /// attaching takes two TCX links (a kernel grace period each, ~25 ms together), which
    /// the claim then does not wait for; it only swaps the policy in.
    fn attach_member_filter(&self, inst: &InstanceNet) -> Result<(), NetworkError> {
        let mut p = Policy::new(inst.mac.0);
        p.instance_ipv4 = Some(inst.address);
        p.gateway = NodeAddr::v4(self.plan.gateway);
        let _ = self.bpf.remove(&inst.id);
        let mut f = self.stash.take(&p)?;
        f.attach(&self.bpf, &inst.id, &inst.host_ifname)?;
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inst.id.clone(), f);
        Ok(())
    }

    /// Warm-pool member of the microvm: an address of its own and its TAP (for hearth-vmm to
    /// open), without NAT or eBPF; returns the TAP name and the guest MAC.
    pub async fn attach_member_tap(&self, member: &str) -> Result<(String, String), NetworkError> {
        let inst = self.allocate_net(member)?;
        self.net.attach_tap(&inst).await?;
        self.attach_member_filter(&inst)?;
        Ok((inst.host_ifname.clone(), inst.mac.to_string()))
    }

    fn allocate_net(&self, id: &str) -> Result<InstanceNet, NetworkError> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        Ok(pool.allocate(id)?)
    }

    /// A warm-pool member becomes instance `id`: the member's address (and so its interface
    /// and MAC) passes to the instance, whose previous address is released (each boot gets a
    /// fresh address); the interface is relabelled, NAT and the eBPF programs follow the
    /// instance's policy. Returns what hearth-init configures.
    pub async fn claim_member(
        &self,
        member: &str,
        id: &str,
        spec: &pb::InstanceSpec,
        port: u32,
    ) -> Result<init::Network, NetworkError> {
        let inst = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let m = pool
                .get(member)
                .ok_or_else(|| NetworkError::NoAddress(member.to_owned()))?;
            pool.release(member);
            pool.release(id);
            pool.insert(id, m.address)?
        };
        let internet = spec.egress.as_ref().is_some_and(|e| e.internet);
        let member_filter = self
            .filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(member);
        let r = async {
            let t = std::time::Instant::now();
            self.net.hand_over(&inst).await?;
            self.set_nat(&inst, internet).await?;
            tracing::debug!(
                id,
                us = t.elapsed().as_micros(),
                "interface handed over, NAT set"
            );
            match member_filter {
                Some(mut f) => {
                    // Already attached: the instance's policy replaces the placeholder, and
                    // the pins move to the instance's name (where a restarted agent looks).
                    f.update_policy(&policy(&inst, &self.plan, spec, port)?)?;
                    let _ = self.bpf.remove(id);
                    f.rename(&self.bpf, id)?;
                    self.filters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.to_owned(), f);
                    Ok(())
                }
                None => self.attach_filter(&inst, spec, port),
            }
        }
        .await;
        if r.is_err() {
            let f = self
                .filters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            match f {
                Some(f) => {
                    let _ = f.remove();
                }
                None => {
                    let _ = self.bpf.remove(member);
                }
            }
            let _ = self.net.detach(&inst).await;
        }
        r?;
        Ok(inst.init_network())
    }

    /// Gives instance `id` a fresh address for its next boot (next fit: not the one it had),
    /// so no connection or ARP entry of an earlier boot reaches the new one.
    pub fn renew_address(&self, id: &str) -> Result<Ipv4Addr, NetworkError> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = pool.allocate(&format!("{id}.next"))?.address;
        pool.release(&format!("{id}.next"));
        pool.release(id);
        Ok(pool.insert(id, fresh)?.address)
    }

    /// After a restart: the interface and the pinned eBPF programs of a running instance.
    pub async fn adopt(&self, id: &str, spec: &pb::InstanceSpec) -> Result<(), NetworkError> {
        let inst = self.instance(id)?;
        let internet = spec.egress.as_ref().is_some_and(|e| e.internet);
        self.net.adopt(&inst, internet).await?;
        let f = Filter::adopt(&self.bpf, id)?;
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), f);
        Ok(())
    }

    /// Removes the eBPF programs and the interface of `id` (the address stays).
    pub async fn detach(&self, id: &str) {
        let f = self
            .filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        match f {
            Some(f) => {
                if let Err(e) = f.remove() {
                    tracing::warn!(id, error = %e, "cannot remove the eBPF programs");
                }
            }
            None => {
                let _ = self.bpf.remove(id);
            }
        }
        if let Ok(inst) = self.instance(id)
            && let Err(e) = self.net.detach(&inst).await
        {
            tracing::warn!(id, error = %e, "cannot remove the instance's interface");
        }
    }

    /// Removes the interfaces and eBPF pins left by an earlier agent whose name (the
    /// interface's alias, the pin directory) satisfies `is_member`: warm-pool members'
    /// (a sandbox member's veth went with its namespace, a TAP stays), prepared ones, and
    /// those of instances without a running boot.
    pub async fn remove_orphans(&self, is_member: impl Fn(&str) -> bool) {
        let found = match self.net.discover().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the instance interfaces");
                return;
            }
        };
        if let Ok(names) = self.bpf.instances() {
            for n in names.iter().filter(|n| is_member(n)) {
                let _ = self.bpf.remove(n);
            }
        }
        for d in found {
            let Some(id) = d.id.as_deref().filter(|id| is_member(id)) else {
                continue;
            };
            if let Ok(inst) = InstanceNet::new(&self.plan, id, d.address)
                && let Err(e) = self.net.detach(&inst).await
            {
                tracing::warn!(ifname = %d.ifname, error = %e, "cannot remove a member's interface");
            }
        }
    }

    /// The eBPF counters of `id`.
    pub fn counters(&self, id: &str) -> Option<NetCounters> {
        let filters = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        let c = filters.get(id)?.counters().ok()?;
        let mut out = NetCounters::default();
        for d in [Direction::Egress, Direction::Ingress] {
            let p = c.passed(d);
            let x = c.dropped(d);
            out.packets_allowed += p.packets;
            out.bytes_allowed += p.bytes;
            out.packets_dropped += x.packets;
            out.bytes_dropped += x.bytes;
        }
        Some(out)
    }

    /// Removes the node network (tests, uninstall).
    pub async fn teardown(&self) {
        if let Err(e) = self.net.teardown_node().await {
            tracing::warn!(error = %e, "cannot tear the node network down");
        }
    }
}
