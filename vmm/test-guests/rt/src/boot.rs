//! The zero page (Linux `boot_params`) the VMM passes in RSI: command line and e820 map.

/// Offset of `e820_entries`.
const E820_ENTRIES: usize = 0x1e8;
/// Offset of `e820_table`.
const E820_TABLE: usize = 0x2d0;
/// Offset of `hdr.cmd_line_ptr`.
const CMD_LINE_PTR: usize = 0x228;
/// Offset of `hdr.cmdline_size`.
const CMDLINE_SIZE: usize = 0x238;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820 {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// Type (1 = RAM).
    pub kind: u32,
}

/// A view of the zero page.
#[derive(Clone, Copy)]
pub struct BootParams(*const u8);

impl BootParams {
    /// Wraps the pointer the VMM passed in RSI.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a 4 KiB zero page that stays mapped and unchanged.
    pub unsafe fn new(ptr: *const u8) -> Self {
        Self(ptr)
    }

    /// Reads a little-endian value at `offset`.
    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: `new`'s contract: the page is mapped; offsets used here lie inside it.
        unsafe { core::ptr::read_unaligned(self.0.add(offset).cast::<T>()) }
    }

    /// A byte of the zero page.
    pub fn byte(&self, offset: usize) -> u8 {
        self.read(offset)
    }

    /// A 16-bit field.
    pub fn u16_at(&self, offset: usize) -> u16 {
        self.read(offset)
    }

    /// A 32-bit field.
    pub fn u32_at(&self, offset: usize) -> u32 {
        self.read(offset)
    }

    /// The e820 entries.
    pub fn e820(&self) -> impl Iterator<Item = E820> + '_ {
        let n = usize::from(self.byte(E820_ENTRIES)).min(128);
        (0..n).map(move |i| {
            let at = E820_TABLE + i * 20;
            E820 {
                addr: self.read(at),
                size: self.read(at + 8),
                kind: self.read(at + 16),
            }
        })
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> &'static str {
        let ptr = self.u32_at(CMD_LINE_PTR) as usize as *const u8;
        let len = self.u32_at(CMDLINE_SIZE) as usize;
        if ptr.is_null() {
            return "";
        }
        // SAFETY: the VMM wrote `len` bytes of command line at `ptr`, identity-mapped RAM it
        // never changes afterwards.
        let bytes = unsafe { core::slice::from_raw_parts(ptr, len.min(2048)) };
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// The value of `key=value` on the command line.
    pub fn param(&self, key: &str) -> Option<&'static str> {
        self.cmdline()
            .split(' ')
            .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }
}
