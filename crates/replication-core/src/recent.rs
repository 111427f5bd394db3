//! [`RecentLog`]: where a replica wrote recently, bounded, so that a new primary knows which
//! ranges to reconcile (I4).

use std::collections::VecDeque;

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
#[derive(Clone, Debug)]
pub struct RecentLog {
    entries: VecDeque<RecentEntry>,
    complete: bool,
    entries_max: usize,
}

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
        RecentLog { entries: VecDeque::new(), complete: false, entries_max: RECENT_WRITES_MAX }
    }

    /// A log for a volume that was just created (every replica holds zeros).
    pub fn fresh() -> RecentLog {
        RecentLog { entries: VecDeque::new(), complete: true, entries_max: RECENT_WRITES_MAX }
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
