//! Parsing a virtio-blk request from a descriptor chain: a 16-byte header the device reads, data
//! buffers, and a one-byte status the device writes. Everything the guest controls is checked
//! here (addresses inside guest memory, directions, sizes, sector range); a request that fails
//! gets an error status, never a panic.

use virtio_queue::{DescriptorChain, desc::split::Descriptor};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get the device id string.
pub const T_GET_ID: u32 = 8;
/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Length of the device id.
pub const ID_BYTES: usize = 20;
/// Largest data transfer of one request (a guest cannot make us pin more).
pub const MAX_DATA_LEN: u64 = 1 << 30;

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the device id.
    GetId,
    /// Anything else.
    Unsupported(u32),
}

/// A parsed, validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestType,
    /// First sector.
    pub sector: u64,
    /// Data buffers (guest address, length), each inside guest memory.
    pub data: Vec<(GuestAddress, u32)>,
    /// Total data length.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer than two descriptors.
    #[error("Descriptor chain too short")]
    TooShort,
    /// The chain could not be walked (loop, bad indirect table).
    #[error("Descriptor chain is malformed")]
    Malformed,
    /// The header is write-only, short or outside guest memory.
    #[error("Request header is invalid")]
    BadHeader,
    /// The status descriptor is read-only, empty or outside guest memory.
    #[error("Status descriptor is invalid")]
    BadStatus,
    /// A data buffer points outside guest memory or has the wrong direction.
    #[error("Data descriptor is invalid")]
    BadData,
    /// The transfer is not a whole number of sectors or too long.
    #[error("Transfer length {0} is invalid")]
    BadLength(u64),
    /// The transfer reaches beyond the disk.
    #[error("Sectors {sector}+{count} lie beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors requested.
        count: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("Write to a read-only disk")]
    ReadOnly,
}

/// The outcome of parsing: a request, or an error with the status address if one was usable.
pub type Parsed = Result<Request, (RequestError, Option<GuestAddress>)>;

fn in_memory<M: GuestMemoryBackend>(mem: &M, d: &Descriptor) -> bool {
    d.len() > 0 && mem.get_slice(d.addr(), d.len() as usize).is_ok()
}

/// Parses and validates a request for a disk of `capacity` sectors.
pub fn parse<M, D>(chain: DescriptorChain<D>, mem: &M, capacity: u64, read_only: bool) -> Parsed
where
    M: GuestMemoryBackend,
    D: std::ops::Deref<Target = M> + Clone,
{
    // The iterator stops at loops (its TTL) and bad indirect tables; cap the length too.
    let descs: Vec<Descriptor> = chain.take(1024).collect();
    let (Some(first), Some(last)) = (descs.first(), descs.last()) else {
        return Err((RequestError::Malformed, None));
    };
    let status = (last.is_write_only() && in_memory(mem, last)).then(|| last.addr());
    if descs.len() < 2 {
        return Err((RequestError::TooShort, status));
    }
    let Some(status) = status else {
        return Err((RequestError::BadStatus, None));
    };
    if first.is_write_only() || first.len() < 16 || !in_memory(mem, first) {
        return Err((RequestError::BadHeader, Some(status)));
    }
    let kind_raw: u32 = mem
        .read_obj(first.addr())
        .map_err(|_| (RequestError::BadHeader, Some(status)))?;
    let sector: u64 = mem
        .read_obj(first.addr().unchecked_add(8))
        .map_err(|_| (RequestError::BadHeader, Some(status)))?;
    let kind = match u32::from_le(kind_raw) {
        T_IN => RequestType::In,
        T_OUT => RequestType::Out,
        T_FLUSH => RequestType::Flush,
        T_GET_ID => RequestType::GetId,
        other => RequestType::Unsupported(other),
    };
    let sector = u64::from_le(sector);

    let device_writes = matches!(kind, RequestType::In | RequestType::GetId);
    let mut data = Vec::with_capacity(descs.len() - 2);
    let mut data_len = 0u64;
    for d in &descs[1..descs.len() - 1] {
        if d.is_write_only() != device_writes || !in_memory(mem, d) {
            return Err((RequestError::BadData, Some(status)));
        }
        data_len += u64::from(d.len());
        data.push((d.addr(), d.len()));
    }

    match kind {
        RequestType::In | RequestType::Out => {
            if kind == RequestType::Out && read_only {
                return Err((RequestError::ReadOnly, Some(status)));
            }
            if data_len == 0 || !data_len.is_multiple_of(SECTOR_SIZE) || data_len > MAX_DATA_LEN {
                return Err((RequestError::BadLength(data_len), Some(status)));
            }
            let count = data_len / SECTOR_SIZE;
            if sector.checked_add(count).is_none_or(|end| end > capacity) {
                return Err((
                    RequestError::OutOfRange {
                        sector,
                        count,
                        capacity,
                    },
                    Some(status),
                ));
            }
        }
        RequestType::GetId if data_len == 0 => {
            return Err((RequestError::BadLength(0), Some(status)));
        }
        _ => {}
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as VIRTQ_DESC_F_WRITE;
    use virtio_queue::{
        desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VIRTQ_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn run(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)], read_only: bool) -> Parsed {
        let q = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|(a, l, f)| RawDescriptor::from(SplitDescriptor::new(*a, *l, *f, 0)))
            .collect();
        let chain = q.build_desc_chain(&raw).unwrap();
        parse(chain, mem, 8, read_only)
    }

    #[test]
    fn read_request() {
        let m = mem();
        header(&m, 0x1_0000, T_IN, 2);
        let r = run(
            &m,
            &[(0x1_0000, 16, 0), (0x2_0000, 1024, W), (0x3_0000, 1, W)],
            false,
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(
            (r.sector, r.data_len, r.status),
            (2, 1024, GuestAddress(0x3_0000))
        );
    }

    #[test]
    fn bad_chains_get_errors_not_panics() {
        let m = mem();
        header(&m, 0x1_0000, T_IN, 0);
        // Data buffer outside guest memory: error, status still usable.
        let e = run(
            &m,
            &[(0x1_0000, 16, 0), (0x10_0000 - 8, 512, W), (0x3_0000, 1, W)],
            false,
        );
        assert_eq!(
            e,
            Err((RequestError::BadData, Some(GuestAddress(0x3_0000))))
        );
        // Status outside guest memory: no status.
        let e = run(
            &m,
            &[(0x1_0000, 16, 0), (0x2_0000, 512, W), (0xffff_0000, 1, W)],
            false,
        );
        assert_eq!(e, Err((RequestError::BadStatus, None)));
        // Header outside memory.
        let e = run(&m, &[(0x20_0000, 16, 0), (0x3_0000, 1, W)], false);
        assert_eq!(e.unwrap_err().0, RequestError::BadHeader);
        // Read-only status.
        let e = run(&m, &[(0x1_0000, 16, 0), (0x3_0000, 1, 0)], false);
        assert_eq!(e, Err((RequestError::BadStatus, None)));
        // Single descriptor.
        let e = run(&m, &[(0x3_0000, 1, W)], false);
        assert_eq!(e.unwrap_err().0, RequestError::TooShort);
        // Beyond the end of the disk (8 sectors).
        header(&m, 0x1_0000, T_IN, 7);
        let e = run(
            &m,
            &[(0x1_0000, 16, 0), (0x2_0000, 1024, W), (0x3_0000, 1, W)],
            false,
        );
        assert!(matches!(e.unwrap_err().0, RequestError::OutOfRange { .. }));
        // Sector overflow.
        header(&m, 0x1_0000, T_IN, u64::MAX);
        let e = run(
            &m,
            &[(0x1_0000, 16, 0), (0x2_0000, 512, W), (0x3_0000, 1, W)],
            false,
        );
        assert!(matches!(e.unwrap_err().0, RequestError::OutOfRange { .. }));
        // Partial sector.
        header(&m, 0x1_0000, T_IN, 0);
        let e = run(
            &m,
            &[(0x1_0000, 16, 0), (0x2_0000, 100, W), (0x3_0000, 1, W)],
            false,
        );
        assert_eq!(e.unwrap_err().0, RequestError::BadLength(100));
        // Write to a read-only disk; write with a device-writable buffer.
        header(&m, 0x1_0000, T_OUT, 0);
        let e = run(
            &m,
            &[(0x1_0000, 16, 0), (0x2_0000, 512, 0), (0x3_0000, 1, W)],
            true,
        );
        assert_eq!(e.unwrap_err().0, RequestError::ReadOnly);
        let e = run(
            &m,
            &[(0x1_0000, 16, 0), (0x2_0000, 512, W), (0x3_0000, 1, W)],
            false,
        );
        assert_eq!(e.unwrap_err().0, RequestError::BadData);
    }

    #[test]
    fn other_types() {
        let m = mem();
        header(&m, 0x1_0000, T_FLUSH, 0);
        let r = run(&m, &[(0x1_0000, 16, 0), (0x3_0000, 1, W)], true).unwrap();
        assert_eq!(r.kind, RequestType::Flush);
        header(&m, 0x1_0000, 77, 0);
        let r = run(&m, &[(0x1_0000, 16, 0), (0x3_0000, 1, W)], true).unwrap();
        assert_eq!(r.kind, RequestType::Unsupported(77));
        header(&m, 0x1_0000, T_GET_ID, 0);
        let r = run(
            &m,
            &[(0x1_0000, 16, 0), (0x2_0000, 20, W), (0x3_0000, 1, W)],
            true,
        )
        .unwrap();
        assert_eq!((r.kind, r.data_len), (RequestType::GetId, 20));
    }
}
