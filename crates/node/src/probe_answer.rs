//! The probe channel's answering side: lease requests go to the lease keeper, pings are
//! answered at once, and host probe reports go to the leader's path manager.

use std::sync::Arc;

use bytes::Bytes;
use tandem_transport::{BoxFuture, Channel, Handler};
use tandem_types::NodeId;
use tandem_wire::data::{ProbeMsg, ProbeReply};

use crate::hosts::PathManager;
use crate::lease::Leases;

/// The probe channel's handler: lease requests, pings, and host probe reports (handed to
/// `paths`, the leader's path manager).
pub fn handler(leases: Arc<Leases>, paths: Arc<PathManager>) -> Arc<dyn Handler> {
    Arc::new(ProbeHandler { leases, paths })
}

struct ProbeHandler {
    leases: Arc<Leases>,
    paths: Arc<PathManager>,
}

impl Handler for ProbeHandler {
    fn handle(&self, from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let msg = ProbeMsg::decode(&payload).map_err(|e| e.to_string())?;
            let reply = match msg {
                ProbeMsg::LeaseRequest => self.leases.grant(from).await,
                ProbeMsg::Ping => ProbeReply::Pong,
                ProbeMsg::HostProbes { host, probes } => self.paths.take_probes(&host, probes),
            };
            reply.encode().map(Bytes::from).map_err(|e| e.to_string())
        })
    }
}
