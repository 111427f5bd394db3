//! Message payloads: bincode 2 in serde mode, bounded. This module is the only user of bincode
//! in the workspace.

use serde::{de::DeserializeOwned, Serialize};
use tandem_types::{FRAME_BYTES_MAX, SNAPSHOT_BYTES_MAX, SNAPSHOT_DECODE_BYTES_MAX};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("cannot decode message: {0}")]
    Decode(String),
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<FRAME_BYTES_MAX>,
> {
    bincode::config::standard().with_big_endian().with_limit::<FRAME_BYTES_MAX>()
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(msg, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes one message that must fill `bytes` exactly. The allocation limit keeps a hostile
/// length field inside the message from reserving more than a frame's worth of memory.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (msg, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(msg)
}

/// Decodes a metadata snapshot: the whole cluster map, which may be far larger than a frame
/// (it travels in chunks and is decoded once whole). Bounded like [`decode`], with the
/// snapshot limits: at most [`SNAPSHOT_BYTES_MAX`] of input, at most
/// [`SNAPSHOT_DECODE_BYTES_MAX`] claimed for allocations.
pub fn decode_snapshot<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > SNAPSHOT_BYTES_MAX {
        return Err(CodecError::Decode(format!(
            "a snapshot of {} bytes exceeds the limit of {SNAPSHOT_BYTES_MAX} bytes",
            bytes.len()
        )));
    }
    let config = bincode::config::standard().with_big_endian().with_limit::<SNAPSHOT_DECODE_BYTES_MAX>();
    let (msg, used) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Msg {
        A { id: u64, name: String },
        B(Vec<u8>),
        C,
    }

    proptest! {
        #[test]
        fn round_trip(id in any::<u64>(), name in ".{0,40}", data in proptest::collection::vec(any::<u8>(), 0..300)) {
            for m in [Msg::A { id, name: name.clone() }, Msg::B(data.clone()), Msg::C] {
                let bytes = encode(&m).expect("encodes");
                prop_assert_eq!(decode::<Msg>(&bytes).expect("decodes"), m);
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Msg>(&bytes);
        }
    }

    #[test]
    fn huge_length_claims_do_not_allocate() {
        // Variant 1 (B) followed by a varint length of u64::MAX.
        let bytes = [1u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode::<Msg>(&bytes).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&Msg::C).expect("encodes");
        bytes.push(0);
        assert!(matches!(decode::<Msg>(&bytes), Err(CodecError::Trailing(1))));
    }
}
