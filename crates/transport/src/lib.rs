//! Node-to-node messaging: mutual-TLS links between peers over QUIC or TCP, each carrying the
//! logical channels of [`Channel`], with request/response semantics, exactly-once in-order
//! delivery per channel, live switching between the two network layers, and one-sided region
//! writes through descriptor rings (an emulated RDMA WRITE).
//!
//! - [`tls`]: the cluster CA, node certificates, and rustls configurations that refuse any peer
//!   whose certificate the CA did not sign or that claims another node's id.
//! - [`pipe`]: frames over one ordered byte stream (a TCP connection or a QUIC stream).
//! - [`tcp`], [`quic`]: how each network layer dials and accepts pipes. Nothing else differs.
//! - [`link`]: [`link::Mesh`], the [`Transport`]: per peer and channel a sequenced, windowed
//!   link that sends over whichever layer is selected and moves between layers
//!   make-before-break; on the receiving side, reordering, deduplication and dispatch.
//! - [`ring`]: registered memory regions, descriptor rings and their completion queues.
//!
//! The crate moves opaque payloads; it never interprets them.

pub mod link;
pub mod pipe;
pub mod quic;
pub mod ring;
pub mod tcp;
pub mod tls;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
// `Channel`, `Layer` and `TransportKind` live in `tandem_types`: the cluster map names them too,
// without depending on the transport.
use tandem_types::{Channel, NodeId};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// No connection could be made on any layer, or every connection broke before the reply.
    #[error("peer {peer} unreachable: {reason}")]
    Unreachable { peer: NodeId, reason: String },
    /// No address is known for the peer.
    #[error("no address known for peer {0}")]
    UnknownPeer(NodeId),
    /// The peer received the request and its handler failed.
    #[error("peer {peer} failed the request: {reason}")]
    Remote { peer: NodeId, reason: String },
    #[error("transport is shut down")]
    Closed,
}

/// The client side: send a request to a peer on a channel and wait for its response.
/// Implementations connect lazily, share one link per peer among all callers, and reconnect
/// with capped exponential backoff after a failure.
pub trait Transport: Send + Sync + 'static {
    fn call(&self, peer: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>>;

    /// Records (or changes) the address of a peer. Later calls use it.
    fn set_peer_addr(&self, peer: NodeId, addr: std::net::SocketAddr);
}

/// The server side: what a node does with a request that arrived from an authenticated peer.
/// An `Err` travels back to the caller as [`TransportError::Remote`].
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, from: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>>;
}
