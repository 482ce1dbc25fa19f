//! The link to the agent with the real static hearth-init in fresh namespaces: the agent
//! disappearing mid-run (reconnect, log resume), a warm-pool member assigned later (its root
//! assembled before the spec, or again when the spec names another), a rejected connection,
//! standalone mode, the network over netlink in a namespace with a veth.

mod common;

use std::time::Duration;

use common::{Agent, Fixture, LONG, Launch, Sandbox, TestNetns};
use hearth_proto::init::{ExitReason, InitErrorKind, Network, RootFs, Welcome, host_message};

/// The number in a "line N" record.
fn line_no(r: &hearth_proto::init::LogRecord) -> u64 {
    String::from_utf8_lossy(&r.data)
        .trim()
        .strip_prefix("line ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected record {r:?}"))
}

#[tokio::test]
async fn agent_disappears_mid_run_and_the_log_stream_resumes() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("resume"), Launch::default());
    let script = "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.02; done";
    let spec = fx.spec(&["sh", "-c", script]);
    let instance = spec.instance_id.clone();
    let mut agent = Agent::start(&listener, spec).await;
    agent.until("10 lines", |g| g.logs.len() >= 10).await;
    // Stop acknowledging: what arrives now is received but not stored.
    agent.ack = false;
    let acked = agent.got.logs.last().unwrap().seq;
    agent.until("5 more lines", |g| g.logs.len() >= 15).await;
    let first_pid = agent.got.started[0].pid;
    let before = std::mem::take(&mut agent.got.logs);

    // The agent goes away: connection, listener and socket file.
    drop(agent);
    drop(listener);
    std::fs::remove_file(&fx.socket).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A new agent on the same path: init reconnects and resumes after what was acknowledged.
    let listener = fx.listen();
    let (mut agent, hello) = Agent::accept(&listener).await;
    assert!(hello.reconnect);
    assert_eq!(hello.instance_id, instance);
    assert!(hello.last_log_seq > acked, "{hello:?}");
    agent
        .tx
        .send(host_message::Msg::Welcome(Welcome {
            protocol_version: hearth_proto::PROTOCOL_VERSION,
            spec: None,
            resume_after_log_seq: acked,
            root: None,
        }))
        .await
        .unwrap();
    agent
        .until("30 lines and the state", |g| {
            g.logs.len() >= 30 && !g.started.is_empty() && !g.ready.is_empty()
        })
        .await;
    // Started and Ready are repeated for a new agent; the workload is the same process.
    assert_eq!(agent.got.started.len(), 1);
    assert_eq!(agent.got.started[0].pid, first_pid);
    assert_eq!(agent.got.ready.len(), 1);
    let after = &agent.got.logs;
    assert_eq!(
        after[0].seq,
        acked + 1,
        "resent from the first unacknowledged"
    );
    for w in after.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1, "a gap in seqs");
        assert_eq!(line_no(&w[1]), line_no(&w[0]) + 1, "a gap in the output");
    }
    // What was received before and after joins up without a gap (and the overlap matches).
    let last_stored = before.iter().find(|r| r.seq == acked).unwrap();
    assert_eq!(line_no(&after[0]), line_no(last_stored) + 1);
    assert!(agent.got.dropped.is_empty());
    // The outage did not stop the workload: lines written during it arrived.
    assert!(line_no(after.last().unwrap()) > line_no(before.last().unwrap()) + 10);

    agent.tx.stop(0, Duration::from_secs(30)).await.unwrap();
    let exited = agent.run_to_exit().await;
    assert!(exited.requested);
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn workload_ending_while_the_agent_is_away_is_reported_on_return() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("away"), Launch::default());
    let spec = fx.spec(&["sh", "-c", "echo before; sleep 0.5; echo during; exit 9"]);
    let mut agent = Agent::start(&listener, spec).await;
    agent
        .until("before", |g| g.stdout().contains("before"))
        .await;
    let stored = agent.got.logs.last().unwrap().seq;
    drop(agent);
    drop(listener);
    std::fs::remove_file(&fx.socket).unwrap();
    // The workload ends while nobody listens; init keeps trying to deliver.
    let deadline = std::time::Instant::now() + LONG;
    while !std::fs::read_to_string(&sandbox.console)
        .unwrap_or_default()
        .contains("exited code=9")
    {
        assert!(std::time::Instant::now() < deadline, "{}", sandbox.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listener = fx.listen();
    let (mut agent, hello) = Agent::accept(&listener).await;
    assert!(hello.reconnect);
    agent
        .tx
        .send(host_message::Msg::Welcome(Welcome {
            protocol_version: hearth_proto::PROTOCOL_VERSION,
            spec: None,
            resume_after_log_seq: stored,
            root: None,
        }))
        .await
        .unwrap();
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 9);
    assert_eq!(agent.got.stdout(), "during\n");
    assert_eq!(agent.got.started.len(), 1);
    assert_eq!(sandbox.wait(LONG).await.code(), Some(9));
}

/// Waits until init's mount namespace has the overlay root mounted at `/run/root` (where a
/// root is assembled before the switch), and returns its mountinfo.
async fn root_assembled(sandbox: &Sandbox) -> String {
    let path = format!("/proc/{}/mountinfo", sandbox.init_pid());
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/run/root") && l.contains(" - overlay "))
        {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no overlay root: {text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A warm-pool member: `Hello` without an instance id, `Welcome` without a spec (with `root`
/// when given), then it waits for `assign`.
async fn member(fx: &Fixture, root: Option<RootFs>) -> (Sandbox, Agent) {
    let listener = fx.listen();
    let args = vec![
        format!("hearth.socket={}", fx.socket.display()),
        "hearth.log=debug".into(),
    ];
    let sandbox = Sandbox::launch(fx.dir.path(), &args, Launch::default());
    let (mut agent, hello) = Agent::accept(&listener).await;
    assert_eq!(hello.instance_id, "");
    assert!(!hello.reconnect);
    agent
        .tx
        .send(host_message::Msg::Welcome(Welcome {
            protocol_version: hearth_proto::PROTOCOL_VERSION,
            spec: None,
            resume_after_log_seq: 0,
            root,
        }))
        .await
        .unwrap();
    (sandbox, agent)
}

#[tokio::test]
async fn warm_pool_member_waits_for_its_spec() {
    require_sandbox!();
    let fx = Fixture::new();
    let (mut sandbox, mut agent) = member(&fx, None).await;
    // A pool member idles until it is assigned; it still answers pings.
    agent.tx.ping(7).await.unwrap();
    agent.until("Pong", |g| g.pongs == [7]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(agent.got.started.is_empty());
    let mut spec = fx.spec(&["sh", "-c", "echo assigned to $HOSTNAME"]);
    spec.instance_id = "pool-7".into();
    agent.tx.assign(spec).await.unwrap();
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0);
    assert_eq!(agent.got.stdout(), "assigned to pool-7\n");
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn warm_pool_member_assembles_its_root_before_the_spec() {
    require_sandbox!();
    let fx = Fixture::new();
    let mut spec = fx.spec(&[
        "sh",
        "-c",
        "echo assigned to $HOSTNAME; echo x > /written && cat /written; df -k / | tail -1",
    ]);
    spec.instance_id = "pool-8".into();
    let (mut sandbox, mut agent) = member(&fx, spec.root.clone()).await;
    // Image, writable layer and overlay are mounted while the member waits: nothing runs.
    let mounts = root_assembled(&sandbox).await;
    assert!(
        mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/run/lower")),
        "{mounts}"
    );
    assert!(agent.got.started.is_empty());
    let t = std::time::Instant::now();
    agent.tx.assign(spec).await.unwrap();
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0, "{}", sandbox.output());
    let out = agent.got.stdout();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("assigned to pool-8"));
    assert_eq!(lines.next(), Some("x"), "the root is writable");
    // The spec's 64 MiB writable layer (df: overlay size = the upper layer's).
    let total_kib: u64 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(total_kib, 64 << 10, "{out}");
    assert!(
        sandbox
            .output()
            .contains("root assembled ahead of the spec"),
        "{}",
        sandbox.output()
    );
    eprintln!("assign to exit: {:?}", t.elapsed());
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn warm_pool_member_assembles_the_specs_root_when_it_differs() {
    require_sandbox!();
    let fx = Fixture::new();
    let mut spec = fx.spec(&["sh", "-c", "df -k / | tail -1"]);
    spec.instance_id = "pool-9".into();
    let mut other = spec.root.clone().unwrap();
    other.disk_size_bytes = 8 << 20;
    let (mut sandbox, mut agent) = member(&fx, Some(other)).await;
    root_assembled(&sandbox).await;
    agent.tx.assign(spec).await.unwrap();
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0, "{}", sandbox.output());
    let out = agent.got.stdout();
    let total_kib: u64 = out
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        total_kib,
        64 << 10,
        "the spec's layer, not the prepared one: {out}"
    );
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn a_member_whose_root_cannot_be_assembled_reports_and_ends() {
    require_sandbox!();
    let fx = Fixture::new();
    let mut root = fx.spec(&["true"]).root.unwrap();
    root.image = fx.dir.path().join("missing.erofs").display().to_string();
    let (mut sandbox, mut agent) = member(&fx, Some(root)).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.reason, ExitReason::InitError as i32);
    let err = &agent.got.errors[0];
    assert_eq!(err.kind, InitErrorKind::Rootfs as i32);
    assert!(
        err.fatal && err.message.contains("missing.erofs"),
        "{err:?}"
    );
    assert_eq!(sandbox.wait(LONG).await.code(), Some(125));
}

#[tokio::test]
async fn a_rejected_init_ends() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("nope"), Launch::default());
    let (stream, _) = listener.accept().await.unwrap();
    let ch = hearth_proto::channel::HostChannel::accept(stream, LONG)
        .await
        .unwrap();
    ch.reject("unknown instance").await.unwrap();
    let status = sandbox.wait(LONG).await;
    assert_eq!(status.code(), Some(70));
    assert!(
        sandbox
            .output()
            .contains("hearth-init: rejected by the agent: unknown instance")
    );
}

#[tokio::test]
async fn standalone_mode_reports_on_the_console() {
    require_sandbox!();
    let fx = Fixture::new();
    let spec_path = fx.dir.path().join("spec.json");
    let json = serde_json::json!({
        "instance_id": "solo",
        "entrypoint": ["/bin/sh", "-c"],
        "cmd": ["echo out; echo err >&2; exit 4"],
        "root": {
            "image": fx.image.display().to_string(),
            "fstype": "erofs",
            "disk_size_bytes": 8 << 20,
        },
    });
    std::fs::write(&spec_path, json.to_string()).unwrap();
    let args = vec![format!("hearth.standalone={}", spec_path.display())];
    let mut sandbox = Sandbox::launch(fx.dir.path(), &args, Launch::default());
    let status = sandbox.wait(LONG).await;
    assert_eq!(status.code(), Some(4), "{}", sandbox.output());
    let console = std::fs::read_to_string(&sandbox.console).unwrap();
    for line in [
        "hearth-init: started pid=",
        "hearth-init: ready after ",
        "stdout: out\n",
        "stderr: err\n",
        "hearth-init: exited code=4 reason=exit\n",
    ] {
        assert!(console.contains(line), "{line:?} missing:\n{console}");
    }
}

#[tokio::test]
async fn options_from_the_environment() {
    require_sandbox!();
    let fx = Fixture::new();
    let spec_path = fx.dir.path().join("spec.json");
    let json = serde_json::json!({
        "entrypoint": ["/bin/sh", "-c", "echo via env; echo leaked=$(env | grep -c HEARTH_INIT)"],
        "root": {"image": fx.image.display().to_string(), "fstype": "erofs"},
    });
    std::fs::write(&spec_path, json.to_string()).unwrap();
    let mut sandbox = Sandbox::launch(
        fx.dir.path(),
        &[],
        Launch {
            env: vec![(
                "HEARTH_INIT_OPTIONS".into(),
                format!("hearth.standalone={} hearth.log=info", spec_path.display()),
            )],
            ..Launch::default()
        },
    );
    assert_eq!(
        sandbox.wait(LONG).await.code(),
        Some(0),
        "{}",
        sandbox.output()
    );
    let console = std::fs::read_to_string(&sandbox.console).unwrap();
    assert!(console.contains("stdout: via env\n"), "{console}");
    // The options do not leak into the workload's environment.
    assert!(console.contains("stdout: leaked=0\n"), "{console}");
}

#[tokio::test]
async fn bad_standalone_spec_is_an_init_error() {
    require_sandbox!();
    let fx = Fixture::new();
    let spec_path = fx.dir.path().join("spec.json");
    std::fs::write(&spec_path, r#"{"entrypoint": ["x"], "colour": "blue"}"#).unwrap();
    let args = vec![format!("hearth.standalone={}", spec_path.display())];
    let mut sandbox = Sandbox::launch(fx.dir.path(), &args, Launch::default());
    assert_eq!(sandbox.wait(LONG).await.code(), Some(125));
    let console = std::fs::read_to_string(&sandbox.console).unwrap();
    assert!(
        console.contains("hearth-init: init_error kind=bad_spec fatal=true")
            && console.contains("colour"),
        "{console}"
    );
    assert!(console.contains("hearth-init: exited code=125 reason=init_error"));
}

#[tokio::test]
async fn network_is_configured_over_netlink() {
    require_sandbox!();
    hearth_testkit::require!(hearth_testkit::skip::program("ip"));
    let fx = Fixture::new();
    let listener = fx.listen();
    let inside = TestNetns::new();
    let peer = TestNetns::new();
    let mut sandbox = Sandbox::launch(
        fx.dir.path(),
        &fx.args("net"),
        Launch {
            netns: Some(inside.path()),
            ..Launch::default()
        },
    );
    let script = "ip -o -4 addr show dev eth0; ip route; cat /sys/class/net/eth0/mtu; \
                  ip -o link show lo; cat /etc/resolv.conf /etc/hosts; \
                  ping -c 1 -W 5 10.77.0.1 >/dev/null && echo ping-ok";
    let mut spec = fx.spec(&["sh", "-c", script]);
    spec.hostname = "netbox".into();
    spec.network = Some(Network {
        interface: "eth0".into(),
        addresses: vec!["10.77.0.2/24".into()],
        gateway_v4: "10.77.0.1".into(),
        dns_servers: vec!["10.77.0.53".into()],
        dns_search: vec!["svc.test".into()],
        mtu: 1400,
        hosts: vec!["10.77.0.9 db".into()],
        ..Default::default()
    });
    let mut agent = Agent::start(&listener, spec).await;
    // Like the agent, move the interface in after init started: init waits for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    inside.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", &peer.name,
    ]);
    peer.ip(&["addr", "add", "10.77.0.1/24", "dev", "peer0"]);
    peer.ip(&["link", "set", "peer0", "up"]);
    let exited = agent.run_to_exit().await;
    let out = agent.got.stdout();
    assert_eq!(exited.exit_code, 0, "{out}\n{}", agent.got.stderr());
    assert!(out.contains("inet 10.77.0.2/24"), "{out}");
    assert!(out.contains("default via 10.77.0.1 dev eth0"), "{out}");
    assert!(out.contains("\n1400\n"), "{out}");
    assert!(out.contains("<LOOPBACK,UP,LOWER_UP>"), "{out}");
    assert!(
        out.contains("nameserver 10.77.0.53\nsearch svc.test\n"),
        "{out}"
    );
    assert!(out.contains("10.77.0.2\tnetbox\n"), "{out}");
    assert!(out.contains("10.77.0.9 db\n"), "{out}");
    assert!(out.contains("ping-ok"), "{out}");
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn missing_interface_is_a_network_error() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("noif"), Launch::default());
    let mut spec = fx.spec(&["true"]);
    spec.network = Some(Network {
        interface: "eth9".into(),
        addresses: vec!["10.1.0.2/24".into()],
        ..Default::default()
    });
    let mut agent = Agent::start(&listener, spec).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.reason, ExitReason::InitError as i32);
    let e = &agent.got.errors[0];
    assert_eq!(
        e.kind,
        hearth_proto::init::InitErrorKind::Network as i32,
        "{e:?}"
    );
    assert!(e.message.contains("eth9"), "{}", e.message);
    sandbox.wait(LONG).await;
}
