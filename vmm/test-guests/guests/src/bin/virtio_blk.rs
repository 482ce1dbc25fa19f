//! Drives the VMM's virtio-blk devices with virtio-drivers: disk 0 (read-write, id "scratch")
//! and disk 1 (read-only, id "rootfs"). The host fills sector 0 of disk N with "HEARTHD<N>";
//! the guest writes sector 1 of disk 0 with "GUEST-WROTE" + 0x5a bytes, which the host checks.
//! Prints `blk: ok <what>` / `blk: FAIL <what>` lines and `blk: done failures=<n>`.

#![no_std]
#![no_main]

use guest_rt::{
    boot::BootParams,
    exit,
    report::Checks,
    virtio::{IdHal, find},
    virtio_drivers::{device::blk::VirtIOBlk, transport::DeviceType},
};

/// Entry point: 64-bit mode, boot_params in RSI.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start(_rdi: u64, rsi: u64) -> ! {
    // SAFETY: the VMM passes the zero page in RSI.
    let bp = unsafe { BootParams::new(rsi as *const u8) };
    let mut c = Checks::new("blk");
    let mut disks = 0;
    for (n, t) in find(&bp, DeviceType::Block).enumerate() {
        disks += 1;
        let mut blk = match VirtIOBlk::<IdHal, _>::new(t) {
            Ok(b) => b,
            Err(_) => {
                c.check("init", false);
                continue;
            }
        };
        let mut sector = [0u8; 512];
        let read = blk.read_blocks(0, &mut sector).is_ok();
        let tag = [b'H', b'E', b'A', b'R', b'T', b'H', b'D', b'0' + n as u8];
        c.check(
            if n == 0 {
                "disk0 read sector 0"
            } else {
                "disk1 read sector 0"
            },
            read && sector[..8] == tag,
        );
        let mut id = [0u8; 20];
        let id_len = blk.device_id(&mut id).unwrap_or(0);
        let want: &[u8] = if n == 0 { b"scratch" } else { b"rootfs" };
        c.check(
            if n == 0 { "disk0 id" } else { "disk1 id" },
            &id[..id_len] == want,
        );
        let past_end = blk.capacity() as usize;
        c.check(
            if n == 0 {
                "disk0 read past end fails"
            } else {
                "disk1 read past end fails"
            },
            blk.read_blocks(past_end, &mut sector).is_err(),
        );
        let mut data = [0x5au8; 512];
        data[..11].copy_from_slice(b"GUEST-WROTE");
        if n == 0 {
            c.check("disk0 is writable", !blk.readonly());
            c.check("disk0 write sector 1", blk.write_blocks(1, &data).is_ok());
            c.check("disk0 flush", blk.flush().is_ok());
            let mut back = [0u8; 512];
            c.check(
                "disk0 read back",
                blk.read_blocks(1, &mut back).is_ok() && back == data,
            );
        } else {
            c.check("disk1 is read-only", blk.readonly());
            c.check("disk1 write fails", blk.write_blocks(1, &data).is_err());
        }
        // Dropping the driver would reset the queues and spin; the VM ends here anyway.
        core::mem::forget(blk);
    }
    c.check("two disks", disks == 2);
    c.done();
    exit::reset()
}
