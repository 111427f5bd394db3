//! Synchronous replication of volumes: a sans-IO protocol core and its async driver.
//!
//! - [`protocol`]: the primary's and the backups' state machines, in their own crate
//!   (`tandem-replication-core`, re-exported here). No I/O, no clock, no tokio: inputs in,
//!   [`protocol::Output`]s out. Every invariant of the replication model (I1–I6,
//!   docs/ARCHITECTURE.md) is kept there and tested without a network.
//! - [`driver`]: [`driver::DataPlane`] runs the protocol for every volume of a node over a
//!   [`driver::Network`] (the transport's mesh: channels, rings and regions; or an in-memory
//!   one in tests) and the node's block store, and serves (or proxies) host I/O.
//!   docs/PROTOCOL.md walks through its sequences.
//!
//! This crate never talks to Raft directly: the node hands it the committed volume
//! configuration and carries its ISR proposals to the metadata store.

pub mod driver;
/// The protocol core lives in its own crate, `tandem-replication-core` (no tokio in its
/// dependency graph); it keeps its old path here.
pub use tandem_replication_core as protocol;
