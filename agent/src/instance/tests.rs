//! The lifecycle's timers end to end with paused tokio time: a fake runtime (a real `sleep`
//! process), a fake hearth-init speaking the real protocol over the real control socket, and
//! the real manager and supervisor. Ten minutes of sleep_after and a fifteen-minute grace pass
//! in milliseconds.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt as _, StreamExt as _, future::BoxFuture};
use hearth_proto::{
    channel::GuestChannel,
    init::{self, GuestMessage, guest_message::Msg as G, host_message::Msg as H},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::Manager;
use crate::{
    config::{Config, RuntimeKind},
    events::EventLog,
    images::{ImageCache, ImageConfig, ImageError, ProgressSender, ResolvedImage},
    model::pb,
    runtime::{LaunchRequest, Runtime, RuntimeError, RuntimeState, RuntimeUsage, sys},
    store::Store,
};

struct FakeRuntime {
    dir: PathBuf,
    kills: AtomicU32,
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Sandbox
    }

    fn control_socket(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.sock"))
    }

    fn init_rootfs(&self, _image: &ResolvedImage, _disk: u64) -> init::RootFs {
        init::RootFs::default()
    }

    fn launch(&self, req: &LaunchRequest<'_>) -> Result<RuntimeState, RuntimeError> {
        // A real process stands in for the instance; the supervisor reaps it through a pidfd.
        let child = std::process::Command::new("sleep")
            .arg("100000")
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                what: "sleep".into(),
                source,
            })?;
        let pid = child.id() as i32;
        Ok(RuntimeState {
            kind: RuntimeKind::Sandbox,
            pid,
            start_time: sys::start_time(pid).unwrap(),
            cgroup: None,
            dir: self.dir.join(req.id),
            control_socket: self.control_socket(req.id),
            vmm_socket: None,
        })
    }

    fn kill(&self, state: &RuntimeState) {
        self.kills.fetch_add(1, Ordering::Relaxed);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(state.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Wait (in real time) until it is a zombie, so its pidfd is readable before tokio's
        // paused clock could auto-advance past the moment of the kill.
        for _ in 0..2000 {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", state.pid)).unwrap_or_default();
            let st = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            if matches!(st, Some(Some('Z')) | None) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn cleanup(&self, _state: &RuntimeState) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn reap(&self, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn oom_kills(&self, _state: &RuntimeState) -> u64 {
        0
    }

    fn usage(&self, _state: &RuntimeState) -> RuntimeUsage {
        RuntimeUsage::default()
    }
}

struct FakeImages;

fn image() -> ResolvedImage {
    ResolvedImage {
        reference: "registry.test/app:v1".into(),
        digest: "sha256:00".into(),
        rootfs: "/bin/sh".into(),
        fstype: "erofs".into(),
        size_bytes: 1,
        config: ImageConfig {
            cmd: vec!["/bin/app".into()],
            ..Default::default()
        },
    }
}

impl ImageCache for FakeImages {
    fn lookup(&self, _reference: &str) -> Result<Option<ResolvedImage>, ImageError> {
        Ok(Some(image()))
    }

    fn pull<'a>(
        &'a self,
        _reference: &'a str,
        _progress: Option<ProgressSender>,
    ) -> BoxFuture<'a, Result<ResolvedImage, ImageError>> {
        Box::pin(async { Ok(image()) })
    }

    fn list(&self) -> Result<Vec<pb::ImageInfo>, ImageError> {
        Ok(Vec::new())
    }

    fn remove(&self, _reference: &str) -> Result<(), ImageError> {
        Ok(())
    }

    fn pin(&self, _digest: &str) -> Result<(), ImageError> {
        Ok(())
    }

    fn unpin(&self, _digest: &str) -> Result<(), ImageError> {
        Ok(())
    }
}

const S: i64 = 1_000_000_000;

/// A manager over the fakes, in `dir`.
fn manager(dir: &std::path::Path) -> (Arc<Manager>, Arc<FakeRuntime>) {
    manager_with(dir, TaskTracker::new(), CancellationToken::new())
}

/// A manager over the fakes, in `dir`, with its supervisors' tracker and shutdown token.
fn manager_with(
    dir: &std::path::Path,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> (Arc<Manager>, Arc<FakeRuntime>) {
    let cfg = Config {
        state_dir: dir.join("s"),
        run_dir: dir.join("r"),
        ..Config::default()
    };
    std::fs::create_dir_all(&cfg.run_dir).unwrap();
    let runtime = Arc::new(FakeRuntime {
        dir: cfg.run_dir.clone(),
        kills: AtomicU32::new(0),
    });
    let store = Arc::new(Store::open(&dir.join("state.redb")).unwrap());
    let mgr = Manager::new(
        Arc::new(cfg),
        EventLog::new(store),
        runtime.clone(),
        Arc::new(FakeImages),
        None,
        tracker,
        shutdown,
    )
    .unwrap();
    (mgr, runtime)
}

/// Whatever a (buggy or hostile) guest might send, as a proptest strategy.
fn guest_message() -> impl proptest::strategy::Strategy<Value = G> {
    use proptest::prelude::*;
    prop_oneof![
        Just(G::Started(init::Started::default())),
        Just(G::Ready(init::Ready::default())),
        Just(G::Hello(init::Hello::default())),
        (
            any::<u64>(),
            any::<i32>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<bool>()
        )
            .prop_map(|(seq, stream, data, partial)| G::Log(init::LogRecord {
                seq,
                stream,
                data,
                partial,
                ..Default::default()
            })),
        any::<u64>().prop_map(|count| G::LogsDropped(init::LogsDropped {
            count,
            ..Default::default()
        })),
        any::<u64>().prop_map(|m| G::Metrics(init::Metrics {
            memory_used_bytes: m,
            ..Default::default()
        })),
        (any::<i32>(), ".{0,40}", any::<bool>()).prop_map(|(kind, message, fatal)| {
            G::InitError(init::InitError {
                kind,
                message,
                fatal,
                ..Default::default()
            })
        }),
        (any::<u64>(), any::<i32>()).prop_map(|(request_id, exit_code)| {
            G::ExecResult(init::ExecResult {
                request_id,
                exit_code,
                ..Default::default()
            })
        }),
        (any::<i32>(), any::<i32>()).prop_map(|(exit_code, reason)| G::Exited(init::Exited {
            exit_code,
            reason,
            ..Default::default()
        })),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    /// A guest can send anything in any order: the agent stays consistent (bounded error
    /// events, the instance can always be destroyed, its end is recorded).
    #[test]
    fn any_guest_message_sequence_leaves_the_agent_consistent(
        msgs in proptest::collection::vec(guest_message(), 0..40)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (mgr, _runtime) = manager(dir.path());
            mgr.create("g", pb::InstanceSpec {
                image: "registry.test/app:v1".into(),
                ..Default::default()
            }).await.unwrap();
            mgr.start("g").await.unwrap();
            let stream = tokio::net::UnixStream::connect(dir.path().join("r/g.sock")).await.unwrap();
            let hello = init::Hello {
                protocol_version: hearth_proto::PROTOCOL_VERSION,
                instance_id: "g".into(),
                boot_id: "b".into(),
                ..Default::default()
            };
            let (ch, _) = GuestChannel::connect(stream, hello, Duration::from_secs(10)).await.unwrap();
            let mut guest = ch.into_framed();
            for m in msgs {
                if guest.send(GuestMessage { msg: Some(m) }).await.is_err() {
                    break;
                }
            }
            // Let the supervisor take everything in.
            tokio::time::sleep(Duration::from_millis(50)).await;
            mgr.destroy("g").await.unwrap();
            let mut w = Box::pin(mgr.events.watch(1, Some("g".into())));
            let mut evs = Vec::new();
            while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), w.next()).await {
                evs.push(e.unwrap());
            }
            let names: Vec<_> = evs.iter().map(crate::model::event_name).collect();
            assert_eq!(names.first(), Some(&"created"));
            assert_eq!(names.last(), Some(&"destroyed"));
            assert_eq!(names.iter().filter(|n| **n == "stopped").count(), 1, "{names:?}");
            assert!(names.iter().filter(|n| **n == "error").count() <= 17, "{names:?}");
            assert!(mgr.get("g").is_err());
        });
    }
}

#[tokio::test(start_paused = true)]
async fn sleep_after_expires_then_an_unanswered_stop_is_killed_after_grace_and_margin() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        state_dir: dir.path().join("s"),
        run_dir: dir.path().join("r"),
        ..Config::default()
    };
    cfg.lifecycle.init_connect_timeout = Duration::from_secs(3600);
    cfg.lifecycle.kill_margin = Duration::from_secs(5);
    std::fs::create_dir_all(&cfg.run_dir).unwrap();
    let runtime = Arc::new(FakeRuntime {
        dir: cfg.run_dir.clone(),
        kills: AtomicU32::new(0),
    });
    let store = Arc::new(Store::open(&dir.path().join("state.redb")).unwrap());
    let mgr = Manager::new(
        Arc::new(cfg),
        EventLog::new(store),
        runtime.clone(),
        Arc::new(FakeImages),
        None,
        TaskTracker::new(),
        CancellationToken::new(),
    )
    .unwrap();
    // Defaults: sleep_after 10 min, grace 15 min, activity expiry stops.
    let spec = pb::InstanceSpec {
        image: "registry.test/app:v1".into(),
        ..Default::default()
    };
    mgr.create("t", spec).await.unwrap();
    mgr.start("t").await.unwrap();

    // hearth-init: Hello, then Started and Ready; it never answers a Stop.
    let stream = tokio::net::UnixStream::connect(runtime.control_socket("t"))
        .await
        .unwrap();
    let hello = init::Hello {
        protocol_version: hearth_proto::PROTOCOL_VERSION,
        init_version: "fake".into(),
        instance_id: "t".into(),
        boot_id: "boot-1".into(),
        ..Default::default()
    };
    let (ch, welcome) = GuestChannel::connect(stream, hello, Duration::from_secs(10))
        .await
        .unwrap();
    let spec = welcome.spec.expect("the first Welcome carries the spec");
    assert_eq!(spec.cmd, ["/bin/app"]);
    let mut init = ch.into_framed();
    for msg in [
        G::Started(init::Started {
            pid: 7,
            ..Default::default()
        }),
        G::Ready(init::Ready::default()),
    ] {
        init.send(GuestMessage { msg: Some(msg) }).await.unwrap();
    }
    mgr.wait_for("t", &[pb::InstanceState::Healthy], Duration::from_secs(60))
        .await
        .unwrap();

    let stop = loop {
        match init.next().await.unwrap().unwrap().msg {
            Some(H::Stop(s)) => break s,
            _ => continue,
        }
    };
    assert_eq!(stop.grace_millis, 900_000);
    let done = mgr
        .wait_for(
            "t",
            &[pb::InstanceState::Stopped],
            Duration::from_secs(7200),
        )
        .await
        .unwrap();
    let exit = done.exit.unwrap();
    assert_eq!(exit.exit_code, 137);
    assert!(exit.killed_after_grace && exit.requested);
    assert_eq!(runtime.kills.load(Ordering::Relaxed), 1);

    let mut w = Box::pin(mgr.events.watch(1, Some("t".into())));
    let mut evs = Vec::new();
    while evs.len() < 8 {
        evs.push(w.next().await.unwrap().unwrap());
    }
    let names: Vec<_> = evs.iter().map(crate::model::event_name).collect();
    assert_eq!(
        names,
        [
            "created",
            "starting",
            "started",
            "ready",
            "activity_expired",
            "stopping",
            "error",
            "stopped"
        ]
    );
    let at = |n: &str| evs[names.iter().position(|x| *x == n).unwrap()].at_unix_nanos;
    // sleep_after counted from Started; SIGKILL at the grace's end plus the kill margin.
    assert_eq!((at("activity_expired") - at("started")) / S, 600);
    assert_eq!((at("stopped") - at("stopping")) / S, 905);
    let Some(pb::event::Kind::Stopping(s)) = &evs[5].kind else {
        panic!("stopping");
    };
    assert_eq!(s.cause, pb::StopCause::ActivityExpired as i32);
    // The kill is explained: init never reported the exit.
    let Some(pb::event::Kind::Error(e)) = &evs[6].kind else {
        panic!("error");
    };
    assert_eq!(
        e.error.as_ref().unwrap().kind,
        pb::ErrorKind::InitUnreachable as i32
    );
}

/// A warm-pool member whose `assign` was lost dials again without an instance id: it is
/// welcomed without a spec and assigned the spec on that connection.
#[tokio::test]
async fn a_first_hello_without_an_instance_id_gets_welcome_then_assign() {
    let dir = tempfile::tempdir().unwrap();
    let (mgr, _runtime) = manager(dir.path());
    mgr.create(
        "m",
        pb::InstanceSpec {
            image: "registry.test/app:v1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    mgr.start("m").await.unwrap();
    let stream = tokio::net::UnixStream::connect(dir.path().join("r/m.sock"))
        .await
        .unwrap();
    let hello = init::Hello {
        protocol_version: hearth_proto::PROTOCOL_VERSION,
        boot_id: "member-boot".into(),
        ..Default::default()
    };
    let (ch, welcome) = GuestChannel::connect(stream, hello, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(welcome.spec.is_none());
    let mut guest = ch.into_framed();
    let next = tokio::time::timeout(Duration::from_secs(10), guest.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match next.msg {
        Some(H::Assign(spec)) => assert_eq!(spec.instance_id, "m"),
        other => panic!("expected assign, got {other:?}"),
    }
    guest
        .send(GuestMessage {
            msg: Some(G::Started(init::Started {
                pid: 7,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    mgr.wait_for("m", &[pb::InstanceState::Running], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(mgr.entry("m").unwrap().private().boot_id, "member-boot");
    mgr.destroy("m").await.unwrap();
}

/// The agent died after committing a boot and before hearth-init got its spec: the restarted
/// agent re-adopts the boot, rebuilds the spec from the store and welcomes init with it; an
/// init of another boot is refused.
#[tokio::test]
async fn an_adopted_boot_whose_init_never_got_its_spec_gets_it() {
    let dir = tempfile::tempdir().unwrap();
    let (tracker, token) = (TaskTracker::new(), CancellationToken::new());
    let (mgr, _runtime) = manager_with(dir.path(), tracker.clone(), token.clone());
    mgr.create(
        "a",
        pb::InstanceSpec {
            image: "registry.test/app:v1".into(),
            env: [("K".to_owned(), "v".to_owned())].into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    mgr.start("a").await.unwrap();
    // The agent goes before init dials (its supervisors detach, the boot runs on).
    token.cancel();
    tracker.close();
    tracker.wait().await;
    drop(mgr);

    let (mgr, runtime) = manager(dir.path());
    mgr.adopt().await.unwrap();
    assert_eq!(
        mgr.get("a").unwrap().state,
        pb::InstanceState::Starting as i32
    );
    let hello = |boot: &str| init::Hello {
        protocol_version: hearth_proto::PROTOCOL_VERSION,
        instance_id: "a".into(),
        boot_id: boot.into(),
        ..Default::default()
    };
    let connect = |h: init::Hello| {
        let path = dir.path().join("r/a.sock");
        async move {
            let stream = tokio::net::UnixStream::connect(path).await.unwrap();
            GuestChannel::connect(stream, h, Duration::from_secs(10)).await
        }
    };
    let (ch, welcome) = connect(hello("b1")).await.unwrap();
    let spec = welcome.spec.expect("the rebuilt spec");
    assert_eq!(spec.instance_id, "a");
    assert!(spec.env.contains(&"K=v".to_owned()), "{spec:?}");
    let mut guest = ch.into_framed();
    guest
        .send(GuestMessage {
            msg: Some(G::Started(init::Started {
                pid: 7,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    mgr.wait_for("a", &[pb::InstanceState::Running], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(mgr.entry("a").unwrap().private().boot_id, "b1");
    // Another boot's init saying Hello on this socket gets nothing.
    match connect(hello("b2")).await {
        Err(hearth_proto::channel::ChannelError::Rejected(why)) => {
            assert!(why.contains("b2"), "{why}")
        }
        other => panic!("expected a reject, got {other:?}"),
    }
    assert_eq!(runtime.kills.load(Ordering::Relaxed), 0);
    mgr.destroy("a").await.unwrap();
}
