//! A bump allocator over a static array: guests allocate a little at start and never free.

use core::{
    alloc::{GlobalAlloc, Layout},
    cell::UnsafeCell,
    sync::atomic::{AtomicUsize, Ordering},
};

/// Heap size.
pub const HEAP_SIZE: usize = 512 << 10;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; HEAP_SIZE]>);

// SAFETY: guests run one vCPU; allocations hand out disjoint ranges via an atomic cursor.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; HEAP_SIZE]));
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Hands out memory from [`ARENA`]; `dealloc` is a no-op.
pub struct Bump;

/// Allocates `size` bytes aligned to `align` (None when the arena is exhausted). The memory is
/// zero (fresh .bss, never reused).
pub fn alloc_zeroed(size: usize, align: usize) -> Option<*mut u8> {
    let base = ARENA.0.get() as usize;
    let mut cur = NEXT.load(Ordering::Relaxed);
    loop {
        let start = (base + cur).next_multiple_of(align) - base;
        let end = start.checked_add(size)?;
        if end > HEAP_SIZE {
            return None;
        }
        match NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some((base + start) as *mut u8),
            Err(now) => cur = now,
        }
    }
}

// SAFETY: returns disjoint, suitably aligned ranges of a static array, or null.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        alloc_zeroed(layout.size(), layout.align()).unwrap_or(core::ptr::null_mut())
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static GLOBAL: Bump = Bump;
