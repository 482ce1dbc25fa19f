//! KVM state: the `/dev/kvm` handle, the VM, vCPUs, guest memory.

pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
