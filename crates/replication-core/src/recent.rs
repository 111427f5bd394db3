//! [`RecentLog`]: where a replica wrote recently, bounded, so that a new primary knows which
//! ranges to reconcile (I4).

use std::collections::{HashSet, VecDeque};

use tandem_types::BLOCK_BYTES;

#[cfg(doc)]
use crate::INFLIGHT_WRITES_MAX;
use crate::RECENT_WRITES_MAX;

/// Where a replica wrote recently, bounded. `complete` is false when the log does not reach
/// back far enough to be trusted (the process restarted since the volume was opened, or a
/// copy had to push out an entry).
///
/// Two kinds of entries: writes ([`RecentLog::record`]) and chunks received by copy
/// ([`RecentLog::record_copy`]). A write entry may be pushed out by newer entries: while a
/// write is not on every ISR member, fewer than [`INFLIGHT_WRITES_MAX`] writes follow it. A
/// copy gives no such bound (a resync or reconciliation copies any number of chunks, and a
/// primary may die between copying a chunk to one member and to the next), so an entry is
/// never pushed out for a copy, nor a copy entry pushed out, without the log becoming
/// incomplete.
///
/// Beside the ranges, the log keeps which pieces of host write requests this copy has applied
/// (a request's identity and the piece's offset, the last `entries_max` of them): a primary
/// built on this copy answers a retry of such a piece without executing it again
/// ([`RecentLog::holds_write`]). They are forgotten when a primary opens the copy, since its
/// reconciliation or resync may overwrite them with data that lacks them.
#[derive(Clone, Debug)]
pub struct RecentLog {
    entries: VecDeque<RecentEntry>,
    complete: bool,
    entries_max: usize,
    /// Pieces of host writes applied to this copy, oldest first, and the same as a set.
    applied: VecDeque<WritePiece>,
    applied_set: HashSet<WritePiece>,
}

/// A piece of a host write: the request's identity (a nonce chosen where the host sent it,
/// never 0) and the piece's offset.
pub type WritePiece = (u64, u64);

#[derive(Clone, Copy, Debug)]
struct RecentEntry {
    offset: u64,
    len: u64,
    /// Received by copy since the log was last marked complete.
    copy: bool,
}

impl RecentLog {
    /// A log for a process that just started: it knows nothing of what came before.
    pub fn after_restart() -> RecentLog {
        RecentLog::new(false)
    }

    /// A log for a volume that was just created (every replica holds zeros).
    pub fn fresh() -> RecentLog {
        RecentLog::new(true)
    }

    fn new(complete: bool) -> RecentLog {
        RecentLog {
            entries: VecDeque::new(),
            complete,
            entries_max: RECENT_WRITES_MAX,
            applied: VecDeque::new(),
            applied_set: HashSet::new(),
        }
    }

    /// The same log with room for `entries_max` entries instead of [`RECENT_WRITES_MAX`]:
    /// simulations scale the bounds down. It must exceed the writes a primary keeps in flight.
    pub fn with_entries_max(mut self, entries_max: usize) -> RecentLog {
        assert!(entries_max > 0);
        self.entries_max = entries_max;
        while self.entries.len() > entries_max {
            self.entries.pop_front();
            self.complete = false;
        }
        while self.applied.len() > entries_max {
            let old = self.applied.pop_front().expect("non-empty");
            self.applied_set.remove(&old);
        }
        self
    }

    /// Declares the log trustworthy from now on: the replica was just made identical to its
    /// primary (a resync or reconciliation finished). What it recorded stays: a write it
    /// applied just before may not have reached the other replicas yet, and if the primary
    /// dies now, this log is what tells the next one to reconcile that range. Copies received
    /// so far are now the primary's data and age like writes.
    pub fn mark_complete(&mut self) {
        self.complete = true;
        for e in &mut self.entries {
            e.copy = false;
        }
    }

    /// A host write applied at `offset`, `len` bytes.
    pub fn record(&mut self, offset: u64, len: u64) {
        self.push(RecentEntry { offset, len, copy: false });
    }

    /// A chunk (or range) made identical to the primary's by a copy. The driver records every
    /// copy it accepts: the copy may carry writes that other ISR members lack, and if the
    /// primary dies before they have them, only this log shows the next primary where.
    pub fn record_copy(&mut self, offset: u64, len: u64) {
        self.push(RecentEntry { offset, len, copy: true });
    }

    /// This copy has applied the piece at `offset` of host write `write` (0: a write with no
    /// identity, not noted). Noted only once the store took it: a piece sequenced but dropped
    /// (its primary was deposed first) is not in this copy.
    pub fn note_applied(&mut self, write: u64, offset: u64) {
        if write == 0 || !self.applied_set.insert((write, offset)) {
            return;
        }
        if self.applied.len() == self.entries_max {
            let old = self.applied.pop_front().expect("full");
            self.applied_set.remove(&old);
        }
        self.applied.push_back((write, offset));
    }

    /// Whether this copy has applied the piece at `offset` of host write `write` since it was
    /// last opened by a primary (or since it became primary itself).
    pub fn holds_write(&self, write: u64, offset: u64) -> bool {
        write != 0 && self.applied_set.contains(&(write, offset))
    }

    /// Every piece noted, for a primary taking over on this copy: it keeps them for as long
    /// as it serves, however many writes push them out of the log meanwhile.
    pub fn applied_writes(&self) -> HashSet<WritePiece> {
        self.applied_set.clone()
    }

    /// A primary opened this copy: what it applied may be overwritten by that primary's
    /// reconciliation or resync, so none of it counts as taken effect any more.
    pub fn forget_applied(&mut self) {
        self.applied.clear();
        self.applied_set.clear();
    }

    fn push(&mut self, e: RecentEntry) {
        if self.entries.len() == self.entries_max {
            let old = self.entries.pop_front().expect("full");
            if old.copy || e.copy {
                self.complete = false;
            }
        }
        self.entries.push_back(e);
    }

    /// The block-aligned ranges written recently, or `None` if the log cannot be trusted.
    pub fn ranges(&self) -> Option<Vec<(u64, u64)>> {
        self.complete.then(|| {
            self.entries
                .iter()
                .map(|e| {
                    let start = e.offset / BLOCK_BYTES * BLOCK_BYTES;
                    let end = (e.offset + e.len).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
                    (start, end - start)
                })
                .collect()
        })
    }
}
