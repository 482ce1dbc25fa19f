//! The `hearth-agent` binary SIGKILLed in the middle of a start, at the test-only failpoints of
//! `hearth_agent::instance::failpoint` (`HEARTH_TEST_FAILPOINTS`): after a restart no instance
//! is lost. A warm start killed after the claim was committed and before hearth-init got the
//! spec runs on the member it claimed; one killed before the commit is as it was and starts
//! again; a cold start killed before init was welcomed runs on its boot; one killed after the
//! launch and before its runtime was stored is reported lost, its boot reaped, and it starts
//! again. Also shows that a
//! warm-pool member has its root assembled before any spec.

mod common;

use std::{os::unix::process::ExitStatusExt as _, path::Path, time::Duration};

use common::*;
use hearth_agent::{ctl::Client, instance::failpoint, model::pb};

const LONG: Duration = Duration::from_secs(120);

/// The agent binary with `failpoints` armed.
fn spawn_armed(env: &Env, config: &Path, log: &Path, failpoints: &str) -> AgentProcess {
    AgentProcess::spawn_with_env(
        config,
        &env.cfg.api.socket,
        log,
        &[(failpoint::ENV, failpoints)],
    )
}

/// Waits for the armed agent to die at its failpoint (SIGKILL).
async fn died_at_failpoint(agent: &mut AgentProcess) {
    let deadline = tokio::time::Instant::now() + LONG;
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not reach its failpoint"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("test failpoint reached"), "{log}");
}

/// An env whose config keeps one busybox member of the small type ready.
fn pooled_env(img: &Images) -> Env {
    let mut env = Env::new(img.registry.clone());
    env.cfg.pool.pools = vec![hearth_agent::config::PoolEntryConfig {
        image: img.busybox.clone(),
        size: 1,
        vcpus: Some(1),
        memory_mib: Some(64),
        disk_mib: Some(64),
    }];
    env
}

/// The `_pool*` cgroups of the test's agent and their processes.
fn members(env: &Env) -> Vec<(String, Vec<i32>)> {
    let layout = hearth_agent::runtime::cgroup::Layout::host(&env.cfg.cgroup.parent).unwrap();
    let (_, parent) = &layout.parents[0];
    let mut v: Vec<(String, Vec<i32>)> = std::fs::read_dir(parent)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(hearth_agent::pool::MEMBER_PREFIX))
                .map(|n| {
                    let pids = std::fs::read_to_string(parent.join(&n).join("cgroup.procs"))
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|l| l.trim().parse().ok())
                        .collect();
                    (n, pids)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until a process of the member has the overlay root mounted (at `/run/root`, where
/// hearth-init assembles it before switching into it): the root is attached before any spec.
async fn member_root_attached(env: &Env, member: &str) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let pids = members(env)
            .into_iter()
            .find(|(n, _)| n == member)
            .map(|(_, p)| p)
            .unwrap_or_default();
        let attached = pids.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.split(' ').nth(4) == Some("/run/root") && l.contains(" - overlay "))
        });
        if attached {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "member {member} never had its root attached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const TICKER: &str = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done";

/// Creates `id` and starts it on an agent that dies during the start.
async fn start_and_crash(c: &mut Client, agent: &mut AgentProcess, id: &str, image: &str) {
    c.create_instance(pb::CreateInstanceRequest {
        id: id.into(),
        spec: Some(sh_spec(image, TICKER)),
    })
    .await
    .unwrap();
    let r = c
        .start_instance(pb::StartInstanceRequest { id: id.into() })
        .await;
    assert!(
        r.is_err(),
        "the start should have died with the agent: {r:?}"
    );
    died_at_failpoint(agent).await;
}

/// Waits for output of the instance (the workload runs and its logs arrive).
async fn ticks(c: &mut Client, id: &str) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !logs(c, id).await.contains("tick 3") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no output from {id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_claim_and_assign_the_instance_runs_on_its_member() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = pooled_env(&img);
    let config = env.write_config();
    let log = env.dir.path().join("agent.log");
    let mut agent = spawn_armed(&env, &config, &log, "warm-committed");
    let mut c = agent.client().await;
    wait_ready_members(&mut c, &img.busybox, 1).await;
    let before = members(&env);
    assert_eq!(before.len(), 1, "{before:?}");
    let (member, member_pids) = before[0].clone();
    assert!(!member_pids.is_empty(), "{member} has no processes");
    // The member's root is attached before it has an instance.
    member_root_attached(&env, &member).await;

    start_and_crash(&mut c, &mut agent, "crash-warm", &img.busybox).await;
    // The member lives on without the agent, its init still without a spec.
    assert!(
        members(&env)
            .iter()
            .any(|(n, p)| *n == member && !p.is_empty())
    );

    let mut agent = AgentProcess::spawn(&config, &env.cfg.api.socket, &log);
    let mut c = agent.client().await;
    let i = wait_state(&mut c, "crash-warm", &[pb::InstanceState::Healthy], LONG).await;
    assert_eq!(i.boots, 1, "the committed boot, not a new one: {i:?}");
    let evs = events(&mut c, "crash-warm").await;
    let s = started(&evs);
    assert_eq!(s.len(), 1, "{:?}", names(&evs));
    assert!(s[0].warm, "{s:?}");
    assert!(
        !names(&evs).contains(&"error"),
        "no error: {:?}",
        names(&evs)
    );
    let (code, out) = exec_sh(&mut c, "crash-warm", "cat /etc/hostname").await;
    assert_eq!((code, out.trim()), (0, "crash-warm"));
    ticks(&mut c, "crash-warm").await;
    // It runs on the member it claimed (the member's cgroup), which the new agent kept; the
    // member's own log moved to the instance.
    let now = members(&env);
    assert!(
        now.iter()
            .any(|(n, p)| *n == member && member_pids.iter().all(|m| p.contains(m))),
        "{member} {member_pids:?}: {now:?}"
    );
    let runtime_log = env.cfg.state_dir.join("instances/crash-warm/runtime.log");
    let text = std::fs::read_to_string(&runtime_log).unwrap_or_default();
    assert!(text.contains("started pid="), "{text}");

    // The pool refills beside it; the instance's end takes its member with it.
    wait_ready_members(&mut c, &img.busybox, 1).await;
    c.stop_instance(pb::StopInstanceRequest {
        id: "crash-warm".into(),
        signal: 9,
        grace_millis: Some(0),
    })
    .await
    .unwrap();
    wait_state(&mut c, "crash-warm", &[pb::InstanceState::Stopped], LONG).await;
    let deadline = tokio::time::Instant::now() + LONG;
    let in_a_member = |pid: &i32| members(&env).iter().any(|(_, p)| p.contains(pid));
    while member_pids.iter().any(in_a_member) {
        assert!(tokio::time::Instant::now() < deadline, "{member} stays");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_the_claim_was_committed_the_instance_starts_again() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = pooled_env(&img);
    let config = env.write_config();
    let log = env.dir.path().join("agent.log");
    let mut agent = spawn_armed(&env, &config, &log, "warm-handed-over");
    let mut c = agent.client().await;
    wait_ready_members(&mut c, &img.busybox, 1).await;
    // The new agent may reuse the member's name: the member is known by its processes.
    let (member, member_pids) = members(&env).remove(0);
    assert!(!member_pids.is_empty(), "{member} has no processes");

    start_and_crash(&mut c, &mut agent, "crash-early", &img.busybox).await;
    // The member's eBPF programs had moved to the instance's name.
    assert!(env.cfg.bpf_root.join("crash-early").exists());

    let mut agent = AgentProcess::spawn(&config, &env.cfg.api.socket, &log);
    let mut c = agent.client().await;
    // Nothing was committed: the instance is as it was, and nothing of the half-done claim
    // is left (the member goes, its pins under the instance's name too).
    let i = c
        .get_instance(pb::GetInstanceRequest {
            id: "crash-early".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&i), pb::InstanceState::Created, "{i:?}");
    assert!(!env.cfg.bpf_root.join("crash-early").exists());
    let deadline = tokio::time::Instant::now() + LONG;
    let in_a_member = |pid: &i32| members(&env).iter().any(|(_, p)| p.contains(pid));
    while member_pids.iter().any(in_a_member) {
        assert!(tokio::time::Instant::now() < deadline, "{member} stays");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // It starts again, on a new member.
    wait_ready_members(&mut c, &img.busybox, 1).await;
    c.start_instance(pb::StartInstanceRequest {
        id: "crash-early".into(),
    })
    .await
    .unwrap();
    let i = wait_state(&mut c, "crash-early", &[pb::InstanceState::Healthy], LONG).await;
    assert_eq!(i.boots, 1);
    assert!(started(&events(&mut c, "crash-early").await)[0].warm);
    let (code, out) = exec_sh(&mut c, "crash-early", "cat /etc/hostname").await;
    assert_eq!((code, out.trim()), (0, "crash-early"));
    ticks(&mut c, "crash-early").await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_a_cold_boot_was_welcomed_the_instance_runs() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let config = env.write_config();
    let log = env.dir.path().join("agent.log");
    let mut agent = spawn_armed(&env, &config, &log, "cold-committed");
    let mut c = agent.client().await;

    start_and_crash(&mut c, &mut agent, "crash-cold", &img.busybox).await;

    let mut agent = AgentProcess::spawn(&config, &env.cfg.api.socket, &log);
    let mut c = agent.client().await;
    let i = wait_state(&mut c, "crash-cold", &[pb::InstanceState::Healthy], LONG).await;
    assert_eq!(i.boots, 1, "{i:?}");
    let evs = events(&mut c, "crash-cold").await;
    let s = started(&evs);
    assert_eq!(s.len(), 1, "{:?}", names(&evs));
    assert!(!s[0].warm);
    let (code, out) = exec_sh(&mut c, "crash-cold", "cat /etc/hostname").await;
    assert_eq!((code, out.trim()), (0, "crash-cold"));
    ticks(&mut c, "crash-cold").await;
    c.stop_instance(pb::StopInstanceRequest {
        id: "crash-cold".into(),
        signal: 0,
        grace_millis: Some(10_000),
    })
    .await
    .unwrap();
    let s = wait_state(&mut c, "crash-cold", &[pb::InstanceState::Stopped], LONG).await;
    assert!(s.exit.unwrap().requested);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_launch_and_commit_the_boot_is_reaped() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let config = env.write_config();
    let log = env.dir.path().join("agent.log");
    let mut agent = spawn_armed(&env, &config, &log, "cold-launched");
    let mut c = agent.client().await;

    start_and_crash(&mut c, &mut agent, "crash-launch", &img.busybox).await;
    // The boot runs on, known to nobody: no runtime state was stored.
    let orphans = cgroup_pids(&env, "crash-launch");
    assert!(!orphans.is_empty(), "the launch left no processes");

    let mut agent = AgentProcess::spawn(&config, &env.cfg.api.socket, &log);
    let mut c = agent.client().await;
    let i = wait_state(&mut c, "crash-launch", &[pb::InstanceState::Failed], LONG).await;
    assert_eq!(
        i.error.as_ref().map(|e| e.kind),
        Some(pb::ErrorKind::Lost as i32),
        "{i:?}"
    );
    // Reaped: its cgroup and every process in it are gone.
    let cgroup = hearth_agent::runtime::cgroup::Layout::host(&env.cfg.cgroup.parent)
        .unwrap()
        .instance("crash-launch");
    assert!(!cgroup.exists(), "the orphaned boot's cgroup stays");
    for pid in orphans {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| c.contains("crash-launch"));
        assert!(!alive, "process {pid} of the orphaned boot still runs");
    }

    // A new start is a clean second boot.
    c.start_instance(pb::StartInstanceRequest {
        id: "crash-launch".into(),
    })
    .await
    .unwrap();
    let i = wait_state(&mut c, "crash-launch", &[pb::InstanceState::Healthy], LONG).await;
    assert_eq!(i.boots, 2, "{i:?}");
    let (code, out) = exec_sh(&mut c, "crash-launch", "cat /etc/hostname").await;
    assert_eq!((code, out.trim()), (0, "crash-launch"));
    ticks(&mut c, "crash-launch").await;
    drop(agent);
}
