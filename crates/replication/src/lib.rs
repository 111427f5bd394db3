//! Synchronous replication of volumes: a sans-IO protocol core and its async driver.
//!
//! - `tandem-replication-core` (its own crate): the primary's and the backups' state
//!   machines. No I/O, no clock, no tokio: inputs in, `Output`s out. Every invariant of the
//!   replication model (I1–I6, docs/ARCHITECTURE.md) is kept there and tested without a
//!   network.
//! - [`driver`]: [`driver::DataPlane`] runs the protocol for every volume of a node over a
//!   [`driver::Network`] (the transport's mesh: channels, rings and regions; or an in-memory
//!   one in tests) and the node's block store, and serves (or proxies) host I/O.
//!   docs/PROTOCOL.md walks through its sequences.
//!
//! This crate never talks to Raft directly: the node hands it the committed volume
//! configuration and carries its ISR proposals to the metadata store.

pub mod driver;
#[cfg(feature = "failpoints")]
pub mod failpoints;
