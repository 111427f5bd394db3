//! Any byte string given to the NBD decoders (transmission request headers, client options,
//! and the option-haggling state machine fed a stream of options) yields a value, "need more
//! bytes" or an error: never a panic, never an allocation beyond the option data limit. What
//! decodes re-encodes to the same frame, and a request the server accepts lies inside the export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_nbd::codec::{
    decode_option, ClientOption, OptionHeader, RequestHeader, OPTION_DATA_BYTES_MAX, OPTION_HEADER_BYTES,
    REQUEST_HEADER_BYTES,
};
use tandem_nbd::handshake::{Features, Handshake, OptionData, Step};
use tandem_nbd::transmission::{classify, Request};
use tandem_nbd::{ExportInfo, REQUEST_BYTES_MAX};

fuzz_target!(|data: &[u8]| {
    let export =
        ExportInfo { size_bytes: 1 << 30, read_only: data.first().is_some_and(|b| b & 1 == 1), multi_conn: true };
    let features = Features {
        structured_replies: data.first().is_some_and(|b| b & 2 == 2),
        base_allocation: data.first().is_some_and(|b| b & 6 == 6),
    };

    if let Ok(header) = RequestHeader::decode(data) {
        let mut again = Vec::new();
        header.encode(&mut again);
        assert_eq!(&again[..], &data[..REQUEST_HEADER_BYTES]);
        match classify(&header, &export, features) {
            Ok(Request::Read { offset, length, .. }) | Ok(Request::Write { offset, length, .. }) => {
                assert!(length <= REQUEST_BYTES_MAX);
                assert!(offset + u64::from(length) <= export.size_bytes);
            }
            Ok(Request::BlockStatus { offset, length, .. }) => {
                assert!(features.base_allocation && length > 0);
                assert!(offset + u64::from(length) <= export.size_bytes);
            }
            Ok(Request::Trim { offset, length, .. }) | Ok(Request::WriteZeroes { offset, length, .. }) => {
                assert!(offset + u64::from(length) <= export.size_bytes);
            }
            Ok(Request::Flush) | Ok(Request::Disconnect) | Err(_) => {}
        }
    }

    if let Ok((option, used)) = decode_option(data) {
        assert!(used <= data.len() && used <= OPTION_HEADER_BYTES + OPTION_DATA_BYTES_MAX);
        let mut again = Vec::new();
        option.encode(&mut again);
        assert_eq!(decode_option(&again), Ok((option, again.len())));
    }
    for option in 0..12 {
        let _ = ClientOption::parse(option, data);
    }

    // The negotiation state machine, fed the bytes as a sequence of options.
    let mut handshake = Handshake::new();
    let mut rest = data;
    while let Ok(header) = OptionHeader::decode(rest) {
        let len = match handshake.on_option_header(header) {
            OptionData::Read(len) => len,
            OptionData::DrainThenTooBig(_) | OptionData::TooBigDisconnect(_) => break,
        };
        let Some(option_data) = rest.get(OPTION_HEADER_BYTES..OPTION_HEADER_BYTES + len) else { break };
        match handshake.on_option(header.option, option_data) {
            Step::Open(request) => {
                let _ = handshake.on_opened(request, Ok(export));
            }
            Step::Abort(_) | Step::Disconnect(_) => break,
            Step::Reply(_) | Step::List | Step::StartTls(_) => {}
        }
        rest = &rest[OPTION_HEADER_BYTES + len..];
    }
});
