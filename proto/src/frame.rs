//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes of one prost message.
//!
//! The decoder never trusts the length: a frame over [`MAX_FRAME_LEN`] is an error before any
//! buffer is reserved for it, and a truncated frame is "need more bytes", never a panic.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

/// The largest frame payload either side accepts (1 MiB).
///
/// Log records are split well below this; exec output is capped by the sender.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`] bytes.
    #[error("Frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced or actual payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid message of the expected type.
    #[error("Frame payload is not a valid message")]
    Decode(#[from] prost::DecodeError),
    /// The transport failed.
    #[error("Frame transport failed")]
    Io(#[from] std::io::Error),
}

/// Appends one frame holding `msg` to `dst`.
pub fn encode<M: Message>(msg: &M, dst: &mut BytesMut) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    dst.reserve(HEADER_LEN + len);
    // `len <= MAX_FRAME_LEN < u32::MAX`, so the cast is lossless.
    dst.put_u32(len as u32);
    // Cannot fail: capacity was reserved above.
    msg.encode(dst).map_err(|_| FrameError::TooLarge {
        len,
        max: MAX_FRAME_LEN,
    })?;
    Ok(())
}

/// Encodes `msg` as one frame in a fresh buffer.
pub fn encode_to_vec<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut buf = BytesMut::new();
    encode(msg, &mut buf)?;
    Ok(buf.to_vec())
}

/// Takes one complete frame off the front of `src` and decodes it.
///
/// Returns `Ok(None)` when `src` does not yet hold a whole frame (nothing is consumed), and an
/// error for an oversized or undecodable frame (the bad frame is consumed when complete, so a
/// caller that chooses to continue does not loop on it).
pub fn decode<M: Message + Default>(src: &mut BytesMut) -> Result<Option<M>, FrameError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if src.len() < HEADER_LEN + len {
        // Reserve only what the (bounded) frame still needs.
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let payload = src.split_to(len);
    Ok(Some(M::decode(payload.freeze())?))
}

/// A `tokio_util` codec that reads frames of `In` and writes frames of `Out`.
///
/// The agent uses `FrameCodec<GuestMessage, HostMessage>`, hearth-init the reverse.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    _marker: std::marker::PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec with the default frame limit.
    pub fn new() -> Self {
        Self {
            _marker: std::marker::PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        decode(src)
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode(&item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{GuestMessage, Hello, LogRecord, guest_message::Msg};
    use proptest::prelude::*;

    fn hello() -> GuestMessage {
        GuestMessage {
            msg: Some(Msg::Hello(Hello {
                protocol_version: crate::PROTOCOL_VERSION,
                init_version: "0.1.0".into(),
                instance_id: "web-1".into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = BytesMut::new();
        encode(&hello(), &mut buf).unwrap();
        encode(&hello(), &mut buf).unwrap();
        assert_eq!(decode::<GuestMessage>(&mut buf).unwrap(), Some(hello()));
        assert_eq!(decode::<GuestMessage>(&mut buf).unwrap(), Some(hello()));
        assert_eq!(decode::<GuestMessage>(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn truncated_frame_waits_for_more() {
        let whole = encode_to_vec(&hello()).unwrap();
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(
                decode::<GuestMessage>(&mut buf).unwrap(),
                None,
                "cut at {cut}"
            );
            assert_eq!(buf.len(), cut, "a partial frame must not be consumed");
        }
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3][..]);
        let err = decode::<GuestMessage>(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let big = GuestMessage {
            msg: Some(Msg::Log(LogRecord {
                data: vec![0; MAX_FRAME_LEN + 1],
                ..Default::default()
            })),
        };
        let mut buf = BytesMut::new();
        assert!(matches!(
            encode(&big, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn garbage_payload_is_an_error() {
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode::<GuestMessage>(&mut buf),
            Err(FrameError::Decode(_))
        ));
        assert!(buf.is_empty(), "a complete bad frame is consumed");
    }

    proptest! {
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&data[..]);
            // Drain until the decoder wants more bytes or fails.
            while let Ok(Some(_)) = decode::<GuestMessage>(&mut buf) {}
        }

        #[test]
        fn log_records_round_trip(seq in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..8192)) {
            let msg = GuestMessage { msg: Some(Msg::Log(LogRecord { seq, data, ..Default::default() })) };
            let mut buf = BytesMut::new();
            encode(&msg, &mut buf).unwrap();
            prop_assert_eq!(decode::<GuestMessage>(&mut buf).unwrap(), Some(msg));
        }
    }
}
