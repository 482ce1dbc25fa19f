//! The real static hearth-init as PID 1 in fresh namespaces (unshare) on a busybox erofs
//! image, driven by a test agent over the Unix-socket transport: output, exit codes, signals,
//! stop with grace, zombie reaping, bad specs.

mod common;

use std::time::Duration;

use common::{Agent, Fixture, LONG, Launch, Sandbox};
use hearth_proto::init::{ExitReason, InitErrorKind, LogStream};

#[tokio::test]
async fn logs_of_stdout_and_stderr_and_exit_zero() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("logs"), Launch::default());
    let spec = fx.spec(&[
        "sh",
        "-c",
        "echo hello stdout; echo hello stderr >&2; echo pid=$$; cat /www/index.html; id",
    ]);
    let mut agent = Agent::start(&listener, spec).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0);
    assert_eq!(exited.reason, ExitReason::Exit as i32);
    assert!(!exited.requested);
    let out = agent.got.stdout();
    assert!(out.contains("hello stdout\n"), "{out}");
    assert!(out.contains("hello from hearth\n"), "{out}");
    assert!(out.contains("uid=0(root) gid=0(root)"), "{out}");
    assert_eq!(agent.got.stderr(), "hello stderr\n");
    // The workload is not PID 1; init is.
    let started = agent.got.started[0];
    assert!(out.contains(&format!("pid={}\n", started.pid)), "{out}");
    assert!(started.pid > 1);
    // No readiness ports: Ready right after Started.
    assert_eq!(agent.got.ready.len(), 1);
    // Seqs are 1, 2, 3, ... in order.
    let seqs: Vec<u64> = agent.got.logs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let status = sandbox.wait(LONG).await;
    assert_eq!(status.code(), Some(0), "{}", sandbox.output());
    let console = sandbox.output();
    assert!(
        console.contains("hearth-init: exited code=0 reason=exit"),
        "{console}"
    );
}

#[tokio::test]
async fn non_zero_exit_code_is_reported_and_returned() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("exit3"), Launch::default());
    let mut agent = Agent::start(&listener, fx.spec(&["sh", "-c", "exit 3"])).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 3);
    assert_eq!(exited.reason, ExitReason::Exit as i32);
    assert_eq!(sandbox.wait(LONG).await.code(), Some(3));
}

#[tokio::test]
async fn workload_killed_by_a_signal() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("sig"), Launch::default());
    let mut agent = Agent::start(&listener, fx.spec(&["sleep", "1000"])).await;
    agent.until("Started", |g| !g.started.is_empty()).await;
    agent.tx.signal(libc::SIGUSR1).await.unwrap();
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.reason, ExitReason::Signal as i32);
    assert_eq!(exited.signal, libc::SIGUSR1);
    assert_eq!(exited.exit_code, 128 + libc::SIGUSR1);
    assert!(!exited.requested);
    assert_eq!(sandbox.wait(LONG).await.code(), Some(128 + libc::SIGUSR1));
}

#[tokio::test]
async fn sigterm_handled_by_the_workload() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("term"), Launch::default());
    let script = "trap 'echo got TERM; exit 7' TERM; echo armed; while true; do sleep 0.1; done";
    let mut agent = Agent::start(&listener, fx.spec(&["sh", "-c", script])).await;
    agent.until("armed", |g| g.stdout().contains("armed")).await;
    agent.tx.stop(0, Duration::from_secs(60)).await.unwrap();
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 7);
    assert_eq!(exited.reason, ExitReason::Exit as i32);
    assert!(exited.requested);
    assert!(!exited.killed_after_grace);
    assert!(agent.got.stdout().contains("got TERM"));
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn sigterm_ignored_then_sigkill_after_the_grace() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("stubborn"), Launch::default());
    let script = "trap '' TERM; echo armed; while true; do sleep 0.1; done";
    let mut agent = Agent::start(&listener, fx.spec(&["sh", "-c", script])).await;
    agent.until("armed", |g| g.stdout().contains("armed")).await;
    let asked = std::time::Instant::now();
    agent
        .tx
        .stop(libc::SIGTERM, Duration::from_millis(500))
        .await
        .unwrap();
    let exited = agent.run_to_exit().await;
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "killed before the grace ended"
    );
    assert_eq!(exited.exit_code, 137);
    assert_eq!(exited.reason, ExitReason::Signal as i32);
    assert_eq!(exited.signal, libc::SIGKILL);
    assert!(exited.requested);
    assert!(exited.killed_after_grace);
    // init says so in the log stream too.
    assert!(
        agent
            .got
            .logs
            .iter()
            .any(|r| r.stream == LogStream::Init as i32
                && String::from_utf8_lossy(&r.data).contains("SIGKILL"))
    );
    assert_eq!(sandbox.wait(LONG).await.code(), Some(137));
}

#[tokio::test]
async fn sigterm_to_init_is_a_stop_request() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("initterm"), Launch::default());
    let mut spec = fx.spec(&[
        "sh",
        "-c",
        "trap 'exit 5' TERM; echo armed; while true; do sleep 0.1; done",
    ]);
    spec.default_grace_millis = 30_000;
    let mut agent = Agent::start(&listener, spec).await;
    agent.until("armed", |g| g.stdout().contains("armed")).await;
    let pid = sandbox.init_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 5);
    assert!(exited.requested);
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn orphans_are_reaped() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("zombies"), Launch::default());
    // Each subshell exits at once, leaving its usleep to be re-parented to init (PID 1). Once
    // they end, init must reap them: no usleep may be left, not even as a zombie.
    let script = r#"
        for i in 1 2 3 4 5; do (usleep 1000000 &) ; done
        seen=no
        for i in $(seq 100); do
            if ps -o ppid,comm | grep -q '^ *1 usleep'; then seen=yes; break; fi
            usleep 10000
        done
        echo reparented=$seen
        for i in $(seq 400); do
            cat /proc/[0-9]*/comm 2>/dev/null | grep -q usleep || break
            usleep 50000
        done
        echo left=$(cat /proc/[0-9]*/comm 2>/dev/null | grep -c usleep)
    "#;
    let mut agent = Agent::start(&listener, fx.spec(&["sh", "-c", script])).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0, "{}", agent.got.stderr());
    let out = agent.got.stdout();
    assert!(out.contains("reparented=yes"), "{out}");
    assert!(out.contains("left=0"), "{out}");
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn missing_entrypoint_is_a_bad_spec() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("bad"), Launch::default());
    let mut agent = Agent::start(&listener, fx.spec(&[])).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.reason, ExitReason::InitError as i32);
    assert_eq!(agent.got.errors.len(), 1);
    let e = &agent.got.errors[0];
    assert_eq!(e.kind, InitErrorKind::BadSpec as i32);
    assert!(e.fatal);
    assert!(e.message.contains("no entrypoint"), "{}", e.message);
    assert!(agent.got.started.is_empty());
    assert_eq!(sandbox.wait(LONG).await.code(), Some(125));
}

#[tokio::test]
async fn unknown_user_is_reported() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("user"), Launch::default());
    let mut spec = fx.spec(&["id"]);
    spec.user = "ghost".into();
    let mut agent = Agent::start(&listener, spec).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.reason, ExitReason::InitError as i32);
    let e = &agent.got.errors[0];
    assert_eq!(e.kind, InitErrorKind::UnknownUser as i32);
    assert!(e.message.contains("ghost"), "{}", e.message);
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn missing_executable_exits_127() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("noexe"), Launch::default());
    let mut agent = Agent::start(&listener, fx.spec(&["no-such-program"])).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.reason, ExitReason::InitError as i32);
    assert_eq!(exited.exit_code, 127);
    assert_eq!(agent.got.errors[0].kind, InitErrorKind::Spawn as i32);
    assert_eq!(sandbox.wait(LONG).await.code(), Some(127));
}

#[tokio::test]
async fn user_env_workdir_and_rlimits_apply() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("as-app"), Launch::default());
    let mut spec = fx.spec(&[
        "sh",
        "-c",
        "id; pwd; echo HOME=$HOME GREETING=$GREETING; ulimit -n; hostname",
    ]);
    spec.user = "app".into();
    spec.working_dir = "/home/app/work".into();
    spec.env.push("GREETING=hi there".into());
    spec.hostname = "web-host".into();
    spec.rlimits.push(hearth_proto::init::Rlimit {
        resource: "nofile".into(),
        soft: 123,
        hard: 456,
    });
    let mut agent = Agent::start(&listener, spec).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0, "{}", agent.got.stderr());
    let out = agent.got.stdout();
    assert!(
        out.contains("uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)"),
        "{out}"
    );
    assert!(out.contains("/home/app/work\n"), "{out}");
    assert!(out.contains("HOME=/home/app GREETING=hi there"), "{out}");
    assert!(out.contains("123\n"), "{out}");
    assert!(out.contains("web-host\n"), "{out}");
    sandbox.wait(LONG).await;
}
