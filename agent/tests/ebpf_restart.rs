//! An agent restart leaves enforcement in place: a loader process attaches and pins the
//! filter, is killed with SIGKILL, denied traffic stays dropped (and counted) while it is
//! down, and a new loader process adopts the same links (same kernel link ids) and can update
//! the policy. The loader is this test binary run again in a helper mode.

mod ebpf_support;

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use ebpf_support::lab::*;
use hearth_agent::ebpf::{Direction::Egress, DropReason as D, Filter, PinRoot};
use hearth_testkit::{netns::ChildGuard, require, skip};

const HELPER_ENV: &str = "HEARTH_EBPF_RESTART_HELPER";
const HELPER_TEST: &str = "restart_helper";
const INSTANCE: &str = "restarted";
const N: usize = 10;

/// The helper process: `attach` (load, attach, pin) or `adopt` (adopt, then allow everything
/// the lab denies), print a line, then wait to be killed.
#[test]
#[ignore = "helper process of restart_keeps_enforcement_and_adopts_the_same_links"]
fn restart_helper() {
    let Ok(mode) = std::env::var(HELPER_ENV) else {
        return;
    };
    let netns = std::env::var("HEARTH_EBPF_NETNS").unwrap();
    let ifname = std::env::var("HEARTH_EBPF_IFNAME").unwrap();
    let root = PinRoot::new(std::env::var("HEARTH_EBPF_ROOT").unwrap()).unwrap();
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    // SAFETY: setns with a valid namespace fd only changes this thread's network namespace.
    let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(entered, 0, "setns");
    let report = |what: &str, f: &Filter| {
        let a = f.attachment().unwrap();
        println!(
            "HEARTH-EBPF {what} {} {} {}",
            a.egress_link_id,
            a.ingress_link_id,
            f.policy_version()
        );
    };
    let _filter = match mode.as_str() {
        "attach" => {
            let f = Filter::load_and_attach(
                &root,
                INSTANCE,
                &ifname,
                &Lab::policy(),
                &Default::default(),
            )
            .unwrap();
            report("attached", &f);
            f
        }
        "adopt" => {
            let mut f = Filter::adopt(&root, INSTANCE).unwrap();
            report("adopted", &f);
            let mut policy = Lab::policy();
            policy.deny.clear();
            policy.allow.push("198.51.100.66 udp".parse().unwrap());
            f.update_policy(&policy).unwrap();
            report("updated", &f);
            f
        }
        other => panic!("unknown helper mode {other}"),
    };
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

struct Helper {
    _child: ChildGuard,
    lines: mpsc::Receiver<String>,
}

impl Helper {
    fn start(lab: &Lab, mode: &str) -> Helper {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", HELPER_TEST, "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(HELPER_ENV, mode)
            .env("HEARTH_EBPF_NETNS", lab.host.name())
            .env("HEARTH_EBPF_IFNAME", &lab.host_if)
            .env("HEARTH_EBPF_ROOT", lab.root.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest's "test restart_helper ... " may precede it on the same line.
                if let Some((_, rest)) = line.split_once("HEARTH-EBPF ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        Helper {
            _child: ChildGuard(child),
            lines,
        }
    }

    /// The next report: (what, egress link id, ingress link id, policy version).
    fn report(&self) -> (String, u32, u32, u32) {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(120))
            .expect("helper report");
        let w: Vec<&str> = line.split_whitespace().collect();
        (
            w[0].to_owned(),
            w[1].parse().unwrap(),
            w[2].parse().unwrap(),
            w[3].parse().unwrap(),
        )
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(self) {
        drop(self);
    }
}

#[test]
fn restart_keeps_enforcement_and_adopts_the_same_links() {
    require!(skip::root());
    let lab = Lab::new();
    let client = lab.inst_udp(INST4.into());
    let allowed = lab.host_udp(IpAddr::from(ALLOWED4), 5005);
    let denied = lab.host_udp(IpAddr::from(DENIED4), 5005);

    let first = Helper::start(&lab, "attach");
    let (what, egress_id, ingress_id, version) = first.report();
    assert_eq!((what.as_str(), version), ("attached", 1));
    assert_eq!(udp_exchange(&client, &allowed, N, 100), (N, N));
    assert_eq!(udp_exchange(&client, &denied, N, 100), (0, 0));

    first.kill();
    // Nobody holds the filter but bpffs: it still enforces, and still counts.
    let before = Filter::adopt(&lab.root, INSTANCE)
        .unwrap()
        .counters()
        .unwrap();
    assert_eq!(udp_exchange(&client, &denied, N, 100), (0, 0));
    assert_eq!(udp_exchange(&client, &allowed, N, 100), (N, N));
    let after = Filter::adopt(&lab.root, INSTANCE)
        .unwrap()
        .counters()
        .unwrap();
    let c = after.since(&before);
    assert_eq!(c.dropped_for(Egress, D::Denied).packets, N as u64);

    let second = Helper::start(&lab, "adopt");
    let (what, egress_again, ingress_again, version) = second.report();
    assert_eq!(what, "adopted");
    assert_eq!(
        (egress_again, ingress_again),
        (egress_id, ingress_id),
        "same links"
    );
    assert_eq!(version, 1);
    let (what, egress_after, _, version) = second.report();
    assert_eq!(
        (what.as_str(), version, egress_after),
        ("updated", 2, egress_id)
    );
    // The adopted filter's update is live.
    assert_eq!(udp_exchange(&client, &denied, N, 100), (N, N));
    second.kill();

    assert!(lab.root.remove(INSTANCE).unwrap());
    let host_if = lab.host_if.clone();
    let (_, progs) = lab.host.run(|| {
        aya::programs::SchedClassifier::query_tcx(&host_if, aya::programs::TcAttachType::Egress)
            .unwrap()
    });
    assert!(progs.is_empty());
    assert!(!lab.root.remove(INSTANCE).unwrap());
}
