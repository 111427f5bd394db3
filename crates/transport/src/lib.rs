//! Node-to-node messaging: mutual-TLS links between peers, each carrying the logical channels
//! of [`Channel`], with request/response semantics.
//!
//! - [`tls`]: the cluster CA, node certificates (generation with rcgen, loading from PEM), and
//!   rustls configurations that refuse any peer whose certificate the CA did not sign.
//! - [`tcp`]: the TCP + rustls implementation of [`Transport`].
//!
//! The crate moves opaque payloads; it never interprets them (that is `meta`'s and the data
//! plane's job), and it never retries a request on its own: a request either gets its response
//! or an error, and the caller decides.

pub mod tcp;
pub mod tls;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
pub use tandem_types::Channel;
use tandem_types::NodeId;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// No connection could be made, or the link broke before the response came back.
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
    fn call(
        &self,
        peer: NodeId,
        channel: Channel,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, TransportError>>;

    /// Records (or changes) the address of a peer. Later calls use it.
    fn set_peer_addr(&self, peer: NodeId, addr: std::net::SocketAddr);
}

/// The server side: what a node does with a request that arrived from an authenticated peer.
/// An `Err` travels back to the caller as [`TransportError::Remote`].
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        from: NodeId,
        channel: Channel,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, String>>;
}
