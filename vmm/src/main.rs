//! `hearth-vmm`: runs one microVM.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let kvm = hearth_vmm::vstate::kvm::open().context("KVM is not usable")?;
    println!(
        "KVM API {} ready: up to {} vCPUs per VM",
        kvm.get_api_version(),
        kvm.get_max_vcpus()
    );
    Ok(())
}
