//! [`Network`]: what the data plane needs from the node-to-node network, and nothing more.
//! A real node passes `tandem_transport::link::Mesh` (`mesh.rs`); tests pass an in-memory one,
//! so the driver can be tested without sockets.
//!
//! Two kinds of traffic: requests with a reply (`Open`, `Acks`, chunk copies, proxied host
//! I/O, ...) on a [`Channel`], and *records*: a one-sided, ordered stream of sequenced writes
//! from a primary to each member ([`RecordLink`]), delivered on the receiving node in arrival
//! order per sender ([`Network::next_record`]).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tandem_transport::{BoxFuture, Handler, TransportError};
use tandem_types::Channel;
use tandem_types::NodeId;

/// The node-to-node network as the data plane uses it.
pub trait Network: Send + Sync + 'static {
    /// Sends a request to `peer` on `channel` and waits for its reply. Requests sent one after
    /// another on a channel are delivered in that order. Dropping the future before the reply
    /// came withdraws the request: if it has not gone out it never will, and if it has, the
    /// peer does not start it (or cancels it while it runs).
    fn call(&self, peer: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>>;

    /// Makes `handler` answer the requests that arrive on `channel`.
    fn serve(&self, channel: Channel, handler: Arc<dyn Handler>);

    /// Inside a [`Handler`] call: when this node received the request (before it waited for
    /// a handler slot). `None` outside a handler.
    fn request_received_at(&self) -> Option<Instant>;

    /// Lets `peer` send records to this node (it has room for them here). Doing it again for
    /// the same peer changes nothing.
    fn accept_records_from(&self, peer: NodeId) -> Result<(), String>;

    /// The next record another node sent here, with its sender: in the order each sender
    /// posted them. Taking a record gives its room back to the sender (its [`RecordLink`]
    /// reports it delivered). `None` once the network is gone.
    fn next_record(&self) -> BoxFuture<'_, Option<(NodeId, Vec<u8>)>>;

    /// A one-sided, ordered stream of records to `peer`.
    fn record_link(&self, peer: NodeId) -> Arc<dyn RecordLink>;
}

/// Records to one peer. Bounded: [`RecordLink::post`] waits while the peer has no room (it
/// has not taken earlier records out yet) or too many records are in flight.
pub trait RecordLink: Send + Sync + 'static {
    /// Queues `record`; returns once it has its place in the stream. An error means the link
    /// is closed for good.
    fn post(&self, record: Bytes) -> BoxFuture<'_, Result<(), TransportError>>;

    /// The outcome of the oldest posted record whose outcome was not reported yet: `Ok` once
    /// the peer took it, an error if it was not delivered. `None` once the link is closed.
    fn next_outcome(&self) -> BoxFuture<'_, Option<Result<(), TransportError>>>;
}
