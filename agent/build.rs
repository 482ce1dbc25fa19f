//! Builds the eBPF programs (`ebpf/programs`) for `bpfel-unknown-none` with aya-build and leaves
//! the object in `OUT_DIR`, from where `src/ebpf/mod.rs` embeds it in the agent binary.
//!
//! The programs need `-Z build-std=core`. A nightly toolchain is used when the machine has one;
//! otherwise the stable toolchain with `RUSTC_BOOTSTRAP=1`. `HEARTH_EBPF_TOOLCHAIN` overrides the
//! choice. `cargo xtask setup` installs `rust-src` for the chosen toolchain and `bpf-linker`.

use std::process::Command;

fn toolchain_works(name: &str) -> bool {
    Command::new("rustup")
        .args(["run", name, "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn main() -> aya_build::Result<()> {
    println!("cargo:rerun-if-env-changed=HEARTH_EBPF_TOOLCHAIN");
    let toolchain = match std::env::var("HEARTH_EBPF_TOOLCHAIN") {
        Ok(t) if !t.is_empty() => t,
        _ if toolchain_works("nightly") => "nightly".to_owned(),
        _ => "stable".to_owned(),
    };
    if !toolchain.starts_with("nightly") {
        // SAFETY: build scripts are single-threaded here; nothing else reads the environment
        // concurrently. aya-build passes it on to the nested cargo that needs `-Z build-std`.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let programs = aya_build::Package {
        name: "hearth-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/programs"),
        ..Default::default()
    };
    aya_build::build_ebpf([programs], aya_build::Toolchain::Custom(&toolchain))
}
