//! The metadata store: the cluster map, replicated with Raft (openraft) and kept in sled.
//!
//! - [`cluster_map`]: re-exports the pure state machine logic (`ClusterMap::apply`, no I/O),
//!   which lives in the `tandem-clustermap` crate.
//! - [`log_store`], [`state_machine`]: openraft's storage traits on sled (group commit,
//!   snapshots, purge).
//! - [`network`]: Raft RPCs and forwarded client requests over the node-to-node transport.
//! - [`store`]: [`store::MetaStore`], what the rest of a node uses: linearizable reads from any
//!   node, writes and membership changes forwarded to the leader.
//!
//! openraft is an adapter here; nothing outside this crate names an openraft type except
//! through [`store::MetaStore`]'s status.

// openraft's storage traits return its own (large) `StorageError`; our helpers return it too.
#![allow(clippy::result_large_err)]

pub mod cluster_map;
pub mod log_store;
pub mod network;
pub mod raft_types;
pub mod state_machine;
pub mod store;

pub use cluster_map::{
    ClusterMap, DatasetRecord, HostRecord, MetaCmd, MetaReply, NodeRecord, ResyncProgress, VolumeRecord,
    DEFAULT_DATASET,
};
pub use raft_types::TypeConfig;
