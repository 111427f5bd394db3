//! openraft's type configuration for the metadata store.

use std::io::Cursor;

use tandem_clustermap::{MetaCmd, MetaReply};

openraft::declare_raft_types!(
    /// Raft over the cluster map: commands are [`MetaCmd`], replies [`MetaReply`]; a node is
    /// known to Raft by its node-to-node address (`BasicNode::addr`).
    pub TypeConfig:
        D = MetaCmd,
        R = MetaReply,
        NodeId = tandem_types::NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
