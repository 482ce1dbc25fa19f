//! The agent end to end: a real registry, the real gRPC API over a Unix socket, real cgroups,
//! network and eBPF, and the runtime `HEARTH_TEST_RUNTIME` selects (`common::runtime`): the
//! sandbox (the real static hearth-init as PID 1 in namespaces; the default, and what this
//! machine runs), or microvm (hearth-vmm booting the real guest kernel with hearth-init as
//! `/init`, on hardware-KVM hosts: `cargo xtask e2e` runs it there). Every test here runs in
//! both modes; where the runtimes differ (how the instance type is enforced), a test checks
//! each its own way.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt as _;
use hearth_agent::model::pb;
use tonic::Code;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_ready_exec_logs_metrics_stop_with_ordered_events() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let id = "web-1";
    let spec = pb::InstanceSpec {
        image: img.httpd.clone(),
        default_port: 8080,
        required_ports: vec![8080],
        labels: [("app".to_owned(), "web".to_owned())].into(),
        ..Default::default()
    };
    let created = c
        .create_instance(pb::CreateInstanceRequest {
            id: id.into(),
            spec: Some(spec.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&created), pb::InstanceState::Created);
    assert!(created.image_digest.starts_with("sha256:"));
    // Idempotent for the same spec.
    let again = c
        .create_instance(pb::CreateInstanceRequest {
            id: id.into(),
            spec: Some(spec),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.created_at_unix_nanos, created.created_at_unix_nanos);

    c.start_instance(pb::StartInstanceRequest { id: id.into() })
        .await
        .unwrap();
    let ready = wait_state(&mut c, id, &[pb::InstanceState::Healthy], LONG).await;
    assert_eq!(ready.boots, 1);
    assert_ne!(ready.started_at_unix_nanos, 0);

    // The server answers inside the instance.
    let r = c
        .exec(pb::ExecRequest {
            id: id.into(),
            argv: vec![
                "/bin/wget".into(),
                "-q".into(),
                "-O".into(),
                "-".into(),
                "http://127.0.0.1:8080/".into(),
            ],
            timeout_millis: 20_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.exit_code,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.stdout, hearth_testkit::oci::HTTPD_INDEX);

    // HTTP through the node's ingress proxy, over the node network into the instance.
    let ingress = agent.ingress_addr.expect("ingress listens");
    let (status, body) = http_get(ingress, id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_bytes(), hearth_testkit::oci::HTTPD_INDEX);
    let (status, body) = http_get(ingress, "nope").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains('{'), "JSON error body: {body}");
    let m = c
        .get_metrics(pb::GetMetricsRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert_eq!(m.ingress_requests, 1);
    assert!(m.ebpf_packets_allowed > 0, "{m:?}");

    // Logs: httpd -v logs each response on stderr.
    wait_logs(&mut c, id, "response:200", LONG).await;

    // Metrics from init, through the API and the Prometheus endpoint.
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let m = c
            .get_metrics(pb::GetMetricsRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .instances
            .remove(0);
        if m.memory_used_bytes > 0 && m.process_count > 0 {
            assert!(m.log_bytes > 0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no metrics: {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = prometheus(agent.metrics_addr).await;
    assert!(
        text.contains("hearth_instance_memory_used_bytes{instance=\"web-1\"}"),
        "{text}"
    );
    assert!(
        text.contains("hearth_instances{state=\"healthy\"} 1"),
        "{text}"
    );

    // Label filter.
    let listed = c
        .list_instances(pb::ListInstancesRequest {
            labels: [("app".to_owned(), "web".to_owned())].into(),
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(listed.len(), 1);

    stop(&mut c, id, 0, Some(30_000)).await;
    let stopped = wait_state(&mut c, id, &[pb::InstanceState::Stopped], LONG).await;
    let exit = stopped.exit.unwrap();
    assert!(exit.requested);
    assert!(!exit.killed_after_grace);

    let evs = events(&mut c, id).await;
    assert_eq!(
        names(&evs),
        [
            "created", "starting", "started", "ready", "stopping", "stopped"
        ]
    );
    for w in evs.windows(2) {
        assert!(w[1].seq > w[0].seq, "seqs increase: {evs:?}");
        assert!(w[1].at_unix_nanos >= w[0].at_unix_nanos);
    }
    assert_eq!(stopped_exit(&evs), exit);

    // A restart gets a fresh boot.
    c.start_instance(pb::StartInstanceRequest { id: id.into() })
        .await
        .unwrap();
    let again = wait_state(&mut c, id, &[pb::InstanceState::Healthy], LONG).await;
    assert_eq!(again.boots, 2);
    destroy(&mut c, id).await;
    let err = c
        .get_instance(pb::GetInstanceRequest { id: id.into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let evs = events(&mut c, id).await;
    assert_eq!(names(&evs).last(), Some(&"destroyed"));
    assert_eq!(
        pb::StopReason::try_from(stopped_exit(&evs).reason).unwrap(),
        pb::StopReason::Destroyed
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_handled_exits_0_and_sigterm_ignored_is_killed_after_grace() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let polite = sh_spec(
        &img.busybox,
        "trap 'echo got TERM; exit 0' TERM; echo up; while :; do sleep 0.2; done",
    );
    let stubborn = sh_spec(
        &img.busybox,
        "trap '' TERM; echo up; while :; do sleep 0.2; done",
    );
    for (id, spec) in [("polite", polite), ("stubborn", stubborn)] {
        create_start(&mut c, id, spec).await;
    }
    for id in ["polite", "stubborn"] {
        wait_state(&mut c, id, &[pb::InstanceState::Healthy], LONG).await;
    }
    stop(&mut c, "polite", 0, Some(60_000)).await;
    let grace_ms = 1_500;
    stop(&mut c, "stubborn", 0, Some(grace_ms)).await;

    let p = wait_state(&mut c, "polite", &[pb::InstanceState::Stopped], LONG).await;
    let e = p.exit.unwrap();
    assert_eq!(
        (e.exit_code, e.reason),
        (0, pb::StopReason::Exit as i32),
        "{e:?}"
    );
    assert!(!e.killed_after_grace);
    assert!(logs(&mut c, "polite").await.contains("got TERM"));

    let s = wait_state(&mut c, "stubborn", &[pb::InstanceState::Stopped], LONG).await;
    let e = s.exit.unwrap();
    assert_eq!(e.exit_code, 137, "{e:?}");
    assert!(e.killed_after_grace, "{e:?}");
    let evs = events(&mut c, "stubborn").await;
    let stopping = evs
        .iter()
        .find(|e| hearth_agent::model::event_name(e) == "stopping")
        .unwrap();
    let stopped = evs.last().unwrap();
    let waited = (stopped.at_unix_nanos - stopping.at_unix_nanos) / 1_000_000;
    assert!(
        waited >= grace_ms - 100,
        "SIGKILL came after the grace ({waited} ms)"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_after_expiry_emits_activity_expired_then_stops_unless_renewed() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let mut sleepy = sh_spec(&img.busybox, "while :; do sleep 0.2; done");
    sleepy.sleep_after_millis = Some(2_000);
    sleepy.stop_grace_millis = Some(1_000);
    let mut notify = sleepy.clone();
    notify.activity_expiry = pb::ActivityExpiry::Notify as i32;
    for (id, spec) in [("sleepy", sleepy), ("notify", notify)] {
        create_start(&mut c, id, spec).await;
    }
    wait_state(&mut c, "sleepy", &[pb::InstanceState::Healthy], LONG).await;
    // Renewals keep it awake past sleep_after.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let i = c
            .renew_activity(pb::RenewActivityRequest {
                id: "sleepy".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&i), pb::InstanceState::Healthy);
    }
    let s = wait_state(&mut c, "sleepy", &[pb::InstanceState::Stopped], LONG).await;
    assert!(s.exit.unwrap().requested);
    let evs = events(&mut c, "sleepy").await;
    let n = names(&evs);
    let expired = n
        .iter()
        .position(|e| *e == "activity_expired")
        .expect("expired");
    assert_eq!(&n[expired..], ["activity_expired", "stopping", "stopped"]);
    let Some(pb::event::Kind::Stopping(st)) = &evs[expired + 1].kind else {
        panic!("stopping");
    };
    assert_eq!(st.cause, pb::StopCause::ActivityExpired as i32);
    // At least 3 s passed from start to expiry (the renewals), sleep_after is 2 s.
    let started = evs
        .iter()
        .find(|e| hearth_agent::model::event_name(e) == "started")
        .unwrap();
    assert!(evs[expired].at_unix_nanos - started.at_unix_nanos >= 3_000_000_000);

    // Notify only: the event, and the instance keeps running.
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let evs = events(&mut c, "notify").await;
        if names(&evs).contains(&"activity_expired") {
            let Some(pb::event::Kind::ActivityExpired(a)) = &evs.last().unwrap().kind else {
                panic!("activity_expired is the last event: {evs:?}");
            };
            assert!(!a.will_stop);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let i = get(&mut c, "notify").await;
    assert_eq!(state(&i), pb::InstanceState::Healthy);
    destroy(&mut c, "notify").await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    c.create_instance(pb::CreateInstanceRequest {
        id: "a".into(),
        spec: Some(sh_spec(&img.busybox, "sleep 1000")),
    })
    .await
    .unwrap();

    async fn snapshot(c: &mut hearth_agent::ctl::Client) -> (Vec<pb::Instance>, u64) {
        let list = c
            .list_instances(pb::ListInstancesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .instances;
        let node = c
            .get_node(pb::GetNodeRequest {})
            .await
            .unwrap()
            .into_inner();
        (list, node.last_event_seq)
    }
    let before = snapshot(&mut c).await;

    let cases: Vec<(&str, tonic::Status, Code, &str)> = vec![
        (
            "unknown image",
            c.create_instance(pb::CreateInstanceRequest {
                id: "b".into(),
                spec: Some(sh_spec(
                    &format!("{}/hearth/nope:v1", img.registry.host()),
                    "true",
                )),
            })
            .await
            .unwrap_err(),
            Code::NotFound,
            "not found",
        ),
        (
            "invalid id",
            c.create_instance(pb::CreateInstanceRequest {
                id: "Bad_Id".into(),
                spec: Some(sh_spec(&img.busybox, "true")),
            })
            .await
            .unwrap_err(),
            Code::InvalidArgument,
            "Invalid instance id \"Bad_Id\"",
        ),
        (
            "same id, other spec",
            c.create_instance(pb::CreateInstanceRequest {
                id: "a".into(),
                spec: Some(sh_spec(&img.busybox, "sleep 999")),
            })
            .await
            .unwrap_err(),
            Code::AlreadyExists,
            "already exists with a different spec",
        ),
        (
            "negative grace",
            c.stop_instance(pb::StopInstanceRequest {
                id: "a".into(),
                signal: 0,
                grace_millis: Some(-1),
            })
            .await
            .unwrap_err(),
            Code::InvalidArgument,
            "grace_millis is negative",
        ),
        (
            "negative grace in a spec",
            c.create_instance(pb::CreateInstanceRequest {
                id: "c".into(),
                spec: Some(pb::InstanceSpec {
                    stop_grace_millis: Some(-5),
                    ..sh_spec(&img.busybox, "true")
                }),
            })
            .await
            .unwrap_err(),
            Code::InvalidArgument,
            "stop_grace_millis is negative",
        ),
        (
            "unknown instance",
            c.start_instance(pb::StartInstanceRequest { id: "zzz".into() })
                .await
                .unwrap_err(),
            Code::NotFound,
            "Instance \"zzz\" not found",
        ),
        (
            "missing spec",
            c.create_instance(pb::CreateInstanceRequest {
                id: "d".into(),
                spec: None,
            })
            .await
            .unwrap_err(),
            Code::InvalidArgument,
            "spec is missing",
        ),
        (
            "bad image reference",
            c.prefetch_image(pb::PrefetchImageRequest {
                reference: "Not A Ref".into(),
            })
            .await
            .err()
            .unwrap(),
            Code::InvalidArgument,
            "not an image reference",
        ),
    ];
    for (what, status, code, text) in cases {
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(text),
            "{what}: {:?} lacks {text:?}",
            status.message()
        );
    }
    assert_eq!(snapshot(&mut c).await, before, "no state change");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_memory_limit_is_stopped_oom_137() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let it = runtime::instance_type(1, 32, 16);
    let hog = if runtime::microvm() {
        // The guest's RAM is the limit. One buffer of 90% of what the kernel counts as RAM:
        // small enough for the kernel's overcommit check (a larger one would fail to allocate
        // instead of being killed), more than is free beside the kernel and hearth-init.
        "exec /bin/busybox dd if=/dev/zero of=/dev/null count=4 \
         bs=$(( $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) * 9 / 10 ))k"
            .to_owned()
    } else {
        // One buffer four times the cgroup's limit.
        format!(
            "exec /bin/busybox dd if=/dev/zero of=/dev/null count=4 bs={}M",
            4 * it.memory_mib
        )
    };
    let spec = pb::InstanceSpec {
        instance_type: Some(it),
        ..sh_spec(&img.busybox, &hog)
    };
    create_start(&mut c, "hog", spec).await;
    let i = wait_state(
        &mut c,
        "hog",
        &[pb::InstanceState::Stopped, pb::InstanceState::Failed],
        LONG,
    )
    .await;
    let e = i.exit.unwrap();
    assert_eq!(
        (e.exit_code, pb::StopReason::try_from(e.reason).unwrap()),
        (137, pb::StopReason::Oom),
        "{e:?}"
    );
    let evs = events(&mut c, "hog").await;
    assert_eq!(stopped_exit(&evs).reason, pb::StopReason::Oom as i32);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_instances_start_concurrently() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let c = agent.client.clone();
    let ids: Vec<String> = (0..50).map(|i| format!("many-{i}")).collect();
    let spec = pb::InstanceSpec {
        instance_type: Some(runtime::instance_type(1, 32, 8)),
        ..sh_spec(&img.busybox, "echo up; while :; do sleep 1; done")
    };
    let starts = ids.iter().map(|id| {
        let mut c = c.clone();
        let spec = spec.clone();
        let id = id.clone();
        async move {
            c.create_instance(pb::CreateInstanceRequest {
                id: id.clone(),
                spec: Some(spec),
            })
            .await?;
            c.start_instance(pb::StartInstanceRequest { id }).await
        }
    });
    let results = futures::future::join_all(starts).await;
    for (id, r) in ids.iter().zip(&results) {
        assert!(r.is_ok(), "{id}: {r:?}");
    }
    let mut c2 = c.clone();
    for id in &ids {
        wait_state(
            &mut c2,
            id,
            &[pb::InstanceState::Healthy],
            Duration::from_secs(300),
        )
        .await;
    }
    let node = c2
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.instances_running, 50);
    let destroys = ids.iter().map(|id| {
        let mut c = c.clone();
        let id = id.clone();
        async move { c.destroy_instance(pb::DestroyInstanceRequest { id }).await }
    });
    for r in futures::future::join_all(destroys).await {
        r.unwrap();
    }
    let node = c2
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.instances, 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_logs_and_watch_events_stream_live() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let node = c
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut watch = c
        .watch_events(pb::WatchEventsRequest {
            from_seq: 0,
            instance_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    c.create_instance(pb::CreateInstanceRequest {
        id: "ticker".into(),
        spec: Some(sh_spec(
            &img.busybox,
            "i=0; while [ $i -lt 1000 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done",
        )),
    })
    .await
    .unwrap();
    c.start_instance(pb::StartInstanceRequest {
        id: "ticker".into(),
    })
    .await
    .unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.seq, node.last_event_seq + 1);
    assert_eq!(hearth_agent::model::event_name(&first), "created");
    let mut logs = c
        .stream_logs(pb::StreamLogsRequest {
            id: "ticker".into(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = String::new();
    while !seen.contains("tick 5\n") {
        let l = tokio::time::timeout(LONG, logs.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&l.data));
        seen.push('\n');
    }
    assert!(seen.contains("tick 0\ntick 1\n"), "{seen}");
    destroy(&mut c, "ticker").await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_over_tcp_tls_requires_a_trusted_client_certificate() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    hearth_testkit::require!(
        hearth_testkit::skip::root(),
        runtime::unavailable(),
        hearth_testkit::skip::program("openssl")
    );
    let img = images();
    let mut env = Env::new(img.registry.clone());
    let pki = tempfile::tempdir().unwrap();
    let server_ca = hearth_testkit::pki::TestCa::new(pki.path());
    let server = server_ca.server_cert("agent");
    // The agent trusts the "good" CA's clients; the "rogue" CA's are refused.
    let ca_of = |name: &str| {
        let dir = pki.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        hearth_testkit::pki::TestCa::new(&dir)
    };
    let (good_ca, rogue_ca) = (ca_of("good"), ca_of("rogue"));
    let clients = [
        ("good", good_ca.client_cert("scheduler")),
        ("rogue", rogue_ca.client_cert("scheduler")),
    ];
    env.cfg.api.tcp = Some(hearth_agent::config::TcpApiConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: server.cert_pem.clone(),
        key: server.key_pem.clone(),
        client_ca: good_ca.ca.cert_pem.clone(),
    });
    let agent = TestAgent::start(&env).await;
    let addr = agent.tcp_addr.expect("TCP listener");
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let connect = |client: Option<&str>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(server_ca.ca.cert_pem.clone())))
            .domain_name("localhost");
        if let Some((_, cert)) = clients.iter().find(|(n, _)| Some(*n) == client) {
            tls = tls.identity(Identity::from_pem(
                read(cert.cert_pem.clone()),
                read(cert.key_pem.clone()),
            ));
        }
        let url = format!("https://127.0.0.1:{}", addr.port());
        async move {
            let channel = Channel::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await?;
            Ok::<_, tonic::transport::Error>(pb::agent_client::AgentClient::new(channel))
        }
    };
    let mut good = connect(Some("good"))
        .await
        .expect("trusted client connects");
    let node = good
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.runtime, runtime::kind().as_str());
    for client in [None, Some("rogue")] {
        let refused = match connect(client).await {
            Err(_) => true,
            Ok(mut c) => c.get_node(pb::GetNodeRequest {}).await.is_err(),
        };
        assert!(refused, "client {client:?} must be refused");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearthctl_tables_and_json() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let socket = env.cfg.api.socket.clone();
    let memory = runtime::memory_mib(64).to_string();
    let (ok, out, err) = hearthctl(
        &socket,
        &[
            "run",
            "--id",
            "cli",
            &img.busybox,
            "--memory",
            &memory,
            "--",
            "/bin/sh",
            "-c",
            "echo hello from cli; sleep 1000",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("state        healthy"), "{out}");
    let (ok, out, _) = hearthctl(&socket, &["ls"]).await;
    assert!(ok);
    assert!(out.starts_with("ID "), "{out}");
    assert!(out.lines().nth(1).unwrap().starts_with("cli "), "{out}");
    let (ok, out, _) = hearthctl(&socket, &["--json", "get", "cli"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "healthy");
    assert_eq!(v["memory_mib"].to_string(), memory);
    let deadline = tokio::time::Instant::now() + LONG;
    let out = loop {
        let (_, out, _) = hearthctl(&socket, &["logs", "cli"]).await;
        if out.contains("hello from cli") {
            break out;
        }
        assert!(tokio::time::Instant::now() < deadline, "no output: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(out.contains("hello from cli\n"), "{out}");
    let (ok, out, _) = hearthctl(&socket, &["exec", "cli", "--", "/bin/echo", "in", "there"]).await;
    assert!(ok);
    assert_eq!(out, "in there\n");
    let (ok, _, err) = hearthctl(&socket, &["get", "Nope!"]).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("Invalid instance id"),
        "{err}"
    );
    let (ok, out, _) = hearthctl(&socket, &["--json", "events", "--id", "cli"]).await;
    assert!(ok);
    let kinds: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(kinds[..4], ["created", "starting", "started", "ready"]);
    // A pull streams progress; the last message says done.
    let (ok, out, err) = hearthctl(&socket, &["--json", "images", "pull", &img.httpd]).await;
    assert!(ok, "{err}");
    let msgs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(msgs.len() >= 2, "{out}");
    let last = msgs.last().unwrap();
    assert_eq!(last["done"], true, "{out}");
    assert!(
        last["image"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(
        msgs.iter()
            .any(|m| m["phase"] == "downloading" || m["phase"] == "resolving"),
        "{out}"
    );
    let (ok, out, _) = hearthctl(&socket, &["images", "ls"]).await;
    assert!(ok);
    assert!(out.contains("hearth/busybox"), "{out}");
    assert!(out.contains("hearth/httpd"), "{out}");
    // An image an instance uses stays; an unused one goes.
    let (ok, _, err) = hearthctl(&socket, &["images", "rm", &img.busybox]).await;
    assert!(!ok);
    assert!(err.contains("FailedPrecondition"), "{err}");
    let (ok, _, err) = hearthctl(&socket, &["images", "rm", &img.httpd]).await;
    assert!(ok, "{err}");
    let (ok, out, _) = hearthctl(&socket, &["images", "ls"]).await;
    assert!(ok);
    assert!(!out.contains("hearth/httpd"), "{out}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_starts_on_request_and_requests_count_as_activity() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let mut env = Env::new(img.registry.clone());
    env.cfg.ingress.start_on_request = true;
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let ingress = agent.ingress_addr.unwrap();
    let spec = pb::InstanceSpec {
        image: img.httpd.clone(),
        default_port: 8080,
        required_ports: vec![8080],
        sleep_after_millis: Some(3_000),
        stop_grace_millis: Some(1_000),
        ..Default::default()
    };
    c.create_instance(pb::CreateInstanceRequest {
        id: "lazy".into(),
        spec: Some(spec),
    })
    .await
    .unwrap();
    // Never started: the first request starts it and waits for it.
    let (status, body) = http_get(ingress, "lazy").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_bytes(), hearth_testkit::oci::HTTPD_INDEX);
    // Requests every second keep it awake well past sleep_after (3 s).
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (status, _) = http_get(ingress, "lazy").await;
        assert_eq!(status, 200);
    }
    let i = get(&mut c, "lazy").await;
    assert_eq!(state(&i), pb::InstanceState::Healthy);
    assert!(!names(&events(&mut c, "lazy").await).contains(&"activity_expired"));
    // Then it sleeps, and the next request wakes it again (boot 2).
    wait_state(&mut c, "lazy", &[pb::InstanceState::Stopped], LONG).await;
    let (status, _) = http_get(ingress, "lazy").await;
    assert_eq!(status, 200);
    let i = get(&mut c, "lazy").await;
    assert_eq!(i.boots, 2);
    destroy(&mut c, "lazy").await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_instances_when_configured() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let mut env = Env::new(img.registry.clone());
    env.cfg.lifecycle.stop_instances_on_shutdown = true;
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    create_start(
        &mut c,
        "bye",
        sh_spec(
            &img.busybox,
            "trap 'exit 0' TERM; while :; do sleep 0.2; done",
        ),
    )
    .await;
    wait_state(&mut c, "bye", &[pb::InstanceState::Healthy], LONG).await;
    drop(c);
    agent.shutdown().await;
    // The next agent finds it stopped by the shutdown, with its exit code.
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let i = get(&mut c, "bye").await;
    assert_eq!(state(&i), pb::InstanceState::Stopped);
    assert_eq!(i.exit.unwrap().exit_code, 0);
    let evs = events(&mut c, "bye").await;
    let cause = evs.iter().find_map(|e| match &e.kind {
        Some(pb::event::Kind::Stopping(s)) => Some(s.cause),
        _ => None,
    });
    assert_eq!(cause, Some(pb::StopCause::Shutdown as i32));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_type_limits_are_enforced() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let it = runtime::instance_type(2, 96, 16);
    let memory = it.memory_mib;
    let spec = pb::InstanceSpec {
        instance_type: Some(it),
        ..sh_spec(&img.busybox, "while :; do sleep 1; done")
    };
    create_start(&mut c, "limited", spec).await;
    wait_state(&mut c, "limited", &[pb::InstanceState::Healthy], LONG).await;
    if runtime::microvm() {
        // The microVM is the limit: its vCPUs and its RAM, as the guest sees them.
        let (code, cpus) = exec_sh(&mut c, "limited", "grep -c ^processor /proc/cpuinfo").await;
        assert_eq!((code, cpus.trim()), (0, "2"), "{cpus}");
        let (code, mem) = exec_sh(
            &mut c,
            "limited",
            "awk '/^MemTotal:/ { print $2 }' /proc/meminfo",
        )
        .await;
        assert_eq!(code, 0, "{mem}");
        let kib: u64 = mem.trim().parse().unwrap();
        assert!(
            kib <= memory << 10 && kib >= (memory << 10) / 2,
            "the guest has {kib} KiB of RAM for a {memory} MiB instance"
        );
        let vmm = cgroup_pids(&env, "limited");
        assert_eq!(vmm.len(), 1, "one hearth-vmm in the cgroup: {vmm:?}");
    } else {
        // Memory, CPU and pids in the instance's cgroup.
        let layout = hearth_agent::runtime::cgroup::Layout::host(&env.cfg.cgroup.parent).unwrap();
        let cg = layout.instance("limited");
        let read = |ctrl: &str, file: &str| {
            let dir = &cg
                .dirs
                .iter()
                .find(|(c, _)| c == ctrl || c.is_empty())
                .unwrap()
                .1;
            std::fs::read_to_string(dir.join(file))
                .unwrap()
                .trim()
                .to_owned()
        };
        if cg.version == hearth_agent::runtime::cgroup::Version::V1 {
            assert_eq!(
                read("memory", "memory.limit_in_bytes"),
                (memory << 20).to_string()
            );
            assert_eq!(read("cpu", "cpu.cfs_quota_us"), "200000");
        } else {
            assert_eq!(read("", "memory.max"), (memory << 20).to_string());
            assert_eq!(read("", "cpu.max"), "200000 100000");
        }
        assert_eq!(read("pids", "pids.max"), "4096");
    }
    // The disk: the writable layer holds 16 MiB, no more.
    let r = c
        .exec(pb::ExecRequest {
            id: "limited".into(),
            argv: [
                "/bin/busybox",
                "dd",
                "if=/dev/zero",
                "of=/fill",
                "bs=1M",
                "count=64",
            ]
            .map(String::from)
            .to_vec(),
            timeout_millis: 60_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r.exit_code, 0);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("No space left"), "{err}");
    destroy(&mut c, "limited").await;
    agent.shutdown().await;
}
