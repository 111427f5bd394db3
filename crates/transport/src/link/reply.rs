//! [`PendingReply`]: a caller's handle on the reply to one queued request; dropping it
//! unanswered withdraws or cancels the request.

use std::sync::Weak;

use bytes::Bytes;
use tandem_types::NodeId;
use tokio::sync::oneshot;

use super::send::ChannelLink;
use crate::TransportError;

/// The reply to a request that has been queued on a link. Dropping it before the reply came
/// withdraws the request: if it has not gone out it never will (an empty payload takes its
/// number), and if it has, a `Cancel` frame follows it, ahead of anything sent later on the
/// link, so the receiver does not start it or cancels it while it runs.
pub struct PendingReply {
    pub(super) peer: NodeId,
    pub(super) rx: oneshot::Receiver<Result<Bytes, TransportError>>,
    /// The request, to cancel if this is dropped unanswered (requests only).
    pub(super) cancel: Option<(Weak<ChannelLink>, u64, u64)>,
}

impl PendingReply {
    pub async fn wait(mut self) -> Result<Bytes, TransportError> {
        let reply = (&mut self.rx).await;
        self.cancel = None;
        reply.unwrap_or(Err(TransportError::Unreachable { peer: self.peer, reason: "link closed".into() }))
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Some((link, session, seq)) = self.cancel.take() {
            if let Some(link) = link.upgrade() {
                link.cancel(session, seq);
            }
        }
    }
}
