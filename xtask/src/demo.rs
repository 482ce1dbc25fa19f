//! `cargo xtask demo`: the main job, end to end.
//!
//! Until the agent can run instances, the demo runs every part that exists and says exactly what
//! it did.

use std::process::Command;

use crate::util;

/// Options of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the demo.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    crate::setup::run(&crate::setup::Args { check: false })?;
    let root = util::root();
    util::step("build the host binaries", || {
        util::run(
            util::cargo()
                .current_dir(&root)
                .args(["build", "--quiet", "--bins"]),
        )
    })?;
    let target = hearth_testkit::artifacts::target_dir().join("debug");

    let init = util::step("build the static hearth-init", || {
        Ok(hearth_testkit::artifacts::hearth_init())
    })?;
    let size = std::fs::metadata(&init)?.len();
    let out = util::output(Command::new(&init).args([
        "hearth.socket=/run/hearth/demo.sock",
        "hearth.instance=demo",
    ]))?;
    println!(
        "demo: hearth-init ({size} bytes, static) parsed its bootstrap: {}",
        out.trim()
    );

    let guest = util::step("build the boot_timer test guest", || {
        Ok(hearth_testkit::artifacts::test_guest("boot_timer"))
    })?;
    println!("demo: test guest ready at {}", guest.display());

    let out = util::output(&mut Command::new(target.join("hearth-vmm")))?;
    println!("demo: hearth-vmm checked KVM: {}", out.trim());

    if util::is_root() {
        let out = util::output(Command::new(target.join("hearth-agent")).arg("ebpf-check"))?;
        println!(
            "demo: hearth-agent loaded its embedded eBPF object: {}",
            out.trim()
        );
    } else {
        println!("demo: not root, so the eBPF object was not loaded into the kernel");
    }
    println!(
        "demo: the agent cannot run instances yet, so no container was started (issues 3-8 build that)."
    );
    Ok(())
}
