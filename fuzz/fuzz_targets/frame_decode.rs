//! Any byte string given to the frame decoder yields a frame, "need more bytes", or an error:
//! never a panic, never an allocation beyond the frame limit. A decoded frame re-encodes to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_wire::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = Frame::decode(data) {
        assert_eq!(&frame.encode()[..], &data[..used]);
    }
    if data.len() >= 4 {
        let _ = Frame::decode_len([data[0], data[1], data[2], data[3]]);
    }
    let _ = Frame::decode_body(bytes::Bytes::copy_from_slice(data));
});
