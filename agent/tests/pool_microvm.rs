//! Warm pools with the microvm runtime: the real hearth-vmm on /dev/kvm with the `init_hello`
//! test guest standing in for hearth-init (no Linux boots on PVM hosts). A member is a VMM
//! whose guest said Hello without an instance id over vsock and was welcomed without a spec; a
//! start claims it, the spec reaches the guest as `assign` on that connection, and the
//! member's TAP, eBPF pins and console log pass to the instance.

mod common;

use std::time::Duration;

use common::*;
use hearth_agent::model::pb;

const LONG: Duration = Duration::from_secs(180);

fn it() -> pb::InstanceType {
    pb::InstanceType {
        vcpus: 1,
        memory_mib: 64,
        disk_mib: 16,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_member_is_claimed_and_gets_its_spec_over_vsock() {
    hearth_testkit::require!(hearth_testkit::skip::root(), hearth_testkit::skip::kvm());
    let img = images();
    let env = Env::microvm_test_guest(img.registry.clone(), "init_hello");
    let agent = TestAgent::start(&env).await;
    let mut c = agent.client.clone();

    c.set_warm_pool(pb::SetWarmPoolRequest {
        image: img.busybox.clone(),
        instance_type: Some(it()),
        size: 1,
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let l = c
            .list_warm_pools(pb::ListWarmPoolsRequest {})
            .await
            .unwrap()
            .into_inner();
        if l.pools.first().is_some_and(|p| p.ready == 1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    create_start(
        &mut c,
        "vm-w",
        pb::InstanceSpec {
            image: img.busybox.clone(),
            instance_type: Some(it()),
            default_port: 8080,
            stop_grace_millis: Some(0),
            ..Default::default()
        },
    )
    .await;
    let entry = agent
        .daemon
        .as_ref()
        .unwrap()
        .node
        .mgr
        .entry("vm-w")
        .unwrap();
    let rt = entry.private().runtime.expect("a boot");
    let member = rt.dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(member.starts_with("_pool"), "{member}");
    assert!(entry.private().warm_start);

    // The guest said Hello without an id, and the assign reached it on that connection; its
    // console (written by the member's VMM) moved to the instance.
    let console = env.cfg.state_dir.join("instances/vm-w/console.log");
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("sent hello for instance \"\": true") && text.contains("received") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no assign reached the guest: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The member's TAP is the instance's now, with the eBPF pins under its name.
    let i = get(&mut c, "vm-w").await;
    let tap = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            std::fs::read_to_string(format!("/sys/class/net/{n}/ifalias"))
                .is_ok_and(|a| a.trim() == "vm-w")
        })
        .expect("a TAP labelled vm-w");
    assert!(std::path::Path::new(&format!("/sys/class/net/{tap}/tun_flags")).exists());
    assert!(env.cfg.bpf_root.join("vm-w/link_egress").exists());
    assert!(!env.cfg.bpf_root.join(&member).exists());
    assert!(!i.address.is_empty());

    // The guest never answers: the stop's grace and margin run out and the VMM is killed;
    // the member goes with the boot.
    let layout = hearth_agent::runtime::cgroup::Layout::host(&env.cfg.cgroup.parent).unwrap();
    let vmm = layout.instance(&member).pids();
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    stop(&mut c, "vm-w", 0, Some(0)).await;
    let s = wait_state(&mut c, "vm-w", &[pb::InstanceState::Stopped], LONG).await;
    assert_eq!(s.exit.unwrap().exit_code, 137);
    assert!(!layout.instance(&member).exists());
    assert!(!std::path::Path::new(&format!("/sys/class/net/{tap}")).exists());
    destroy(&mut c, "vm-w").await;
    agent.shutdown().await;
}
