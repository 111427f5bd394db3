//! The replication protocol as deterministic state machines: no I/O, no clock, no tokio (its
//! dependency graph has none: `cargo tree -p tandem-replication-core | grep -c tokio` is 0).
//! `tandem-replication` runs it (its `driver`).
//!
//! [`Primary`] is the volume's primary for one epoch. It takes inputs (`on_write`, `on_ack`,
//! `on_local_durable`, `on_member_failed`, `on_isr_committed`, `on_tick(now)`, ...) and queues
//! [`Output`]s that the driver carries out (`poll_output`). [`Backup`] is the replica side's
//! fencing: which records and requests it accepts. [`RecentLog`] remembers where a replica
//! wrote last, for reconciliation. Time is always an argument.
//!
//! The invariants (docs/ARCHITECTURE.md) and where they are kept:
//! - I1: a write completes only when every member whose state is `InSync`, `Joining` or
//!   `Leaving` (a superset of the committed ISR) and the primary itself have it durable.
//! - I3: a failed ISR member becomes `Leaving` and writes keep waiting for it until the
//!   shrink is committed ([`Primary::on_isr_committed`]); only then are they released.
//! - I4: a new primary starts in [`Phase::Reconciling`] and emits [`Output::Serving`] only
//!   once every ISR member has been made identical to it on every block any of them wrote
//!   recently (or everywhere, when one cannot tell). The reconciled members are declared
//!   level (their recent logs complete) only then, all at once, never while another member
//!   of the committed ISR may still differ from them.
//! - I5: a returning member is `Syncing`: it receives new writes while the chunks it missed
//!   are copied; once no chunk is left it becomes `Joining` (new writes wait for it), the grow
//!   is proposed only once it acknowledged every write sent to it before and every write
//!   sequenced before is complete (so no ISR member lacks a write that the copies may have
//!   pushed out of its recent log), and it counts as in sync only once the grow is committed.
//!   (Waiting for a moment with no write in flight to it, as before, never came under a steady
//!   write load.)
//! - Same-block order: writes are sequenced in arrival order, applied locally in that order,
//!   and sent to each member on one ordered link; a chunk being copied holds back new writes
//!   that touch it, so a copy never lands on top of a newer write.
//!
//! Where each job lives:
//! - [`primary`]: [`Primary`], the primary of one volume for one epoch; its files split it by
//!   job (writes and acks, members failing and the ISR, resync and reconciliation copies).
//! - [`member`]: what a primary tracks per member ([`MemberState`], dirty chunks).
//! - [`backup`]: [`Backup`], a replica's fencing of records and requests, and [`Refusal`].
//! - [`recent`]: [`RecentLog`], where a replica wrote recently.
//! - [`output`]: [`Output`], what the driver carries out, and [`Phase`].

use std::ops::Range;

pub mod backup;
pub mod member;
pub mod output;
pub mod primary;
pub mod recent;

pub use backup::{Backup, Refusal};
pub use member::MemberState;
pub use output::{Output, Phase};
pub use primary::{Primary, PrimaryConfig};
pub use recent::RecentLog;

/// A member that is sent writes it does not gate (it is resyncing) is declared failed only
/// after this many ack timeouts: it delays no host write, and failing it restarts its resync,
/// which under load (a node just back from a stall, a starved machine) only adds to the load
/// that made it slow.
pub const SYNCING_ACK_TIMEOUT_FACTOR: u32 = 5;

/// The unit of resync, reconciliation and dirty tracking. Small enough that one copy in
/// flight per member bounds memory; large enough that a 1 GiB volume is 1,024 chunks.
pub const CHUNK_BYTES: u64 = 1024 * 1024;

/// Writes a primary keeps in flight per volume; further writes wait (backpressure). It also
/// bounds what reconciliation must consider: see [`RECENT_WRITES_MAX`].
pub const INFLIGHT_WRITES_MAX: usize = 1024;

/// Writes a replica remembers. It exceeds [`INFLIGHT_WRITES_MAX`], so every write that some
/// but not all ISR members may hold is in some survivor's log.
pub const RECENT_WRITES_MAX: usize = 4 * INFLIGHT_WRITES_MAX;

/// Identifies a host write to the driver; opaque to the protocol.
pub type Token = u64;

/// Which chunk indices a byte range touches.
pub fn chunks_of(offset: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return offset / CHUNK_BYTES..offset / CHUNK_BYTES;
    }
    offset / CHUNK_BYTES..(offset + len - 1) / CHUNK_BYTES + 1
}

// `RecentLog` covers every write that some but not all ISR members may hold only if it holds
// more than the writes in flight (see `RECENT_WRITES_MAX`).
const _: () = assert!(RECENT_WRITES_MAX > INFLIGHT_WRITES_MAX);
// A syncing member's ack timeout is a multiple of the in-sync one, never shorter.
const _: () = assert!(SYNCING_ACK_TIMEOUT_FACTOR >= 1);

#[cfg(test)]
mod tests;
