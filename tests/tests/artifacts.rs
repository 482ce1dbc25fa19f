//! Every kind of artefact the project ships or tests with builds from a clean tree and has the
//! shape it must have. (The eBPF object is checked where it is embedded, in hearth-agent.)

use std::path::Path;

fn elf_header(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit LE ELF",
        path.display()
    );
    bytes
}

/// True when the ELF has a PT_INTERP program header (i.e. it is dynamically linked).
fn has_interp(elf: &[u8]) -> bool {
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes(elf[0x36..0x38].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[0x38..0x3a].try_into().unwrap()) as usize;
    (0..phnum).any(|i| {
        let off = phoff + i * phentsize;
        u32::from_le_bytes(elf[off..off + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn hearth_init_is_a_static_x86_64_binary() {
    let path = hearth_testkit::artifacts::hearth_init();
    let elf = elf_header(&path);
    assert_eq!(
        u16::from_le_bytes([elf[0x12], elf[0x13]]),
        0x3e,
        "not x86-64"
    );
    assert!(
        !has_interp(&elf),
        "{} is dynamically linked",
        path.display()
    );
}

#[test]
fn test_guest_is_loadable_at_one_mib() {
    let path = hearth_testkit::artifacts::test_guest("boot_timer");
    let elf = elf_header(&path);
    let entry = u64::from_le_bytes(elf[0x18..0x20].try_into().unwrap());
    assert!(entry >= 0x10_0000, "entry {entry:#x} is below 1 MiB");
    assert!(!has_interp(&elf));
}
