//! Shared helpers of the hearth-vmm integration tests: running the real binary with a test
//! guest, waiting with a deadline, packaging a guest as a bzImage.

#![allow(dead_code)]

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// Generous: guests run emulated on PVM hosts and the machine may be busy.
pub const DEADLINE: Duration = Duration::from_secs(180);

/// The hearth-vmm binary under test.
pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hearth-vmm"))
}

/// A test guest's ELF.
pub fn guest(name: &str) -> PathBuf {
    hearth_testkit::artifacts::test_guest(name)
}

/// What a finished VMM left.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// Serial output (stdout).
    pub stdout: String,
    /// The VMM's own messages.
    pub stderr: String,
}

impl Run {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("hearth-vmm died by signal: {self:?}"))
    }
}

/// Waits for `child` (killing it at the deadline) and collects its output.
pub fn wait(mut child: Child) -> Run {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for hearth-vmm") {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hearth-vmm did not end within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout).unwrap();
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).unwrap();
    }
    Run {
        status,
        stdout,
        stderr,
    }
}

/// Starts `cmd` (hearth-vmm, from [`vmm`]) with its output captured for [`wait`].
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hearth-vmm")
}

/// Runs hearth-vmm with `args` to the end.
pub fn run(args: &[&str]) -> Run {
    wait(spawn(vmm().args(args)))
}

/// Polls `cond` every 20 ms until it holds or the deadline passes.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Packages an ELF test guest as a bzImage: a setup header (boot protocol 2.15, loaded high,
/// `code32_start` 1 MiB) followed by the guest's segments flattened from 1 MiB. The guests put
/// their 64-bit entry at 0x100200, where the protocol puts a bzImage's `startup_64`.
pub fn bzimage_from_elf(elf: &Path, out: &Path) {
    let data = std::fs::read(elf).unwrap();
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
    assert_eq!(&data[..4], b"\x7fELF");
    assert_eq!(u64_at(24), 0x10_0200, "guest entry must be 0x100200");
    let (phoff, phnum) = (u64_at(32) as usize, u16_at(56) as usize);
    let mut image = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * 56;
        let p_type = u32::from_le_bytes(data[ph..ph + 4].try_into().unwrap());
        let (off, paddr, filesz) = (
            u64_at(ph + 8) as usize,
            u64_at(ph + 24),
            u64_at(ph + 32) as usize,
        );
        if p_type != 1 || filesz == 0 {
            continue;
        }
        let at = (paddr - 0x10_0000) as usize;
        if image.len() < at + filesz {
            image.resize(at + filesz, 0);
        }
        image[at..at + filesz].copy_from_slice(&data[off..off + filesz]);
    }
    // BSS beyond the flattened image is zero in fresh guest memory.
    let setup_sects = 4u8;
    let mut setup = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    setup[0x1f1] = setup_sects;
    setup[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    setup[0x202..0x206].copy_from_slice(b"HdrS");
    setup[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    // loadflags: LOADED_HIGH.
    setup[0x211] = 0x01;
    setup[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    // syssize in 16-byte paragraphs.
    let syssize = image.len().div_ceil(16) as u32;
    setup[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    // xloadflags: XLF_KERNEL_64 (64-bit entry at +0x200).
    setup[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    setup.extend_from_slice(&image);
    std::fs::write(out, setup).unwrap();
}

/// Lists a directory (sorted names), to prove a failed start left nothing behind.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
