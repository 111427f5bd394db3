//! Synchronous replication of volumes: a sans-IO protocol core and its async driver.
//!
//! - [`protocol`]: the primary's and the backups' state machines. No I/O, no clock, no tokio:
//!   inputs in, [`protocol::Output`]s out. Every invariant of the replication model (I1–I5,
//!   docs/ARCHITECTURE.md) is kept here and tested without a network.
//!
//! This crate never talks to Raft directly: the node hands it the committed volume
//! configuration and carries its ISR proposals to the metadata store.

pub mod protocol;
