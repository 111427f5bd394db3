//! The exactly-once window of a transport link, without I/O: plain state machines that the
//! transport's link (`tandem_transport::link`) drives with what it reads and writes. No tokio,
//! no sockets, no clock; everything here is unit- and property-tested in memory.
//!
//! A link carries the requests of one (peer, channel) in a *session*: numbered 1, 2, 3, ...
//! over whichever pipes (connections) happen to be up. A pipe may die with requests on it;
//! they are sent again, with the same numbers, on the next pipe, so the receiver sees
//! duplicates and, across pipes, requests out of order.
//!
//! - [`send`]: [`SendWindow`], the sender's half: numbering, the window of [`WINDOW_SEQS`]
//!   numbers past the oldest unanswered request and [`CHANNEL_BYTES_MAX`] bytes, which
//!   requests still have to go out (first sends and resends), cancels, and a new session when
//!   the peer cannot be reached.
//! - [`receive`]: [`ReceiveWindow`], the receiver's half: the reorder buffer, in-order
//!   delivery, duplicate detection, and the reply cache that answers a resent request again
//!   without running it twice.
//!
//! Together they deliver every request exactly once, in order, while a session lasts
//! (`tests/exactly_once.rs` checks it under duplicates, reordering and resends).
//!
//! Architecture invariant: this crate depends on `tandem-types` only.

pub mod receive;
pub mod send;

pub use receive::{Arrival, ReceiveWindow, ReplySlot, WindowError};
pub use send::{Answer, SendWindow};

use tandem_types::FRAME_BYTES_MAX;

/// Sequence numbers a link may have outstanding past its oldest unanswered request; also the
/// bound of the receiver's reorder buffer and reply cache.
pub const WINDOW_SEQS: u64 = 256;
/// Payload bytes a link may have outstanding (a single larger message still goes alone).
pub const CHANNEL_BYTES_MAX: usize = 64 * 1024 * 1024;

// The byte window holds several frames of the largest size, so ordinary traffic is bounded by
// the window and not by the exception for one oversized message.
const _: () = assert!(CHANNEL_BYTES_MAX >= 2 * FRAME_BYTES_MAX);
// The window must leave room for more than one request, or a link would be stop-and-wait.
const _: () = assert!(WINDOW_SEQS >= 2);
