//! KVM state: the `/dev/kvm` handle, VM, vCPUs, guest memory.

pub mod kvm;
