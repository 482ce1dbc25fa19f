//! A `virtio-drivers` HAL for identity-mapped guests, a transport wrapper that sets the status
//! bits one at a time (as Linux does; strict devices refuse ACKNOWLEDGE|DRIVER in one write),
//! and device discovery from `virtio_mmio.device=4K@<addr>:<irq>` on the command line.

use core::ptr::NonNull;

use virtio_drivers::{
    BufferDirection, Hal, PhysAddr, Result,
    device::socket::{VirtIOSocket, VsockConnectionManager},
    transport::{
        DeviceStatus, DeviceType, InterruptStatus, Transport,
        mmio::{MmioTransport, VirtIOHeader},
    },
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::boot::BootParams;

/// DMA from the bump heap; physical = virtual.
pub struct IdHal;

// SAFETY: allocations are page-aligned, zeroed, never reused; addresses are identity mapped.
unsafe impl Hal for IdHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let p = crate::heap::alloc_zeroed(pages * 4096, 4096).expect("guest heap exhausted");
        (
            p as u64 as PhysAddr,
            NonNull::new(p).expect("non-null heap"),
        )
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).expect("non-null MMIO address")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

/// Sets ACKNOWLEDGE before DRIVER, one bit per write.
pub struct Stepwise<T: Transport>(pub T);

impl<T: Transport> Transport for Stepwise<T> {
    fn device_type(&self) -> DeviceType {
        self.0.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.0.read_device_features()
    }
    fn write_driver_features(&mut self, f: u64) {
        self.0.write_driver_features(f)
    }
    fn max_queue_size(&mut self, q: u16) -> u32 {
        self.0.max_queue_size(q)
    }
    fn notify(&mut self, q: u16) {
        self.0.notify(q)
    }
    fn get_status(&self) -> DeviceStatus {
        self.0.get_status()
    }
    fn set_status(&mut self, s: DeviceStatus) {
        if s == (DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER) {
            self.0.set_status(DeviceStatus::ACKNOWLEDGE);
        }
        self.0.set_status(s)
    }
    fn set_guest_page_size(&mut self, g: u32) {
        self.0.set_guest_page_size(g)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.0.requires_legacy_layout()
    }
    fn queue_set(&mut self, q: u16, sz: u32, d: PhysAddr, dr: PhysAddr, dv: PhysAddr) {
        self.0.queue_set(q, sz, d, dr, dv)
    }
    fn queue_unset(&mut self, q: u16) {
        self.0.queue_unset(q)
    }
    fn queue_used(&mut self, q: u16) -> bool {
        self.0.queue_used(q)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.0.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.0.read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(&self, o: usize) -> Result<V> {
        self.0.read_config_space(o)
    }
    fn write_config_space<V: IntoBytes + Immutable>(&mut self, o: usize, v: V) -> Result<()> {
        self.0.write_config_space(o, v)
    }
}

/// A guest transport.
pub type GuestTransport = Stepwise<MmioTransport<'static>>;

/// MMIO base addresses of the devices the command line declares, in order.
pub fn device_addresses(bp: &BootParams) -> impl Iterator<Item = u64> {
    bp.cmdline().split(' ').filter_map(|w| {
        let spec = w.strip_prefix("virtio_mmio.device=")?;
        let at = spec.split_once('@')?.1;
        let addr = at.split_once(':').map_or(at, |(a, _)| a);
        u64::from_str_radix(addr.trim_start_matches("0x"), 16).ok()
    })
}

/// Opens every declared device of type `ty`, in command-line order.
pub fn find(bp: &BootParams, ty: DeviceType) -> impl Iterator<Item = GuestTransport> + '_ {
    device_addresses(bp).filter_map(move |addr| {
        let hdr = NonNull::new(addr as usize as *mut VirtIOHeader)?;
        // SAFETY: the VMM maps a 4 KiB virtio-mmio register window at each declared address,
        // identity mapped by its page tables, and nothing else aliases it.
        let t = unsafe { MmioTransport::new(hdr, 0x1000) }.ok()?;
        (t.device_type() == ty).then_some(Stepwise(t))
    })
}

/// The first vsock device, initialised, behind a connection manager; the error says which step
/// failed.
pub fn vsock(
    bp: &BootParams,
) -> core::result::Result<VsockConnectionManager<IdHal, GuestTransport>, &'static str> {
    let t = find(bp, DeviceType::Socket)
        .next()
        .ok_or("no vsock device")?;
    let sock = VirtIOSocket::<IdHal, _>::new(t).map_err(|_| "vsock init failed")?;
    Ok(VsockConnectionManager::new(sock))
}
