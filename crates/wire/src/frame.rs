//! Frames: `len: u32 | version: u8 | kind: u8 | channel: u8 | session: u64 | seq: u64 |
//! ack: u64 | payload` (integers big-endian).
//!
//! `session`, `seq` and `ack` belong to the link layer above (transport's `link.rs`): a sender
//! numbers the messages of each channel within a session, so that a receiver can deliver each
//! exactly once and in order even when a link moves from one connection to another; `ack` is
//! the lowest sequence number the sender still waits on (replies below it may be forgotten).
//! Framing gives them no meaning.
//!
//! `len` counts everything after itself. It is checked against [`FRAME_BYTES_MAX`] before any
//! buffer is sized from it, so a hostile length costs the reader nothing.

use bytes::{BufMut, Bytes, BytesMut};
use tandem_types::{Channel, FRAME_BYTES_MAX};

/// Bumped on any incompatible change of the frame layout; a peer speaking another version is
/// refused at the first frame.
/// Version 2: the server's hello answers the client's, and `Ping`/`Pong` exist.
pub const FRAME_VERSION: u8 = 2;

/// Bytes after the length prefix and before the payload.
pub const FRAME_HEADER_BYTES: usize = 1 + 1 + 1 + 8 + 8 + 8;

/// Bytes of the length prefix.
pub const FRAME_LEN_BYTES: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// First frame on a connection or stream: the payload is the sender's node id (8 bytes).
    Hello,
    /// A request that expects exactly one `Response` or `Error` with the same seq.
    Request,
    Response,
    /// The request failed on the far side; the payload is a UTF-8 message.
    Error,
    /// A one-sided write into a memory region the receiver registered: the payload is
    /// `region: u64 | offset: u64 | bytes`. Answered like a request.
    RegionWrite,
    /// The sender's caller gave up on request `seq` of `session` after it was sent: the
    /// receiver does not start it, cancels it if it runs, and answers it with an `Error`.
    /// Empty payload; not itself answered.
    Cancel,
    /// Is this pipe still carrying anything? The receiver answers `Pong` on the same pipe at
    /// once, outside the sequence (session, seq and ack are 0). Empty payload.
    Ping,
    /// The answer to a `Ping`. Empty payload.
    Pong,
}

impl FrameKind {
    fn as_u8(self) -> u8 {
        match self {
            FrameKind::Hello => 0,
            FrameKind::Request => 1,
            FrameKind::Response => 2,
            FrameKind::Error => 3,
            FrameKind::RegionWrite => 4,
            FrameKind::Cancel => 5,
            FrameKind::Ping => 6,
            FrameKind::Pong => 7,
        }
    }

    fn from_u8(v: u8) -> Option<FrameKind> {
        match v {
            0 => Some(FrameKind::Hello),
            1 => Some(FrameKind::Request),
            2 => Some(FrameKind::Response),
            3 => Some(FrameKind::Error),
            4 => Some(FrameKind::RegionWrite),
            5 => Some(FrameKind::Cancel),
            6 => Some(FrameKind::Ping),
            7 => Some(FrameKind::Pong),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub channel: Channel,
    pub session: u64,
    pub seq: u64,
    pub ack: u64,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {FRAME_BYTES_MAX} bytes")]
    TooLarge(usize),
    #[error("frame of {0} bytes is shorter than its {FRAME_HEADER_BYTES}-byte header")]
    TooShort(usize),
    #[error("unsupported frame version {0} (this node speaks {FRAME_VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("unknown channel {0}")]
    Channel(u8),
}

fn u64_at(body: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&body[at..at + 8]);
    u64::from_be_bytes(v)
}

impl Frame {
    pub fn new(
        kind: FrameKind,
        channel: Channel,
        session: u64,
        seq: u64,
        ack: u64,
        payload: impl Into<Bytes>,
    ) -> Frame {
        Frame { kind, channel, session, seq, ack, payload: payload.into() }
    }

    /// The value of the length prefix for this frame.
    pub fn body_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload.len()
    }

    /// Encodes the frame. Panics if the payload breaks the frame limit: callers size payloads
    /// below it, so an oversized one is a bug on this side, not bad input.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(FRAME_LEN_BYTES + self.body_len());
        self.encode_into(&mut out);
        out.freeze()
    }

    pub fn encode_into(&self, out: &mut BytesMut) {
        self.encode_header_into(out);
        out.put_slice(&self.payload);
    }

    /// Writes the length prefix and header only; the payload follows separately (so large
    /// payloads can be written without being copied into one buffer).
    pub fn encode_header_into(&self, out: &mut BytesMut) {
        let len = self.body_len();
        assert!(len <= FRAME_BYTES_MAX, "frame of {len} bytes built above FRAME_BYTES_MAX");
        out.reserve(FRAME_LEN_BYTES + FRAME_HEADER_BYTES);
        out.put_u32(len as u32);
        out.put_u8(FRAME_VERSION);
        out.put_u8(self.kind.as_u8());
        out.put_u8(self.channel.as_u8());
        out.put_u64(self.session);
        out.put_u64(self.seq);
        out.put_u64(self.ack);
    }

    /// Reads and validates a length prefix. Returns the number of bytes that follow it.
    pub fn decode_len(prefix: [u8; FRAME_LEN_BYTES]) -> Result<usize, FrameError> {
        let len = u32::from_be_bytes(prefix) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(FrameError::TooLarge(len));
        }
        if len < FRAME_HEADER_BYTES {
            return Err(FrameError::TooShort(len));
        }
        Ok(len)
    }

    /// Decodes the bytes that follow a length prefix (exactly `len` of them).
    pub fn decode_body(body: Bytes) -> Result<Frame, FrameError> {
        if body.len() > FRAME_BYTES_MAX {
            return Err(FrameError::TooLarge(body.len()));
        }
        if body.len() < FRAME_HEADER_BYTES {
            return Err(FrameError::TooShort(body.len()));
        }
        if body[0] != FRAME_VERSION {
            return Err(FrameError::Version(body[0]));
        }
        let kind = FrameKind::from_u8(body[1]).ok_or(FrameError::Kind(body[1]))?;
        let channel = Channel::from_u8(body[2]).ok_or(FrameError::Channel(body[2]))?;
        Ok(Frame {
            kind,
            channel,
            session: u64_at(&body, 3),
            seq: u64_at(&body, 11),
            ack: u64_at(&body, 19),
            payload: body.slice(FRAME_HEADER_BYTES..),
        })
    }

    /// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed;
    /// `Ok(Some((frame, used)))` consumed `used` bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < FRAME_LEN_BYTES {
            return Ok(None);
        }
        let len = Frame::decode_len([buf[0], buf[1], buf[2], buf[3]])?;
        let Some(body) = buf.get(FRAME_LEN_BYTES..FRAME_LEN_BYTES + len) else {
            return Ok(None);
        };
        let frame = Frame::decode_body(Bytes::copy_from_slice(body))?;
        Ok(Some((frame, FRAME_LEN_BYTES + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn channel() -> impl Strategy<Value = Channel> {
        (0u8..4).prop_map(|v| Channel::from_u8(v).expect("in range"))
    }

    fn kind() -> impl Strategy<Value = FrameKind> {
        (0u8..8).prop_map(|v| FrameKind::from_u8(v).expect("in range"))
    }

    proptest! {
        #[test]
        fn round_trip(kind in kind(), channel in channel(), session in any::<u64>(), seq in any::<u64>(),
                      ack in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let frame = Frame::new(kind, channel, session, seq, ack, payload);
            let bytes = frame.encode();
            let (back, used) = Frame::decode(&bytes).expect("valid").expect("complete");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&back, &frame);
            // Every strict prefix is incomplete, never an error.
            for cut in [0, 1, 3, 4, bytes.len() / 2, bytes.len() - 1] {
                prop_assert_eq!(Frame::decode(&bytes[..cut]), Ok(None));
            }
            // Header and payload written apart give the same bytes.
            let mut split = BytesMut::new();
            frame.encode_header_into(&mut split);
            split.put_slice(&frame.payload);
            prop_assert_eq!(&split[..], &bytes[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Frame::decode(&bytes);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let prefix = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        assert_eq!(Frame::decode_len(prefix), Err(FrameError::TooLarge(FRAME_BYTES_MAX + 1)));
        assert_eq!(Frame::decode(&u32::MAX.to_be_bytes()), Err(FrameError::TooLarge(u32::MAX as usize)));
    }

    #[test]
    fn bad_header_fields_are_errors() {
        let good = Frame::new(FrameKind::Request, Channel::Bulk, 1, 7, 0, vec![1, 2, 3]).encode();
        let mut v = good.to_vec();
        v[4] = 9;
        assert_eq!(Frame::decode(&v), Err(FrameError::Version(9)));
        let mut v = good.to_vec();
        v[5] = 200;
        assert_eq!(Frame::decode(&v), Err(FrameError::Kind(200)));
        let mut v = good.to_vec();
        v[6] = 4;
        assert_eq!(Frame::decode(&v), Err(FrameError::Channel(4)));
        assert_eq!(Frame::decode(&[0, 0, 0, 2, 1, 1]), Err(FrameError::TooShort(2)));
    }
}
