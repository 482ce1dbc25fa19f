//! Warm pools end to end: real registry, real cgroups, network, eBPF and the ingress proxy,
//! with the runtime `HEARTH_TEST_RUNTIME` selects (`common::runtime`): sandboxes with the real
//! static hearth-init as PID 1 of each member (the default), or hearth-vmm microVMs booting the
//! real guest kernel (hardware-KVM hosts).

mod common;

use std::time::Duration;

use common::*;
use hearth_agent::model::pb;
use tonic::Code;

const LONG: Duration = Duration::from_secs(120);

/// The small instance type every test here uses.
fn small() -> pb::InstanceType {
    runtime::instance_type(1, 64, 64)
}

fn httpd_spec(image: &str) -> pb::InstanceSpec {
    pb::InstanceSpec {
        image: image.to_owned(),
        instance_type: Some(small()),
        required_ports: vec![8080],
        ..Default::default()
    }
}

async fn set_pool(c: &mut hearth_agent::ctl::Client, image: &str, size: u32) -> pb::WarmPool {
    c.set_warm_pool(pb::SetWarmPoolRequest {
        image: image.to_owned(),
        instance_type: Some(small()),
        size,
    })
    .await
    .unwrap()
    .into_inner()
}

/// The run directory of the instance's current boot: named after the member that serves it.
fn boot_dir(agent: &TestAgent, id: &str) -> String {
    let entry = agent.daemon.as_ref().unwrap().node.mgr.entry(id).unwrap();
    let rt = entry.private().runtime.expect("a running boot");
    rt.dir.file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_claims_a_ready_member_and_says_so() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();

    let p = set_pool(&mut c, &img.httpd, 1).await;
    assert_eq!(p.target, 1);
    assert!(p.image_digest.starts_with("sha256:"), "{p:?}");
    let p = wait_ready_members(&mut c, &img.httpd, 1).await;
    assert_eq!(p.source, "api");
    let node = c
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.warm_pool.len(), 1);
    assert_eq!((node.warm_pool[0].target, node.warm_pool[0].ready), (1, 1));

    // A matching instance starts on the member.
    c.create_instance(pb::CreateInstanceRequest {
        id: "warm-1".into(),
        spec: Some(httpd_spec(&img.httpd)),
    })
    .await
    .unwrap();
    let i = c
        .start_instance(pb::StartInstanceRequest {
            id: "warm-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i.boots, 1);
    assert!(boot_dir(&agent, "warm-1").starts_with("_pool"));
    wait_state(&mut c, "warm-1", &[pb::InstanceState::Healthy], LONG).await;
    let ingress = agent.ingress_addr.expect("ingress listens");
    let (status, body) = http_get(ingress, "warm-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_bytes(), hearth_testkit::oci::HTTPD_INDEX);
    let s = started(&events(&mut c, "warm-1").await);
    assert_eq!(s.len(), 1);
    assert!(s[0].warm, "{s:?}");
    assert!(
        s[0].runtime_micros <= s[0].init_micros && s[0].init_micros <= s[0].spawned_micros,
        "{s:?}"
    );
    let m = c
        .get_metrics(pb::GetMetricsRequest {
            id: "warm-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert!(m.warm_start);
    assert!(
        m.ebpf_packets_allowed > 0,
        "the instance's policy is attached: {m:?}"
    );
    // hearth-init's own output moved with the member to the instance.
    let init_log = env
        .cfg
        .state_dir
        .join("instances/warm-1")
        .join(runtime::init_output_file());
    let text = std::fs::read_to_string(&init_log).unwrap();
    assert!(text.contains("started pid="), "{text}");
    let member = boot_dir(&agent, "warm-1");
    assert!(!env.cfg.state_dir.join("instances").join(member).exists());

    // The pool refills behind it.
    let p = wait_ready_members(&mut c, &img.httpd, 1).await;
    assert_eq!((p.hits, p.misses), (1, 0));

    // Another instance type boots cold: it matches no pool.
    let mut other = httpd_spec(&img.httpd);
    other.instance_type = Some(pb::InstanceType {
        memory_mib: small().memory_mib + 32,
        ..small()
    });
    create_start(&mut c, "cold-1", other).await;
    wait_state(&mut c, "cold-1", &[pb::InstanceState::Healthy], LONG).await;
    let s = started(&events(&mut c, "cold-1").await);
    assert!(!s[0].warm, "{s:?}");
    assert_eq!(http_get(ingress, "cold-1").await.0, 200);

    // A matching start that finds the pool empty boots cold and counts a miss.
    set_pool(&mut c, &img.httpd, 0).await;
    let l = pools(&mut c).await;
    assert!(l.pools.iter().all(|p| p.target == 0), "{l:?}");
    set_pool(&mut c, &img.httpd, 1).await;
    let text = prometheus(agent.metrics_addr).await;
    assert!(
        text.contains("hearth_instance_starts_total{kind=\"warm\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("hearth_instance_starts_total{kind=\"cold\"} 1"),
        "{text}"
    );
    assert!(text.contains("hearth_warm_pool_target{image="), "{text}");
    agent.shutdown().await;
}

/// The `_pool*` cgroups (members, and boots that run on a claimed member) of the test's agent.
fn member_cgroups(env: &Env) -> Vec<String> {
    let layout = hearth_agent::runtime::cgroup::Layout::host(&env.cfg.cgroup.parent).unwrap();
    let (_, parent) = &layout.parents[0];
    let mut v: Vec<String> = std::fs::read_dir(parent)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(hearth_agent::pool::MEMBER_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether `pid` runs (a zombie waiting for its new parent to reap it does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['R', 'S', 'D', 'T', 't']))
        })
        .unwrap_or(false)
}

async fn start_warm(c: &mut hearth_agent::ctl::Client, id: &str, spec: pb::InstanceSpec) {
    create_start(c, id, spec).await;
    wait_state(c, id, &[pb::InstanceState::Healthy], LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_serves_one_instance_and_nothing_of_it_reaches_the_next() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    set_pool(&mut c, &img.busybox, 1).await;
    wait_ready_members(&mut c, &img.busybox, 1).await;

    // Tenant A writes to its root and /tmp and leaves a process running.
    let a = sh_spec(&img.busybox, "sleep 31337 & while :; do sleep 0.2; done");
    start_warm(&mut c, "tenant-a", a).await;
    assert!(started(&events(&mut c, "tenant-a").await)[0].warm);
    let member_a = boot_dir(&agent, "tenant-a");
    let (code, out) = exec_sh(
        &mut c,
        "tenant-a",
        "echo a-secret > /secret-a && echo a-secret > /tmp/secret-a && cat /secret-a /tmp/secret-a",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "a-secret\na-secret\n"));
    assert!(member_cgroups(&env).contains(&member_a));

    // Its end destroys the member.
    stop(&mut c, "tenant-a", 9, Some(0)).await;
    wait_state(&mut c, "tenant-a", &[pb::InstanceState::Stopped], LONG).await;
    assert!(
        !member_cgroups(&env).contains(&member_a),
        "the member that served tenant-a is gone"
    );
    assert!(
        !env.cfg.run_dir.join("i").join(&member_a).exists(),
        "its run directory is gone"
    );

    // Tenant B gets another member, with nothing of A's run in it.
    wait_ready_members(&mut c, &img.busybox, 1).await;
    start_warm(
        &mut c,
        "tenant-b",
        sh_spec(&img.busybox, "while :; do sleep 0.2; done"),
    )
    .await;
    assert!(started(&events(&mut c, "tenant-b").await)[0].warm);
    let member_b = boot_dir(&agent, "tenant-b");
    assert_ne!(member_a, member_b);
    let (code, out) = exec_sh(&mut c, "tenant-b", "ls /secret-a /tmp/secret-a").await;
    assert_ne!(code, 0, "A's files are not visible to B: {out}");
    let (_, procs) = exec_sh(&mut c, "tenant-b", "cat /proc/[0-9]*/cmdline").await;
    assert!(!procs.contains("31337"), "A's process is not in B: {procs}");
    let (_, host) = exec_sh(&mut c, "tenant-b", "cat /etc/hostname").await;
    assert_eq!(host.trim(), "tenant-b");

    // A's next boot is a fresh member too: its files are gone.
    wait_ready_members(&mut c, &img.busybox, 1).await;
    c.start_instance(pb::StartInstanceRequest {
        id: "tenant-a".into(),
    })
    .await
    .unwrap();
    let again = wait_state(&mut c, "tenant-a", &[pb::InstanceState::Healthy], LONG).await;
    assert_eq!(again.boots, 2);
    let member_a2 = boot_dir(&agent, "tenant-a");
    assert!(member_a2 != member_a && member_a2 != member_b);
    let (code, _) = exec_sh(&mut c, "tenant-a", "ls /secret-a").await;
    assert_ne!(code, 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizing_budget_concurrency_ttl_pinning_and_targets_across_restarts() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let mut env = Env::new(img.registry.clone());
    // Room for three small members.
    let budget = 3 * small().memory_mib;
    env.cfg.pool.memory_budget_mib = budget;
    env.cfg.pool.refill_concurrency = 1;
    env.cfg.pool.idle_ttl = Duration::from_secs(5);
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();

    // Bad requests change nothing.
    let bad = |image: &str, it: pb::InstanceType, size: u32| pb::SetWarmPoolRequest {
        image: image.to_owned(),
        instance_type: Some(it),
        size,
    };
    for (req, code) in [
        (bad("", small(), 1), Code::InvalidArgument),
        (bad("Not A Reference", small(), 1), Code::InvalidArgument),
        (bad(&img.busybox, small(), 5000), Code::InvalidArgument),
        (
            bad(
                &img.busybox,
                pb::InstanceType {
                    memory_mib: 8,
                    ..small()
                },
                1,
            ),
            Code::InvalidArgument,
        ),
        (
            bad(
                &format!("{}/hearth/nope:v1", img.registry.host()),
                small(),
                1,
            ),
            Code::NotFound,
        ),
        (bad(&img.busybox, small(), 4), Code::FailedPrecondition),
    ] {
        let e = c.set_warm_pool(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
    }
    let e = c
        .set_warm_pool(bad(&img.busybox, small(), 4))
        .await
        .unwrap_err();
    assert!(
        e.message().contains(&format!("{budget} MiB")),
        "{}",
        e.message()
    );
    let l = pools(&mut c).await;
    assert!(l.pools.is_empty(), "{l:?}");
    assert!(!env.cfg.state_dir.join("warm_pools.json").exists());

    // 3 small members fill the budget, booted one at a time.
    set_pool(&mut c, &img.busybox, 3).await;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let l = pools(&mut c).await;
        let p = &l.pools[0];
        assert!(p.booting <= 1, "refill_concurrency is 1: {p:?}");
        assert!(l.memory_used_mib <= budget, "{l:?}");
        if p.ready == 3 {
            assert_eq!(l.memory_used_mib, budget);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{l:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(member_cgroups(&env).len(), 3);

    // The pool's image is leased: it cannot be removed while the pool exists.
    let e = c
        .remove_image(pb::RemoveImageRequest {
            reference: img.busybox.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Idle members are recycled after the TTL and replaced.
    let first = member_cgroups(&env);
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let l = pools(&mut c).await;
        let p = &l.pools[0];
        assert!(l.memory_used_mib <= budget, "{l:?}");
        if p.recycled >= 3 && p.ready == 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{l:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = member_cgroups(&env);
    assert!(
        first.iter().all(|m| !now.contains(m)),
        "{first:?} were recycled: {now:?}"
    );

    // The target survives a restart; members do not outlive their agent.
    agent.shutdown().await;
    assert!(
        member_cgroups(&env).is_empty(),
        "{:?}",
        member_cgroups(&env)
    );
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let p = wait_ready_members(&mut c, &img.busybox, 3).await;
    assert_eq!((p.target, p.source.as_str()), (3, "api"));

    // Size 0 removes the pool, its members and its lease.
    set_pool(&mut c, &img.busybox, 0).await;
    let deadline = tokio::time::Instant::now() + LONG;
    while !member_cgroups(&env).is_empty() || !pools(&mut c).await.pools.is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.remove_image(pb::RemoveImageRequest {
        reference: img.busybox.clone(),
    })
    .await
    .unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_pools_and_an_agent_killed_mid_run() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let mut env = Env::new(img.registry.clone());
    env.cfg.pool.pools = vec![hearth_agent::config::PoolEntryConfig {
        image: img.busybox.clone(),
        size: 2,
        vcpus: Some(1),
        memory_mib: Some(small().memory_mib),
        disk_mib: Some(64),
    }];
    let config = env.write_config();
    let log = env.dir.path().join("agent.log");
    let mut agent = AgentProcess::spawn(&config, &env.cfg.api.socket, &log);
    let mut c = agent.client().await;
    let p = wait_ready_members(&mut c, &img.busybox, 2).await;
    assert_eq!(p.source, "config");

    // hearthctl shows the pool.
    let socket = &env.cfg.api.socket;
    let (ok, text, err) = hearthctl(socket, &["pool", "ls"]).await;
    assert!(ok, "{text}{err}");
    let memory = small().memory_mib.to_string();
    assert!(
        text.contains(&img.busybox) && text.contains(&format!("1/{memory}M/64M")),
        "{text}"
    );
    // hearthctl sets it (the API's target wins over the config's).
    let (ok, out, err) = hearthctl(
        socket,
        &[
            "--json",
            "pool",
            "set",
            &img.busybox,
            "2",
            "--vcpus",
            "1",
            "--memory",
            &memory,
            "--disk",
            "64",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["target"].as_u64(), v["source"].as_str()),
        (Some(2), Some("api"))
    );

    start_warm(
        &mut c,
        "survivor",
        sh_spec(&img.busybox, "while :; do sleep 0.2; done"),
    )
    .await;
    assert!(started(&events(&mut c, "survivor").await)[0].warm);
    wait_ready_members(&mut c, &img.busybox, 2).await;
    let before: Vec<(String, Vec<i32>)> = member_cgroups(&env)
        .into_iter()
        .map(|n| {
            let pids = cgroup_pids(&env, &n);
            (n, pids)
        })
        .collect();
    assert_eq!(before.len(), 3, "{before:?}");

    // SIGKILL: members and the instance keep running without an agent.
    agent.kill9();
    let mut agent = AgentProcess::spawn(&config, &env.cfg.api.socket, &log);
    let mut c = agent.client().await;
    // The instance on the claimed member is re-adopted; the members of the dead agent are
    // removed and replaced.
    let (code, out) = exec_sh(&mut c, "survivor", "cat /etc/hostname").await;
    assert_eq!((code, out.trim()), (0, "survivor"));
    // Its eBPF programs moved to its name at the claim, where the new agent found them.
    assert!(env.cfg.bpf_root.join("survivor/link_egress").exists());
    let deadline = tokio::time::Instant::now() + LONG;
    let kept = loop {
        let kept: Vec<&String> = before
            .iter()
            .filter(|(_, pids)| pids.iter().any(|&p| alive(p)))
            .map(|(n, _)| n)
            .collect();
        if kept.len() == 1 {
            break kept;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only the survivor's boot stays: {before:?} {kept:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_ready_members(&mut c, &img.busybox, 2).await;
    assert!(member_cgroups(&env).contains(kept[0]));
    stop(&mut c, "survivor", 9, Some(0)).await;
    wait_state(&mut c, "survivor", &[pb::InstanceState::Stopped], LONG).await;
    assert!(!member_cgroups(&env).contains(kept[0]));
    drop(agent);
}
