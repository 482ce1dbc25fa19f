//! One warm-pool member's task: launch the runtime as a member (hearth-init without an
//! instance id), give it its interface, take init's `Hello` and welcome it without a spec but
//! with the root its instance will get (init assembles it while it waits), then wait: for a claim (the member's parts go to the claimer and the task ends), for its idle
//! TTL (recycled), for its pool to drop it, for the agent's shutdown, or for its death. Every
//! end but a claim destroys the member: runtime killed and cleaned up, interface and address
//! released.

use std::{sync::Arc, time::Duration};

use hearth_proto::{
    channel::HostChannel,
    init::{self, guest_message::Msg as G, host_message::Msg as H},
};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;

use super::{Inner, MEMBER_PREFIX, PoolKey, ReadyMember};
use crate::{
    config::RuntimeKind,
    images::ResolvedImage,
    instance::bind_control_socket,
    runtime::{LaunchRequest, Process, RuntimeState, cgroup::Layout},
};

/// How long a new connection has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed member's process has to end before cleanup goes ahead anyway.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The connection to a member's hearth-init (welcomed, no spec yet).
pub type MemberConn = HostChannel<UnixStream>;

/// A booted member, and what a claimer gets: the member's runtime, its process, the control
/// socket's listener (for init's reconnects) and the live connection, on which the claimer
/// sends `assign`.
#[derive(Debug)]
pub struct ClaimedParts {
    /// The runtime's handle (its cgroup and sockets are named after the member).
    pub rt: RuntimeState,
    /// The watched main process.
    pub process: Process,
    /// The control socket's listener.
    pub listener: UnixListener,
    /// The connection, after `Welcome` without a spec.
    pub conn: MemberConn,
}

/// A claimed member. Dropped without [`Claimed::into_parts`] (a start that was cancelled),
/// it is destroyed.
#[derive(Debug)]
pub struct Claimed {
    /// The member's name (`_poolN`): its address, cgroup and sockets carry it.
    pub name: String,
    parts: Option<ClaimedParts>,
    guard: Option<Arc<Inner>>,
}

impl Claimed {
    /// The runtime's handle.
    pub fn rt(&self) -> &RuntimeState {
        &self.parts.as_ref().expect("parts until taken").rt
    }

    /// Takes the parts; the claimer owns the member from now on.
    pub fn into_parts(mut self) -> ClaimedParts {
        self.guard = None;
        self.parts.take().expect("parts until taken")
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let (Some(inner), Some(parts)) = (self.guard.take(), self.parts.take()) {
            let name = std::mem::take(&mut self.name);
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(async move {
                        teardown(&inner, &name, Some(parts.rt), Some(parts.process)).await;
                    });
                }
                Err(_) => inner.runtime.kill(&parts.rt),
            }
        }
    }
}

/// Destroys a claimed member the claimer could not use.
pub(super) async fn destroy_claimed(inner: &Arc<Inner>, mut c: Claimed) {
    c.guard = None;
    if let Some(parts) = c.parts.take() {
        teardown(inner, &c.name, Some(parts.rt), Some(parts.process)).await;
    }
    inner.wake.notify_one();
}

/// Why a boot did not produce a member.
enum BootEnd {
    Failed(String),
    Cancelled,
}

/// Runs one member from launch to its end.
pub(super) async fn run(
    inner: Arc<Inner>,
    key: PoolKey,
    name: String,
    image: ResolvedImage,
    cancel: CancellationToken,
) {
    if let Some(gate) = inner.gate.get() {
        tokio::select! {
            () = gate.quiet(crate::instance::gate::MAX_HOLD) => {}
            () = cancel.cancelled() => {}
        }
    }
    let t0 = tokio::time::Instant::now();
    let booted = match boot(&inner, &key, &name, &image, &cancel).await {
        Ok(b) => b,
        Err(end) => {
            let failed = match end {
                BootEnd::Failed(why) => {
                    tracing::warn!(member = %name, image = %key.image, error = %why, "a warm-pool member failed to boot");
                    Some(why)
                }
                BootEnd::Cancelled => None,
            };
            leave(&inner, &key, &name, |p| {
                if let Some(why) = failed {
                    p.failed(why);
                }
            });
            return;
        }
    };
    tracing::debug!(member = %name, took = ?t0.elapsed(), "warm-pool member ready");
    let (claim_tx, mut claim_rx) = oneshot::channel();
    let listed = {
        let mut st = inner.lock();
        match st.pools.get_mut(&key) {
            Some(pool) => match pool.slots.get_mut(&name) {
                Some(slot) if !slot.retiring => {
                    slot.booting = false;
                    pool.ready.push_back(ReadyMember {
                        name: name.clone(),
                        claim: claim_tx,
                    });
                    pool.succeeded();
                    true
                }
                _ => false,
            },
            None => false,
        }
    };
    if !listed {
        leave(&inner, &key, &name, |_| {});
        teardown(&inner, &name, Some(booted.rt), Some(booted.process)).await;
        return;
    }
    inner.wake.notify_one();
    let ClaimedParts {
        rt,
        process,
        listener,
        mut conn,
    } = booted;
    let ttl = inner.cfg.pool.idle_ttl;
    let ttl_sleep = tokio::time::sleep(if ttl.is_zero() {
        Duration::from_secs(u64::from(u32::MAX))
    } else {
        ttl
    });
    tokio::pin!(ttl_sleep);
    let mut ttl_passed = false;
    enum Ev {
        Claim(Result<oneshot::Sender<Claimed>, oneshot::error::RecvError>),
        Died,
        InitGone(String),
        Ttl,
        Cancelled,
    }
    loop {
        let ev = tokio::select! {
            r = &mut claim_rx => Ev::Claim(r),
            _ = process.wait() => Ev::Died,
            m = conn.recv() => match m {
                // hearth-init could not prepare the member (its root): it ends.
                Ok(Some(G::InitError(e))) if e.fatal => {
                    let msg: String = e.message.chars().take(1024).collect();
                    Ev::InitGone(format!("hearth-init failed: {msg}"))
                }
                // Pong and the like: nothing to do before the spec.
                Ok(Some(_)) => continue,
                Ok(None) => Ev::InitGone("hearth-init closed its connection".into()),
                Err(e) => Ev::InitGone(format!("connection to hearth-init failed: {e}")),
            },
            () = &mut ttl_sleep, if !ttl_passed => Ev::Ttl,
            () = cancel.cancelled() => Ev::Cancelled,
        };
        match ev {
            Ev::Claim(Ok(reply)) => {
                let c = Claimed {
                    name: name.clone(),
                    parts: Some(ClaimedParts {
                        rt,
                        process,
                        listener,
                        conn,
                    }),
                    guard: Some(inner.clone()),
                };
                if let Err(mut c) = reply.send(c) {
                    // The claimer gave up: nobody owns the member, so it goes.
                    c.guard = None;
                    if let Some(p) = c.parts.take() {
                        teardown(&inner, &name, Some(p.rt), Some(p.process)).await;
                    }
                }
                return;
            }
            Ev::Claim(Err(_)) | Ev::Cancelled => {
                // Retired (the pool shrank or went) or the agent shuts down.
                leave(&inner, &key, &name, |_| {});
                break;
            }
            Ev::Died | Ev::InitGone(_) => {
                let why = match ev {
                    Ev::InitGone(why) => why,
                    _ => "the member's process ended while it waited".into(),
                };
                tracing::warn!(member = %name, error = %why, "a warm-pool member was lost");
                leave(&inner, &key, &name, |p| p.failed(why));
                break;
            }
            Ev::Ttl => {
                ttl_passed = true;
                let mine = {
                    let mut st = inner.lock();
                    st.pools.get_mut(&key).is_some_and(|p| {
                        let at = p.ready.iter().position(|r| r.name == name);
                        if let Some(at) = at {
                            p.ready.remove(at);
                            p.slots.remove(&name);
                            p.stats.recycled += 1;
                        }
                        at.is_some()
                    })
                };
                if mine {
                    tracing::debug!(member = %name, "recycling an idle warm-pool member");
                    break;
                }
                // Taken off the queue by a claim under way: wait for it.
            }
        }
    }
    drop(conn);
    drop(listener);
    teardown(&inner, &name, Some(rt), Some(process)).await;
    inner.wake.notify_one();
}

/// Takes the member off its pool's books (queue and slot) and lets `update` record why.
fn leave(inner: &Inner, key: &PoolKey, name: &str, update: impl FnOnce(&mut super::Pool)) {
    {
        let mut st = inner.lock();
        if let Some(p) = st.pools.get_mut(key) {
            p.ready.retain(|r| r.name != name);
            p.slots.remove(name);
            update(p);
        }
    }
    inner.wake.notify_one();
}

async fn boot(
    inner: &Arc<Inner>,
    key: &PoolKey,
    name: &str,
    image: &ResolvedImage,
    cancel: &CancellationToken,
) -> Result<ClaimedParts, BootEnd> {
    let socket = inner.runtime.control_socket(name);
    let listener = bind_control_socket(&socket)
        .map_err(|e| BootEnd::Failed(format!("cannot listen on {}: {e}", socket.display())))?;
    let kind = inner.runtime.kind();
    let (mut tap, mut mac) = (None, None);
    if let (Some(net), RuntimeKind::Microvm) = (&inner.net, kind) {
        match net.attach_member_tap(name).await {
            Ok((t, m)) => {
                tap = Some(t);
                mac = Some(m);
            }
            Err(e) => {
                teardown(inner, name, None, None).await;
                return Err(BootEnd::Failed(crate::instance::anyhow_chain(&e)));
            }
        }
    }
    let runtime = inner.runtime.clone();
    let (n, img, it) = (name.to_owned(), image.clone(), key.instance_type());
    let launched = tokio::task::spawn_blocking(move || {
        runtime.launch(&LaunchRequest {
            id: &n,
            boot: 1,
            image: &img,
            instance_type: &it,
            tap,
            mac,
            warm: true,
            netns: None,
        })
    })
    .await;
    let rt = match launched {
        Ok(Ok(rt)) => rt,
        Ok(Err(e)) => {
            teardown(inner, name, None, None).await;
            return Err(BootEnd::Failed(crate::instance::anyhow_chain(&e)));
        }
        Err(e) => {
            teardown(inner, name, None, None).await;
            return Err(BootEnd::Failed(format!("the launch task failed: {e}")));
        }
    };
    let process = match Process::adopt(&rt) {
        Ok(Some(p)) => p,
        _ => {
            teardown(inner, name, Some(rt), None).await;
            return Err(BootEnd::Failed(
                "the member's process ended right after launch".into(),
            ));
        }
    };
    if let (Some(net), RuntimeKind::Sandbox) = (&inner.net, kind)
        && let Err(e) = net.attach_member_veth(name, rt.pid).await
    {
        teardown(inner, name, Some(rt), Some(process)).await;
        return Err(BootEnd::Failed(crate::instance::anyhow_chain(&e)));
    }
    let timeout = inner.cfg.lifecycle.init_connect_timeout;
    // What a claim's spec names (`Manager::start_warm` computes the same).
    let root = inner.runtime.init_rootfs(image, key.disk_mib << 20);
    let handshake = async {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => return Err(format!("accept on the control socket failed: {e}")),
            };
            let mut conn = match HostChannel::accept(stream, HELLO_TIMEOUT).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(member = %name, error = %e, "hearth-init handshake failed");
                    continue;
                }
            };
            let hello = conn.hello().clone();
            if !hello.instance_id.is_empty() || hello.reconnect {
                let _ = conn
                    .reject(format!(
                        "this socket belongs to warm-pool member {name}, which has no instance yet"
                    ))
                    .await;
                continue;
            }
            // No spec yet, but the root it will get: init assembles it while it waits.
            let welcome = init::Welcome {
                protocol_version: hello.protocol_version.min(hearth_proto::PROTOCOL_VERSION),
                spec: None,
                resume_after_log_seq: 0,
                root: Some(root.clone()),
            };
            match conn.send(H::Welcome(welcome)).await {
                Ok(()) => return Ok(conn),
                Err(e) => {
                    tracing::debug!(member = %name, error = %e, "cannot welcome hearth-init");
                }
            }
        }
    };
    let r = tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => match r {
            Ok(r) => r,
            Err(_) => Err(format!("hearth-init did not connect within {timeout:?}")),
        },
        _ = process.wait() => Err("the member's process ended before hearth-init connected".into()),
        () = cancel.cancelled() => {
            teardown(inner, name, Some(rt), Some(process)).await;
            return Err(BootEnd::Cancelled);
        }
    };
    match r {
        Ok(conn) => Ok(ClaimedParts {
            rt,
            process,
            listener,
            conn,
        }),
        Err(why) => {
            let log = inner
                .cfg
                .state_dir
                .join("instances")
                .join(name)
                .join("runtime.log");
            let tail = std::fs::read_to_string(&log)
                .map(|t| {
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(5)..].join("\n")
                })
                .unwrap_or_default();
            teardown(inner, name, Some(rt), Some(process)).await;
            Err(BootEnd::Failed(if tail.is_empty() {
                why
            } else {
                format!("{why}; its log ends with:\n{tail}")
            }))
        }
    }
}

/// Kills and removes a member: runtime, process, sockets, interface, address.
async fn teardown(inner: &Inner, name: &str, rt: Option<RuntimeState>, process: Option<Process>) {
    if let Some(rt) = &rt {
        inner.runtime.kill(rt);
    }
    if let Some(p) = process {
        p.kill();
        if tokio::time::timeout(KILL_WAIT, p.wait()).await.is_err() {
            tracing::warn!(member = %name, "a killed warm-pool member did not end");
        }
    }
    if let Some(rt) = rt {
        let runtime = inner.runtime.clone();
        match tokio::task::spawn_blocking(move || runtime.cleanup(&rt)).await {
            Ok(Err(e)) => tracing::warn!(member = %name, error = %e, "member cleanup failed"),
            Err(e) => tracing::warn!(member = %name, error = %e, "member cleanup task failed"),
            Ok(Ok(())) => {}
        }
    }
    crate::runtime::sandbox::remove_if_exists(&inner.runtime.control_socket(name));
    let _ = std::fs::remove_dir_all(inner.cfg.state_dir.join("instances").join(name));
    if let Some(net) = &inner.net {
        net.detach(name).await;
        net.release(name);
    }
}

/// Removes what members of an earlier agent left: cgroups, run files, interfaces. Names in
/// `in_use` belong to adopted instances (claimed members of the earlier agent) and stay.
pub(super) async fn remove_orphans(inner: &Inner, in_use: &[String]) {
    let orphan = |n: &str| n.starts_with(MEMBER_PREFIX) && !in_use.iter().any(|u| u == n);
    if let Ok(layout) = Layout::host(&inner.cfg.cgroup.parent) {
        for (_, parent) in &layout.parents {
            let Ok(rd) = std::fs::read_dir(parent) else {
                continue;
            };
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && orphan(&n) {
                    tracing::info!(member = %n, "removing a warm-pool member of an earlier agent");
                    let cg = layout.instance(&n);
                    cg.kill_all();
                    if let Err(e) = cg.remove() {
                        tracing::warn!(member = %n, error = %e, "cannot remove a member's cgroup");
                    }
                }
            }
        }
    }
    for dir in [
        inner.cfg.run_dir.join("i"),
        inner.cfg.state_dir.join("instances"),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let base = n.split('.').next().unwrap_or("");
            if orphan(base) {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
    if let Some(net) = &inner.net {
        net.remove_orphans(orphan).await;
    }
}
