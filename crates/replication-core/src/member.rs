//! What a primary tracks per member: its [`MemberState`], the chunks it still has to receive
//! and where its copies and its session stand.

use std::collections::BTreeSet;
use std::ops::Range;

use tandem_types::Seq;

/// Chunks a member still has to receive: explicit ones, plus a range still to be scanned
/// (the whole volume when nothing better is known).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Dirty {
    pub(crate) chunks: BTreeSet<u64>,
    pub(crate) scan: Range<u64>,
}

impl Dirty {
    pub(crate) fn all(chunks_total: u64) -> Dirty {
        Dirty { chunks: BTreeSet::new(), scan: 0..chunks_total }
    }

    pub(crate) fn add(&mut self, r: Range<u64>) {
        for c in r {
            if !self.scan.contains(&c) {
                self.chunks.insert(c);
            }
        }
    }

    pub(crate) fn next(&mut self) -> Option<u64> {
        if let Some(c) = self.chunks.pop_first() {
            return Some(c);
        }
        let c = self.scan.next()?;
        Some(c)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.scan.is_empty()
    }

    pub(crate) fn count(&self) -> u64 {
        self.chunks.len() as u64 + (self.scan.end - self.scan.start)
    }
}

/// Where a replica stands with its primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MemberState {
    /// In the committed ISR: writes wait for it.
    InSync,
    /// Failed; its removal from the ISR is proposed. Writes still wait for it (I3).
    Leaving,
    /// Not in the ISR and not receiving writes; what it misses is tracked as dirty chunks.
    Out,
    /// An `Open` was sent; writes are not sent to it yet (they are tracked as dirty).
    Opening,
    /// Receives new writes; the dirty chunks are being copied to it. Writes do not wait for it.
    Syncing,
    /// Level with the primary; its return to the ISR is proposed. Writes wait for it.
    Joining,
}

impl MemberState {
    /// Whether a write must be durable on this member before it completes.
    pub(crate) fn gates_writes(self) -> bool {
        matches!(self, MemberState::InSync | MemberState::Leaving | MemberState::Joining)
    }

    /// Whether new writes are sent to this member.
    pub(crate) fn receives_writes(self) -> bool {
        matches!(self, MemberState::InSync | MemberState::Leaving | MemberState::Syncing | MemberState::Joining)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub(crate) state: MemberState,
    pub(crate) dirty: Dirty,
    /// The chunk being copied to it, if any, and whether the copy was handed to the driver
    /// (it waits first for writes in flight to that chunk to be acknowledged).
    pub(crate) copying: Option<(u64, bool)>,
    /// Chunks copied since the current resync began; bytes are reported by the driver.
    pub(crate) chunks_done: u64,
    pub(crate) chunks_total: u64,
    /// The reconciliation ranges this member reported, until every member has reported.
    pub(crate) recent: Option<Option<Vec<(u64, u64)>>>,
    /// The first sequence number of its current session (the `start_seq` of the last `Open`):
    /// a refusal of an earlier record is about a session that is over.
    pub(crate) session_start: Seq,
    /// The sequence number of the first write that gated on it as `Joining`: its grow waits
    /// until every write before it is complete.
    pub(crate) joined_at: Seq,
}

impl Member {
    pub(crate) fn new(state: MemberState, dirty: Dirty) -> Member {
        Member {
            state,
            dirty,
            copying: None,
            chunks_done: 0,
            chunks_total: 0,
            recent: None,
            session_start: Seq(0),
            joined_at: Seq(0),
        }
    }
}
