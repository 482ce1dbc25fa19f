//! Tells rustc which BPF target architecture the programs are built for (aya-build's helper).

fn main() -> aya_build::Result<()> {
    aya_build::emit_bpf_target_arch_cfg()
}
