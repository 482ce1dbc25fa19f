//! Feeds arbitrary bytes to the frame decoder, as the agent reads them from a guest (and init
//! from the agent): whole, and in the chunks a socket might deliver. Truncated, oversized and
//! garbage frames must give `Ok(None)` or an error, never a panic, a hang or a big allocation.

#![no_main]

use bytes::BytesMut;
use hearth_proto::{
    frame::{self, MAX_FRAME_LEN},
    init::{GuestMessage, HostMessage},
};
use libfuzzer_sys::fuzz_target;

/// Decodes everything in `buf`, stopping at the first error or incomplete frame; checks that the
/// buffer never grows beyond one bounded frame.
fn drain<M: prost::Message + Default>(buf: &mut BytesMut) -> bool {
    loop {
        match frame::decode::<M>(buf) {
            Ok(Some(msg)) => {
                // What decodes must re-encode within the limit.
                let mut out = BytesMut::new();
                frame::encode(&msg, &mut out).expect("a decoded message re-encodes");
            }
            Ok(None) => {
                assert!(buf.capacity() <= 2 * (MAX_FRAME_LEN + frame::HEADER_LEN) + 4096);
                return true;
            }
            Err(_) => return false,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Whole input at once, both directions.
    drain::<GuestMessage>(&mut BytesMut::from(data));
    drain::<HostMessage>(&mut BytesMut::from(data));

    // The same bytes delivered in chunks whose sizes come from the input itself.
    let mut buf = BytesMut::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = (usize::from(data[i % data.len()]) % 64 + 1).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        i += 1;
        if !drain::<GuestMessage>(&mut buf) {
            break;
        }
    }
});
