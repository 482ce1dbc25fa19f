//! A four-instruction tc program that pushes a VLAN tag (into skb metadata, as hardware
//! offload would) on everything an interface sends. It stands in for a VLAN device, which
//! this machine's kernel does not have, to show the filter drops offloaded tags. Raw `bpf(2)`
//! because aya only loads ELF objects; this module holds the tests' only such `unsafe`.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_EGRESS: u32 = 47;
const HELPER_SKB_VLAN_PUSH: i32 = 18;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn mov_imm(dst: u8, imm: i32) -> Insn {
    Insn {
        code: 0xb7,
        regs: dst,
        off: 0,
        imm,
    }
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a properly laid-out attribute block for `cmd` whose pointers (if any)
    // point to live buffers; the size passed is its own.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success both commands return a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Loads the program and attaches it to `ifindex`'s tc egress hook (TCX) in the calling
/// thread's network namespace; it stays attached while the returned link fd is open.
pub fn attach(ifindex: u32, vlan_id: u16) -> io::Result<OwnedFd> {
    let insns = [
        // r2 = htons(ETH_P_8021Q); r3 = vlan id; bpf_skb_vlan_push(r1 = skb, r2, r3)
        mov_imm(2, i32::from(0x8100u16.to_be())),
        mov_imm(3, i32::from(vlan_id)),
        Insn {
            code: 0x85,
            regs: 0,
            off: 0,
            imm: HELPER_SKB_VLAN_PUSH,
        },
        // return TCX_NEXT
        mov_imm(0, -1),
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    let prog = bpf(BPF_PROG_LOAD, &mut load)?;
    let mut link = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_EGRESS,
        ..LinkCreateAttr::default()
    };
    bpf(BPF_LINK_CREATE, &mut link)
}
