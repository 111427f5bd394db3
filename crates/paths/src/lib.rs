//! Path states for hosts: which of a volume's paths a host should send I/O to, and why.
//!
//! For each host and each volume the host may reach, the cluster publishes the state of every
//! path (one target address of one replica node), ALUA / NVMe-ANA style:
//! [`PathState::ActiveOptimized`] (send I/O here), [`PathState::ActiveNonOptimized`] (works, at a
//! cost: the node proxies to the primary, or the path is slower) or [`PathState::Unavailable`],
//! each with a stable human-readable reason. This crate is the pure part of that:
//!
//! - [`volume_paths`] (`compute.rs`): the ordered paths of one volume for one host, from the
//!   cluster's state (liveness, primary, in-sync set) and the host's probe verdicts.
//!   [`pick_primary`] is the failover candidate rule, shared with the Raft leader so that hosts
//!   are steered to exactly the node the failover will choose.
//! - [`HostProbes`] (`probes.rs`): one host's probe reports turned into [`Reach`] verdicts, with
//!   hysteresis so that jitter and single lost probes never flip a path.
//! - [`NodeHealth`] (`health.rs`): a node's [`Liveness`] as the Raft leader sees it, with
//!   hysteresis on the way back up.
//!
//! What it is not: the path manager. It does no I/O, reads no clock (every `now` is an
//! argument), uses no tokio, no async and no randomness. The node crate's path manager feeds it
//! (lease renewals, probe reports, the committed cluster map) and publishes the results through
//! Raft, where hosts read them. [`PathState`], [`PathEntry`] and [`VolumePaths`] are persisted
//! with bincode, which is not self-describing: their serde shape must stay free of attributes
//! that skip, flatten or guess fields.

mod compute;
mod health;
mod probes;

pub use compute::{
    pick_primary, volume_paths, HostInput, NodeInput, ParsePathStateError, PathEntry, PathState, VolumeInput,
    VolumePaths,
};
pub use health::{Liveness, NodeHealth, NODE_DOWN_AFTER, NODE_UP_AFTER};
pub use probes::{
    HostProbes, ProbeOutcome, Reach, FAILURES_TO_DOWN, PATHS_PER_HOST_MAX, RECOVER_AFTER, SLOW_FACTOR, SLOW_FLOOR_US,
    SLOW_SUSTAIN, STALE_AFTER, SUCCESSES_TO_UP, WHY_BYTES_MAX,
};
