//! The metadata store: the cluster map, replicated with Raft (openraft) and kept in sled.
//!
//! - The state it replicates, the cluster map (`ClusterMap::apply`, no I/O), lives in the pure
//!   crate `tandem-clustermap`; this crate only stores and replicates it.
//! - [`log_store`], [`state_machine`]: openraft's storage traits on sled (group commit,
//!   snapshots, purge).
//! - [`network`]: Raft RPCs and forwarded client requests over the node-to-node transport.
//! - [`store`]: [`store::MetaStore`], what the rest of a node uses: linearizable reads from any
//!   node, writes and membership changes forwarded to the leader.
//! - [`voters`]: which members vote (a few, spread over sites) and which are learners; pure.
//!
//! openraft is an adapter here; nothing outside this crate names an openraft type except
//! through [`store::MetaStore`]'s status.

// openraft's storage traits return its own (large) `StorageError`; our helpers return it too.
#![allow(clippy::result_large_err)]

#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod log_store;
pub mod network;
pub mod raft_types;
pub mod state_machine;
pub mod store;
pub mod voters;

pub use raft_types::TypeConfig;
