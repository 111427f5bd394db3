//! Raft's network over the node-to-node transport (the `control` channel).
//!
//! Messages between metadata stores are [`MetaRpc`] requests, encoded with `tandem_wire`'s
//! codec. They carry openraft's own RPC types (serde) plus [`Forwarded`] client operations that a
//! follower sends to the leader. The reply type of each request is fixed by its variant.

use std::sync::Arc;

use bytes::Bytes;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tandem_transport::{Transport, TransportError};
use tandem_types::Channel;
use tandem_types::NodeId;

use crate::raft_types::TypeConfig;
use tandem_clustermap::{MetaCmd, NodeRecord};

/// A request from one metadata store to another.
#[derive(Serialize, Deserialize)]
pub enum MetaRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    Forward(Forwarded),
}

/// A client operation that only the leader can carry out, sent to it by another node.
/// The reply is `Result<T, MetaError>` with `T` as noted on each variant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Forwarded {
    /// `T = MetaReply`.
    Write(MetaCmd),
    /// `T = Option<u64>`: the index up to which a reader must have applied.
    ReadIndex,
    /// `T = MetaReply`.
    AddNode(NodeRecord),
    /// `T = MetaReply`.
    RemoveNode(NodeId),
}

/// Errors of the metadata store's client operations; they cross nodes, so they are plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    /// Only the leader can do this; retry on `leader` (or wait for an election).
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// No leader could be reached in time, or the leader lost its quorum.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub(crate) fn encode_msg<T: Serialize>(v: &T) -> Result<Bytes, String> {
    tandem_wire::encode(v).map(Bytes::from).map_err(|e| e.to_string())
}

pub(crate) fn decode_msg<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    tandem_wire::decode(b).map_err(|e| e.to_string())
}

/// Sends a request on the control channel and decodes its typed reply.
pub(crate) async fn call<T: DeserializeOwned>(
    transport: &dyn Transport,
    target: NodeId,
    msg: &MetaRpc,
) -> Result<T, TransportError> {
    let bytes = encode_msg(msg).map_err(|reason| TransportError::Remote { peer: target, reason })?;
    let reply = transport.call(target, Channel::Control, bytes).await?;
    decode_msg(&reply).map_err(|reason| TransportError::Remote { peer: target, reason })
}

/// Creates a [`PeerClient`] per target; openraft calls it when it starts replicating to one.
#[derive(Clone)]
pub struct Network {
    pub(crate) transport: Arc<dyn Transport>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        match node.addr.parse() {
            Ok(addr) => self.transport.set_peer_addr(target, addr),
            Err(e) => {
                tracing::error!(%target, addr = %node.addr, error = %e, "bad raft address in membership")
            }
        }
        PeerClient { target, transport: self.transport.clone() }
    }
}

pub struct PeerClient {
    target: NodeId,
    transport: Arc<dyn Transport>,
}

impl PeerClient {
    async fn rpc<R, E>(&self, msg: MetaRpc, option: &RPCOption) -> Result<R, RPCError<NodeId, BasicNode, E>>
    where
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let fut = call::<Result<R, E>>(self.transport.as_ref(), self.target, &msg);
        match tokio::time::timeout(option.hard_ttl(), fut).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(remote))) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            // A dead or unknown peer: openraft backs off before trying it again.
            Ok(Err(e @ (TransportError::Unreachable { .. } | TransportError::UnknownPeer(_)))) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Err(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Err(_) => Err(RPCError::Network(NetworkError::new(&std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply from node {} within {:?}", self.target, option.hard_ttl()),
            )))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(MetaRpc::AppendEntries(rpc), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.rpc(MetaRpc::InstallSnapshot(rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(MetaRpc::Vote(rpc), &option).await
    }
}
