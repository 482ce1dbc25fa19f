//! The microvm runtime with the real hearth-vmm on /dev/kvm and the `init_hello` test guest
//! (no Linux boots on PVM hosts): the guest dials the agent over virtio-vsock and sends
//! hearth-init's Hello; it never answers a Stop, so the grace runs out and the agent kills the
//! VMM. The guest's TAP exists with the eBPF programs attached while it runs, and is gone after.

mod common;

use std::time::Duration;

use common::*;
use hearth_agent::model::pb;

const LONG: Duration = Duration::from_secs(180);

/// The instances' interfaces (not those the agent prepares ahead of time for the next starts,
/// labelled `_net…`).
fn taps(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .filter(|n| {
            let alias = std::fs::read_to_string(format!("/sys/class/net/{n}/ifalias"));
            !alias.is_ok_and(|a| a.starts_with(hearth_agent::instance::network::PREPARED_PREFIX))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_guest_connects_tap_has_ebpf_and_grace_expiry_kills_the_vmm() {
    hearth_testkit::require!(hearth_testkit::skip::root(), hearth_testkit::skip::kvm());
    let img = images();
    let env = Env::microvm_test_guest(img.registry.clone(), "init_hello");
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();
    let node = c
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.runtime, "microvm");

    let spec = pb::InstanceSpec {
        image: img.busybox.clone(),
        instance_type: Some(pb::InstanceType {
            vcpus: 1,
            memory_mib: 64,
            disk_mib: 16,
        }),
        default_port: 8080,
        stop_grace_millis: Some(1_000),
        ..Default::default()
    };
    create_start(&mut c, "vm-1", spec).await;

    // The agent sees the guest's Hello arrive over vsock.
    wait_logs(&mut c, "vm-1", "hearth-init test-guest connected", LONG).await;
    let i = get(&mut c, "vm-1").await;
    assert_eq!(state(&i), pb::InstanceState::Starting);

    // Its TAP exists, with the eBPF programs attached (pinned links).
    let prefix = env.cfg.network.interface_prefix.clone();
    let found = taps(&prefix);
    assert_eq!(found.len(), 1, "{found:?}");
    let tap = &found[0];
    assert!(
        std::path::Path::new(&format!("/sys/class/net/{tap}/tun_flags")).exists(),
        "{tap} is a TAP"
    );
    let pins: Vec<String> = std::fs::read_dir(env.cfg.bpf_root.join("vm-1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(pins.iter().any(|p| p.starts_with("link")), "{pins:?}");
    let layout = hearth_agent::runtime::cgroup::Layout::host(&env.cfg.cgroup.parent).unwrap();
    let vmm = layout.instance("vm-1").pids();
    assert_eq!(vmm.len(), 1, "one hearth-vmm: {vmm:?}");
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", vmm[0])).unwrap();
    assert_eq!(comm.trim(), "hearth-vmm");

    // Metrics from the VMM (its RSS, and its control socket's counters).
    let m = c
        .get_metrics(pb::GetMetricsRequest { id: "vm-1".into() })
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert!(m.runtime_rss_bytes > 0, "{m:?}");
    assert!(m.vmm_vcpu_exits > 0, "{m:?}");

    // The guest ignores the Stop: SIGKILL to the VMM when grace + margin run out.
    stop(&mut c, "vm-1", 0, None).await;
    let s = wait_state(&mut c, "vm-1", &[pb::InstanceState::Stopped], LONG).await;
    let e = s.exit.unwrap();
    assert_eq!(e.exit_code, 137, "{e:?}");
    assert!(e.killed_after_grace && e.requested, "{e:?}");
    assert_eq!(e.reason, pb::StopReason::RuntimeError as i32);
    assert!(
        !std::path::Path::new(&format!("/proc/{}", vmm[0])).exists(),
        "the VMM was killed"
    );
    let evs = events(&mut c, "vm-1").await;
    let stopping = evs
        .iter()
        .find(|e| hearth_agent::model::event_name(e) == "stopping")
        .unwrap();
    let stopped = evs
        .iter()
        .find(|e| hearth_agent::model::event_name(e) == "stopped")
        .unwrap();
    assert!(stopped.at_unix_nanos - stopping.at_unix_nanos >= 1_000_000_000);
    assert!(taps(&prefix).is_empty(), "the TAP is removed");
    assert!(
        !env.cfg.bpf_root.join("vm-1").exists(),
        "the eBPF pins are removed"
    );
    destroy(&mut c, "vm-1").await;
    agent.shutdown().await;
}
