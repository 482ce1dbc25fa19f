//! The eBPF programs (`ebpf/programs`), embedded in the agent binary at build time, and the
//! loader that attaches them to an instance's host-side interface.

use aya::Ebpf;
use hearth_ebpf_common::{PROG_EGRESS, PROG_INGRESS};

/// The compiled eBPF object (an ELF for `bpfel-unknown-none`), built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hearth-ebpf"));

/// Why the eBPF programs could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The embedded object could not be parsed or loaded into the kernel.
    #[error("Loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    /// The object lacks a program the agent needs.
    #[error("The eBPF object has no program named {0}")]
    MissingProgram(&'static str),
}

/// Parses the embedded object and loads its maps and programs into the kernel (needs CAP_BPF).
pub fn load() -> Result<Ebpf, EbpfError> {
    let ebpf = Ebpf::load(OBJECT)?;
    for name in [PROG_EGRESS, PROG_INGRESS] {
        if ebpf.program(name).is_none() {
            return Err(EbpfError::MissingProgram(name));
        }
    }
    Ok(ebpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_is_embedded_and_has_both_programs() {
        assert!(
            OBJECT.starts_with(b"\x7fELF"),
            "embedded object is not an ELF file"
        );
        for name in [PROG_EGRESS, PROG_INGRESS] {
            assert!(
                OBJECT.windows(name.len()).any(|w| w == name.as_bytes()),
                "object has no symbol {name}"
            );
        }
    }

    #[test]
    fn object_loads_into_the_kernel() {
        hearth_testkit::require!(hearth_testkit::skip::root());
        let ebpf = load().unwrap();
        assert!(ebpf.map(hearth_ebpf_common::MAP_COUNTERS).is_some());
    }
}
