//! The real static hearth-init as PID 1 in fresh namespaces: readiness, exec, memory limit
//! (OOM), disk size (ENOSPC), metrics, extra mounts, an ext4 image, ping, a flood of output
//! against an agent that does not read.

mod common;

use std::time::Duration;

use common::{Agent, Fixture, LONG, Launch, Sandbox, TestCgroup};
use hearth_proto::init::{Exec, ExitReason, InitErrorKind, Mount, Readiness};
use hearth_testkit::rootfs::ImageFormat;

#[tokio::test]
async fn readiness_of_busybox_httpd() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("httpd"), Launch::default());
    let mut spec = fx.spec(&["httpd", "-f", "-p", "8080", "-h", "/www"]);
    spec.readiness = Some(Readiness {
        ports: vec![8080],
        timeout_millis: 30_000,
    });
    let mut agent = Agent::start(&listener, spec).await;
    agent.until("Ready", |g| !g.ready.is_empty()).await;
    assert!(agent.got.errors.is_empty(), "{:?}", agent.got.errors);
    // The server really answers: fetch the page from inside with exec.
    agent
        .tx
        .exec(Exec {
            request_id: 1,
            argv: vec![
                "wget".into(),
                "-q".into(),
                "-O-".into(),
                "http://127.0.0.1:8080/index.html".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    agent.until("ExecResult", |g| !g.exec.is_empty()).await;
    let r = &agent.got.exec[0];
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hello from hearth\n");
    agent.tx.stop(0, Duration::from_secs(30)).await.unwrap();
    let exited = agent.run_to_exit().await;
    assert!(exited.requested);
    assert_eq!(exited.exit_code, 128 + libc::SIGTERM);
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn readiness_timeout_names_the_port() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("noready"), Launch::default());
    let mut spec = fx.spec(&["sleep", "1000"]);
    spec.readiness = Some(Readiness {
        ports: vec![9999],
        timeout_millis: 300,
    });
    let mut agent = Agent::start(&listener, spec).await;
    agent.until("InitError", |g| !g.errors.is_empty()).await;
    let e = &agent.got.errors[0];
    assert_eq!(e.kind, InitErrorKind::ReadinessTimeout as i32);
    assert_eq!(e.port, 9999);
    assert!(!e.fatal);
    assert!(agent.got.ready.is_empty());
    // The agent decides what happens next.
    agent.tx.stop(libc::SIGKILL, Duration::ZERO).await.unwrap();
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 137);
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn exec_returns_output_and_exit_code() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("exec"), Launch::default());
    let mut spec = fx.spec(&["sleep", "1000"]);
    spec.env.push("FROM_SPEC=yes".into());
    let mut agent = Agent::start(&listener, spec).await;
    agent.until("Started", |g| !g.started.is_empty()).await;
    let exec = |id: u64, script: &str| Exec {
        request_id: id,
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    agent
        .tx
        .exec(exec(1, "echo out $FROM_SPEC; echo err >&2; exit 7"))
        .await
        .unwrap();
    let mut as_app = exec(2, "id -u; pwd; cat; echo $EXTRA");
    as_app.user = "app".into();
    as_app.working_dir = "/tmp".into();
    as_app.stdin = b"from stdin\n".to_vec();
    as_app.env = vec!["EXTRA=extra".into()];
    agent.tx.exec(as_app).await.unwrap();
    let mut slow = exec(3, "sleep 100");
    slow.timeout_millis = 200;
    agent.tx.exec(slow).await.unwrap();
    agent
        .tx
        .exec(Exec {
            request_id: 4,
            argv: vec!["no-such-tool".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    agent.until("4 ExecResults", |g| g.exec.len() == 4).await;
    let by_id = |id| agent.got.exec.iter().find(|r| r.request_id == id).unwrap();
    let r = by_id(1);
    assert_eq!(
        (r.exit_code, &r.stdout[..], &r.stderr[..]),
        (7, &b"out yes\n"[..], &b"err\n"[..])
    );
    let r = by_id(2);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "1000\n/tmp\nfrom stdin\nextra\n"
    );
    let r = by_id(3);
    assert!(r.timed_out && r.exit_code == -1, "{r:?}");
    let r = by_id(4);
    assert_eq!(r.exit_code, -1);
    assert!(r.error.contains("not found"), "{r:?}");
    // The workload kept running through all of it.
    agent.tx.ping(42).await.unwrap();
    agent.until("Pong", |g| g.pongs.contains(&42)).await;
    agent.tx.stop(0, Duration::from_secs(30)).await.unwrap();
    agent.run_to_exit().await;
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn exceeding_the_memory_limit_is_an_oom_exit() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let cgroup = TestCgroup::new(64 << 20);
    let mut sandbox = Sandbox::launch(
        fx.dir.path(),
        &fx.args("oom"),
        Launch {
            cgroup_procs: cgroup.procs(),
            ..Launch::default()
        },
    );
    // busybox tail keeps the current (endless) line in memory.
    let mut agent = Agent::start(&listener, fx.spec(&["tail", "/dev/zero"])).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.reason, ExitReason::Oom as i32, "{exited:?}");
    assert_eq!(exited.exit_code, 137);
    assert_eq!(exited.signal, libc::SIGKILL);
    // init survived to report it, and the last metrics sample counts the kill.
    let last = agent.got.metrics.last().expect("no metrics");
    assert!(last.oom_kills >= 1, "{last:?}");
    assert_eq!(last.memory_limit_bytes, 64 << 20);
    assert_eq!(sandbox.wait(LONG).await.code(), Some(137));
    drop(sandbox);
    drop(cgroup);
}

#[tokio::test]
async fn writing_beyond_the_disk_size_fails_with_enospc() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("disk"), Launch::default());
    let mut spec = fx.spec(&[
        "sh",
        "-c",
        "dd if=/dev/zero of=/big bs=1M count=4 && echo small-ok; \
         dd if=/dev/zero of=/bigger bs=1M count=64; echo dd=$?",
    ]);
    spec.root.as_mut().unwrap().disk_size_bytes = 16 << 20;
    let mut agent = Agent::start(&listener, spec).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0);
    let out = agent.got.stdout();
    assert!(out.contains("small-ok"), "{out}");
    assert!(out.contains("dd=1"), "{out}");
    let err = agent.got.stderr();
    assert!(err.contains("No space left on device"), "{err}");
    sandbox.wait(LONG).await;
}

#[tokio::test]
async fn root_is_a_fresh_overlay_on_an_ext4_image() {
    require_sandbox!();
    let fx = Fixture::with(ImageFormat::Ext4 { size_mib: 32 }, |r| {
        r.file("/etc/motd", "from the image\n", 0o644)
    });
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("ext4"), Launch::default());
    let script = "cat /etc/motd; echo changed > /etc/motd; cat /etc/motd; \
                  grep ' / ' /proc/mounts; cat /etc/hostname; ls /dev; \
                  grep -c . /proc/mounts";
    let mut agent = Agent::start(&listener, fx.spec(&["sh", "-c", script])).await;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0, "{}", agent.got.stderr());
    let out = agent.got.stdout();
    assert!(out.starts_with("from the image\nchanged\n"), "{out}");
    assert!(out.contains("overlay / overlay"), "{out}");
    // The sandbox's /dev holds only the standard nodes, not the host's devices.
    assert!(out.contains("null") && !out.contains("loop0"), "{out}");
    sandbox.wait(LONG).await;
    // The image itself is unchanged (read-only lower layer).
    let img = std::fs::read(&fx.image).unwrap();
    assert!(!img.windows(8).any(|w| w == b"changed\n"));
}

#[tokio::test]
async fn metrics_and_extra_mounts() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let shared = fx.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("note"), "from the host\n").unwrap();
    let cgroup = TestCgroup::new(256 << 20);
    let mut sandbox = Sandbox::launch(
        fx.dir.path(),
        &fx.args("metrics"),
        Launch {
            cgroup_procs: cgroup.procs(),
            ..Launch::default()
        },
    );
    let mut spec = fx.spec(&[
        "sh",
        "-c",
        "cat /data/note; touch /data/x 2>&1 | grep -o Read-only; df -k /scratch | tail -1; \
         echo armed; sleep 1000",
    ]);
    spec.metrics_interval_millis = 100;
    spec.mounts = vec![
        Mount {
            source: shared.display().to_string(),
            target: "/data".into(),
            fstype: String::new(),
            options: vec!["bind".into()],
            read_only: true,
        },
        Mount {
            source: "tmpfs".into(),
            target: "/scratch".into(),
            fstype: "tmpfs".into(),
            options: vec!["size=2m".into(), "nodev".into()],
            read_only: false,
        },
    ];
    let mut agent = Agent::start(&listener, spec).await;
    agent.until("armed", |g| g.stdout().contains("armed")).await;
    agent.until("3 metrics", |g| g.metrics.len() >= 3).await;
    let out = agent.got.stdout();
    assert!(out.contains("from the host"), "{out}");
    assert!(out.contains("Read-only"), "{out}");
    assert!(out.contains(" 2048 "), "{out}");
    let m = agent.got.metrics.last().unwrap();
    assert!(m.process_count >= 2, "{m:?}");
    assert!(m.rootfs_total_bytes >= 60 << 20, "{m:?}");
    assert!(m.at_unix_nanos > 0);
    // The instance's own figures, not the host's.
    assert_eq!(m.memory_limit_bytes, 256 << 20, "{m:?}");
    assert!(
        m.memory_used_bytes > 0 && m.memory_used_bytes < 256 << 20,
        "{m:?}"
    );
    assert!(m.cpu_usage_micros < 60_000_000, "{m:?}");
    assert_eq!(m.oom_kills, 0);
    agent.tx.stop(0, Duration::from_secs(30)).await.unwrap();
    agent.run_to_exit().await;
    sandbox.wait(LONG).await;
    drop(sandbox);
    drop(cgroup);
}

#[tokio::test]
async fn a_flood_of_output_never_blocks_the_workload() {
    require_sandbox!();
    let fx = Fixture::new();
    let listener = fx.listen();
    let mut sandbox = Sandbox::launch(fx.dir.path(), &fx.args("flood"), Launch::default());
    // ~40 MiB of lines, far beyond init's 4 MiB buffer, while the agent reads nothing.
    let script = "yes 0123456789012345678901234567890123456789012345678901234567890123456789 \
                  | head -n 550000; echo done-writing >&2";
    let mut agent = Agent::start(&listener, fx.spec(&["sh", "-c", script])).await;
    // Do not read until the workload has finished: its exit does not wait for the agent.
    let pid = sandbox.init_pid();
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let console = std::fs::read_to_string(&sandbox.console).unwrap_or_default();
        if console.contains("exited code=0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", sandbox.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = pid;
    let exited = agent.run_to_exit().await;
    assert_eq!(exited.exit_code, 0);
    let dropped: u64 = agent.got.dropped.iter().map(|d| d.count).sum();
    assert!(dropped > 0, "nothing was dropped");
    // Every seq is either delivered or reported dropped, and the tail end arrived.
    let delivered = agent.got.logs.len() as u64;
    let last = agent.got.logs.last().unwrap().seq;
    assert_eq!(
        delivered + dropped,
        last,
        "delivered {delivered} + dropped {dropped}"
    );
    assert!(agent.got.stderr().contains("done-writing"));
    sandbox.wait(LONG).await;
}
