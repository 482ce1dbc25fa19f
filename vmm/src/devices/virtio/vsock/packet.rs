//! The virtio-vsock packet header (44 bytes, little endian) and reading a guest TX packet out
//! of a descriptor chain. A guest controls every byte here: lengths are checked against the
//! chain and a payload limit, and a bad packet is an error value, never a panic.

use std::io::Read as _;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

/// Header length.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted from the guest in one packet (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type supported.
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Reset.
    pub const RST: u16 = 3;
    /// Shutdown (flags: 1 = no more receives, 2 = no more sends).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Shutdown flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl Header {
    /// Decodes the first [`HDR_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..HDR_LEN)?;
        Some(Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a TX chain is not a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// A descriptor points outside guest memory.
    #[error("Packet descriptor lies outside guest memory")]
    Memory,
    /// Fewer than 44 readable bytes.
    #[error("Packet shorter than its header")]
    Short,
    /// `len` is over the limit or beyond the chain.
    #[error("Packet payload length {0} is invalid")]
    Length(u32),
}

/// A packet from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// The header.
    pub hdr: Header,
    /// The payload (`hdr.len` bytes; empty for control packets).
    pub payload: Vec<u8>,
}

/// Reads a packet from a TX descriptor chain.
pub fn read_tx<M, D>(chain: DescriptorChain<D>, mem: &M) -> Result<TxPacket, PacketError>
where
    M: GuestMemoryBackend,
    D: std::ops::Deref<Target = M> + Clone,
{
    let mut r = chain.reader(mem).map_err(|_| PacketError::Memory)?;
    let mut raw = [0u8; HDR_LEN];
    r.read_exact(&mut raw).map_err(|_| PacketError::Short)?;
    let hdr = Header::parse(&raw).ok_or(PacketError::Short)?;
    let payload = if hdr.op == op::RW {
        if hdr.len > MAX_PAYLOAD || hdr.len as usize > r.available_bytes() {
            return Err(PacketError::Length(hdr.len));
        }
        let mut p = vec![0u8; hdr.len as usize];
        r.read_exact(&mut p)
            .map_err(|_| PacketError::Length(hdr.len))?;
        p
    } else {
        Vec::new()
    };
    Ok(TxPacket { hdr, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::{
        desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    proptest! {
        #[test]
        fn header_round_trips(src in any::<u64>(), dst in any::<u64>(), sp in any::<u32>(), dp in any::<u32>(),
                              len in any::<u32>(), op in any::<u16>(), flags in any::<u32>(), ba in any::<u32>(), fc in any::<u32>()) {
            let h = Header { src_cid: src, dst_cid: dst, src_port: sp, dst_port: dp, len, type_: 1, op, flags, buf_alloc: ba, fwd_cnt: fc };
            prop_assert_eq!(Header::parse(&h.to_bytes()), Some(h));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = Header::parse(&bytes);
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn chain_result(
        m: &GuestMemoryMmap,
        hdr: Header,
        descs: &[(u64, u32)],
    ) -> Result<TxPacket, PacketError> {
        m.write_slice(&hdr.to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        let q = MockSplitQueue::new(m, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|(a, l)| RawDescriptor::from(SplitDescriptor::new(*a, *l, 0, 0)))
            .collect();
        read_tx(q.build_desc_chain(&raw).unwrap(), m)
    }

    #[test]
    fn reads_header_and_payload_across_descriptors() {
        let m = mem();
        m.write_slice(b"hello", GuestAddress(0x2_0000)).unwrap();
        let hdr = Header {
            op: op::RW,
            len: 5,
            type_: TYPE_STREAM,
            ..Default::default()
        };
        let p = chain_result(&m, hdr, &[(0x1_0000, 44), (0x2_0000, 5)]).unwrap();
        assert_eq!(p.payload, b"hello");
    }

    #[test]
    fn bad_packets_are_errors() {
        let m = mem();
        let hdr = Header {
            op: op::RW,
            len: 100,
            ..Default::default()
        };
        assert_eq!(
            chain_result(&m, hdr, &[(0x1_0000, 44), (0x2_0000, 5)]),
            Err(PacketError::Length(100))
        );
        let hdr = Header {
            op: op::RW,
            len: MAX_PAYLOAD + 1,
            ..Default::default()
        };
        assert!(chain_result(&m, hdr, &[(0x1_0000, 44), (0x2_0000, 0x2_0000)]).is_err());
        assert_eq!(
            chain_result(&m, Header::default(), &[(0x1_0000, 20)]),
            Err(PacketError::Short)
        );
        assert_eq!(
            chain_result(&m, Header::default(), &[(0xfff_0000, 44)]),
            Err(PacketError::Memory)
        );
    }
}
