//! The probe channel's answering side: lease requests go to the lease keeper, pings are
//! answered at once, and host probe reports go to the leader's path manager.

use std::sync::Arc;

use bytes::Bytes;
use tandem_iscsi::server::Sessions;
use tandem_transport::{BoxFuture, Handler};
use tandem_types::Channel;
use tandem_types::NodeId;
use tandem_wire::data::{ProbeMsg, ProbeReply};

use crate::hosts::PathManager;
use crate::lease::Leases;

/// The probe channel's handler: lease requests, pings, host probe reports (handed to `paths`,
/// the leader's path manager), and logical unit resets through other nodes' iSCSI portals
/// (reported to `iscsi`, this node's iSCSI sessions).
pub fn handler(leases: Arc<Leases>, paths: Arc<PathManager>, iscsi: Arc<Sessions>) -> Arc<dyn Handler> {
    Arc::new(ProbeHandler { leases, paths, iscsi })
}

struct ProbeHandler {
    leases: Arc<Leases>,
    paths: Arc<PathManager>,
    iscsi: Arc<Sessions>,
}

impl Handler for ProbeHandler {
    fn handle(&self, from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let msg = ProbeMsg::decode(&payload).map_err(|e| e.to_string())?;
            let reply = match msg {
                ProbeMsg::LeaseRequest => self.leases.grant(from).await,
                ProbeMsg::Ping => ProbeReply::Pong,
                ProbeMsg::HostProbes { host, probes } => self.paths.take_probes(&host, probes),
                ProbeMsg::LunReset { target } => {
                    tracing::info!(%from, %target, "logical unit reset through another node's portal");
                    self.iscsi.report_reset(&target);
                    ProbeReply::Accepted
                }
            };
            reply.encode().map(Bytes::from).map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tandem_clustermap::NodeRecord;
    use tandem_meta::store::{MetaConfig, MetaStore, RaftRole};
    use tandem_wire::data::PathProbe;

    use super::*;
    use crate::probe::fake::{Answer, FakeTransport};

    async fn ask(h: &Arc<dyn Handler>, from: NodeId, msg: ProbeMsg) -> ProbeReply {
        let payload = Bytes::from(msg.encode().expect("encodes"));
        let reply = h.handle(from, Channel::Probe, payload).await.expect("answered");
        ProbeReply::decode(&reply).expect("decodes")
    }

    /// A one-node cluster over a transport without sockets (it never needs a peer): its Raft
    /// leader answers pings, grants leases and notes whom it heard from, and refuses probe
    /// reports of a host it does not know.
    #[tokio::test]
    async fn the_leader_answers_pings_grants_leases_and_refuses_unknown_hosts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = MetaConfig {
            cluster_name: "probe-test".into(),
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_after_entries: 1000,
            logs_to_keep: 100,
            voters: 3,
        };
        let transport = Arc::new(FakeTransport::new(Answer::Unreachable));
        let meta = MetaStore::open(NodeId(1), &cfg, dir.path(), transport).await.expect("opens");
        let me = NodeRecord {
            id: NodeId(1),
            site: "a".into(),
            raft_addr: "127.0.0.1:7001".parse().unwrap(),
            api_addr: "127.0.0.1:8001".parse().unwrap(),
            nbd_addr: "127.0.0.1:9001".parse().unwrap(),
            extra_nbd_addrs: Vec::new(),
            iscsi_addr: None,
        };
        assert!(meta.initialize(&[me]).await.expect("initializes"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while meta.status().role != RaftRole::Leader {
            assert!(tokio::time::Instant::now() < deadline, "no leader: {:?}", meta.status());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let leases = Leases::new(NodeId(1), meta.clone(), Duration::from_millis(cfg.election_timeout_min_ms));
        let h = handler(leases.clone(), PathManager::new(NodeId(1), meta.clone(), leases.clone()), Default::default());

        assert_eq!(ask(&h, NodeId(2), ProbeMsg::Ping).await, ProbeReply::Pong);
        assert_eq!(leases.last_heard(NodeId(2)), None);
        assert!(
            matches!(ask(&h, NodeId(2), ProbeMsg::LeaseRequest).await, ProbeReply::GrantedAt { index } if index >= 1)
        );
        assert!(leases.last_heard(NodeId(2)).is_some(), "a granted lease notes the node as heard");
        // A failover decision and a grant about one node are ordered: a node just heard from is
        // not condemned; a condemned one gets no lease until its failover is done.
        let now = std::time::Instant::now();
        let long_ago = now.checked_sub(Duration::from_secs(60)).expect("a minute ago");
        assert!(!leases.condemn(NodeId(2), now, long_ago), "node 2 just renewed");
        assert!(leases.condemn(NodeId(3), now, long_ago), "node 3 was never heard from");
        assert!(matches!(ask(&h, NodeId(3), ProbeMsg::LeaseRequest).await, ProbeReply::Refused(_)));
        assert_eq!(leases.last_heard(NodeId(3)), None, "a refused request does not count as heard");
        leases.absolve(NodeId(3));
        assert!(matches!(ask(&h, NodeId(3), ProbeMsg::LeaseRequest).await, ProbeReply::GrantedAt { .. }));
        let probe = PathProbe {
            node: NodeId(1),
            address: "127.0.0.1:9001".parse().unwrap(),
            rtt_us: Some(10),
            refused: false,
            error: String::new(),
        };
        let reply = ask(&h, NodeId(2), ProbeMsg::HostProbes { host: "nohost".into(), probes: vec![probe] }).await;
        assert_eq!(reply, ProbeReply::Refused("no host named \"nohost\"".into()));
        meta.shutdown().await;
    }
}
