//! The `hearth-agent` binary killed with SIGKILL mid-run, and stopped with SIGTERM: instances
//! keep running, the restarted agent re-adopts them, and no instance, event or log line is lost.
//! Runs with the runtime `HEARTH_TEST_RUNTIME` selects (see `common::runtime`).

mod common;

use std::time::Duration;

use common::*;
use hearth_agent::model::pb;

const LONG: Duration = Duration::from_secs(120);

fn count_ticks(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("tick ")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_agent_restarts_and_readopts_everything() {
    hearth_testkit::require!(hearth_testkit::skip::root(), runtime::unavailable());
    let img = images();
    let env = Env::new(img.registry.clone());
    let config = env.write_config();
    let log = env.dir.path().join("agent.log");
    let socket = env.cfg.api.socket.clone();
    let mut agent = AgentProcess::spawn(&config, &socket, &log);
    let mut c = agent.client().await;

    let ticker = sh_spec(
        &img.busybox,
        "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done",
    );
    create_start(&mut c, "survivor", ticker).await;
    let mut stubborn = sh_spec(&img.busybox, "trap '' TERM; while :; do sleep 0.2; done");
    stubborn.stop_grace_millis = Some(4_000);
    create_start(&mut c, "stubborn", stubborn).await;
    c.create_instance(pb::CreateInstanceRequest {
        id: "idle".into(),
        spec: Some(sh_spec(&img.busybox, "true")),
    })
    .await
    .unwrap();
    for id in ["survivor", "stubborn"] {
        wait_state(&mut c, id, &[pb::InstanceState::Healthy], LONG).await;
    }
    // Some output before the crash.
    let deadline = tokio::time::Instant::now() + LONG;
    while count_ticks(&logs(&mut c, "survivor").await) < 5 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A stop whose grace is still running when the agent dies.
    stop(&mut c, "stubborn", 0, None).await;
    let before = events(&mut c, "").await;
    let pid_before = instance_pid(&env, "survivor");

    agent.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The instance lives on without the agent.
    assert!(
        std::path::Path::new(&format!("/proc/{pid_before}")).exists(),
        "instance process died with the agent"
    );

    let mut agent = AgentProcess::spawn(&config, &socket, &log);
    let mut c = agent.client().await;
    let survivor = get(&mut c, "survivor").await;
    assert_eq!(state(&survivor), pb::InstanceState::Healthy);
    assert_eq!(survivor.boots, 1, "re-adopted, not rebooted");
    assert_eq!(instance_pid(&env, "survivor"), pid_before);
    let idle = get(&mut c, "idle").await;
    assert_eq!(state(&idle), pb::InstanceState::Created);

    // Every event from before is still there, in order, and new ones continue the seqs.
    let after = events(&mut c, "").await;
    assert!(after.len() >= before.len());
    assert_eq!(&after[..before.len()], &before[..]);

    // The stop begun before the crash ends with SIGKILL after its grace.
    let s = wait_state(&mut c, "stubborn", &[pb::InstanceState::Stopped], LONG).await;
    let e = s.exit.unwrap();
    assert_eq!(e.exit_code, 137, "{e:?}");
    assert!(e.requested);

    // hearth-init reconnected: output keeps arriving, nothing twice.
    let n = count_ticks(&logs(&mut c, "survivor").await);
    let deadline = tokio::time::Instant::now() + LONG;
    let text = loop {
        let text = logs(&mut c, "survivor").await;
        if count_ticks(&text) > n + 5 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no output after restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ticks: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tick ").and_then(|n| n.parse().ok()))
        .collect();
    for w in ticks.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a tick was lost or repeated: {ticks:?}");
    }

    // SIGTERM: the API drains, the agent exits, the instance keeps running.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let s = agent.child.wait().unwrap();
        (s, agent)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "agent exit: {}", status.0);
    assert!(std::path::Path::new(&format!("/proc/{pid_before}")).exists());
    drop(status);

    let mut agent = AgentProcess::spawn(&config, &socket, &log);
    let mut c = agent.client().await;
    let survivor = wait_state(&mut c, "survivor", &[pb::InstanceState::Healthy], LONG).await;
    assert_eq!(survivor.boots, 1);
    stop(&mut c, "survivor", 0, Some(10_000)).await;
    let s = wait_state(&mut c, "survivor", &[pb::InstanceState::Stopped], LONG).await;
    assert!(s.exit.unwrap().requested);
    let all = events(&mut c, "").await;
    for w in all.windows(2) {
        assert!(w[1].seq > w[0].seq);
    }
    drop(agent);
}

/// The pid of the instance's hearth-init (sandbox) or hearth-vmm (microvm): the agent's
/// runtime state on disk is not public; the cgroup tells.
fn instance_pid(env: &Env, id: &str) -> i32 {
    *cgroup_pids(env, id)
        .first()
        .unwrap_or_else(|| panic!("no process in the cgroup of {id}"))
}
