//! The cluster map: the replicated state that every node agrees on, and the commands that
//! change it. This is pure logic: [`ClusterMap::apply`] takes a command and returns a reply; it
//! does no I/O, reads no clock and knows nothing of Raft. The openraft adapter
//! (`tandem_meta`'s `state_machine.rs`) calls it for every committed entry, on every node, in
//! log order, so it must be deterministic: the same commands give the same map everywhere.
//!
//! Objects: nodes (with their target ports), settings, the transport policy, datasets and
//! volumes (with their replica sets, in-sync sets, primaries and epochs), and hosts (with the
//! volumes they may reach and their published path maps). Later capabilities (reservations,
//! tokens) add theirs as new fields, new [`ObjectKey`] variants and new commands; the
//! persistence and snapshot code keys everything by `ObjectKey` and needs no change for that.
//!
//! - [`command`]: [`MetaCmd`] and [`MetaReply`], the map's input and output.
//! - `apply.rs`: the dispatcher, [`ClusterMap::apply`].
//! - [`map`]: the [`ClusterMap`] state and its equality.
//! - [`nodes`]: node records, settings and the transport policy.
//! - [`datasets`]: datasets and replica placement.
//! - [`volumes`]: volumes, ISR compare-and-set, failover, epoch claims and resync progress.
//! - [`hosts`]: hosts, their volumes and published path maps.
//! - [`access`]: the access policy, principals, host credentials and the LUN-masking rule.
//! - [`reservations`]: the persistent reservations of volumes, applied by the pure
//!   `tandem_reservations` state machine.
//! - [`copies`]: copy tokens, clones and snapshots (copy by reference).
//! - [`objects`]: the map as keyed objects for persistence and snapshots.
//!
//! Architecture invariant: this crate depends on `tandem-types`, `tandem-paths`,
//! `tandem-reservations` and `serde`
//! only; no tokio, no openraft, no sled.

pub mod access;
mod apply;
pub mod command;
pub mod copies;
pub mod datasets;
pub mod hosts;
pub mod key;
pub mod map;
pub mod nodes;
pub mod objects;
pub mod reservations;
pub mod volumes;

#[cfg(test)]
mod tests;

pub use access::{AccessPolicy, HostCredential, Principal, Refusal, SealedChap, ACCESS_SETTING};
pub use command::{MetaCmd, MetaReply};
pub use copies::{Origin, TokenRecord, TOKENS_MAX, TOKENS_PER_VOLUME_MAX, TOKEN_LIFETIME_MAX_MS, TOKEN_RANGES_MAX};
pub use datasets::{DatasetRecord, DATASETS_MAX, DEFAULT_DATASET};
pub use hosts::{
    path_map_bytes, validate_iscsi_name, HostRecord, HOSTS_MAX, HOST_IQNS_MAX, HOST_VOLUMES_MAX, PATH_MAP_BYTES_MAX,
    PATH_REASON_BYTES_MAX, VOLUME_PATHS_MAX,
};
pub use key::ObjectKey;
pub use map::ClusterMap;
pub use nodes::{NodeRecord, EXTRA_TARGETS_MAX};
pub use objects::Object;
pub use volumes::{ResyncProgress, VolumeRecord, VOLUMES_MAX};
