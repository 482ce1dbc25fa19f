//! The instances' network, as the lifecycle uses it: an address per instance (from create to
//! destroy, so an instance keeps its address across restarts), its host-side interface (veth
//! for the sandbox, TAP for the microVM) on the node bridge, egress NAT per its policy, and the
//! eBPF programs on that interface (attached before the workload starts, removed when the boot
//! ends). Built on [`crate::net`] and [`crate::ebpf`].

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
};

use hearth_proto::init;

use crate::{
    ebpf::{
        Direction, Filter, FilterError, LoadOptions, NodeAddr, PinRoot, Policy,
        policy::{PolicyError, Rule},
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

/// The node network plus the per-instance eBPF filters.
pub struct NodeNet {
    /// The resolved plan.
    pub plan: NodePlan,
    net: Network,
    pool: Mutex<AddressPool>,
    bpf: PinRoot,
    filters: Mutex<HashMap<String, Filter>>,
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
        Ok(Arc::new(Self {
            pool: Mutex::new(AddressPool::new(&plan)),
            plan,
            net,
            bpf,
            filters: Mutex::new(HashMap::new()),
        }))
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
        let f = Filter::load_and_attach(
            &self.bpf,
            &inst.id,
            &inst.host_ifname,
            &p,
            &LoadOptions::default(),
        )?;
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
            self.net.set_internet(inst, internet).await?;
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
        Ok(())
    }

    /// Warm-pool member of the microvm: an address of its own and its TAP (for hearth-vmm to
    /// open), without NAT or eBPF; returns the TAP name and the guest MAC.
    pub async fn attach_member_tap(&self, member: &str) -> Result<(String, String), NetworkError> {
        let inst = self.allocate_net(member)?;
        self.net.attach_tap(&inst).await?;
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
        let r = async {
            self.net.hand_over(&inst, internet).await?;
            self.attach_filter(&inst, spec, port)
        }
        .await;
        if r.is_err() {
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

    /// Removes the interfaces of warm-pool members left by an earlier agent (their alias
    /// satisfies `is_member`); a sandbox member's veth went with its namespace, a TAP stays.
    pub async fn remove_orphans(&self, is_member: impl Fn(&str) -> bool) {
        let found = match self.net.discover().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the instance interfaces");
                return;
            }
        };
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
