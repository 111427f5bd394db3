//! The bytes Tandem puts on the network between nodes.
//!
//! Two layers, kept apart:
//! - [`frame`]: length-prefixed, versioned frames. Framing knows nothing of what a payload means.
//! - [`data`]: the data plane's messages (replication records, resync, proxied host I/O).
//! - [`codec`]: the one place where messages are turned into payload bytes (bincode 2, serde
//!   mode). No other crate calls bincode, so the encoding can be swapped here alone.
//!
//! Every decoder here returns an error on bad input; none panics, and none allocates more than
//! [`tandem_types::FRAME_BYTES_MAX`] whatever the input claims.

pub mod codec;
pub mod data;
pub mod frame;

pub use codec::{decode, decode_snapshot, encode, CodecError};
pub use frame::{Frame, FrameError, FrameKind, FRAME_HEADER_BYTES, FRAME_LEN_BYTES, FRAME_VERSION};
