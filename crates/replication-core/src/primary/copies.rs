//! A primary's copies: reconciling the surviving ISR members before serving (I4) and
//! resyncing a returning member until it may rejoin (I5).

use tandem_types::chaos_bugs::Bug;
use tandem_types::NodeId;

use super::Primary;
use crate::chunks_of;
use crate::member::{Dirty, MemberState};
use crate::output::{Output, Phase};
#[cfg(doc)]
use crate::RecentLog;

impl Primary {
    /// Starts bringing an out-of-sync member back: open it, then copy what it missed.
    pub fn start_resync(&mut self, n: NodeId) {
        if self.phase != Phase::Serving {
            return;
        }
        let Some(m) = self.members.get_mut(&n) else { return };
        if m.state != MemberState::Out {
            return;
        }
        m.state = MemberState::Opening;
        m.recent = None;
        m.session_start = self.next_seq;
        self.outputs.push_back(Output::Open { to: n, start_seq: self.next_seq });
    }

    /// `n` accepted the `Open`; `recent` is its [`RecentLog::ranges`].
    pub fn on_opened(&mut self, n: NodeId, recent: Option<Vec<(u64, u64)>>) {
        let Some(m) = self.members.get_mut(&n) else { return };
        if m.state != MemberState::Opening {
            return;
        }
        match self.phase {
            Phase::Reconciling => {
                // Wait for every member's report: the union of all decides what to compare.
                m.recent = Some(recent);
                self.maybe_start_reconcile_copies();
            }
            Phase::Serving => {
                m.state = MemberState::Syncing;
                m.chunks_done = 0;
                m.chunks_total = m.dirty.count();
                self.outputs.push_back(Output::Progress { node: n, done_chunks: 0, total_chunks: m.chunks_total });
                self.advance_copies();
            }
            Phase::Deposed => {}
        }
    }

    pub(super) fn maybe_start_reconcile_copies(&mut self) {
        if self.phase != Phase::Reconciling {
            return;
        }
        let opening = self.members.values().filter(|m| m.state == MemberState::Opening);
        if opening.clone().any(|m| m.recent.is_none()) {
            return;
        }
        // Every opened member answered: compare the union of what anyone wrote recently.
        let mut dirty = Dirty::default();
        let mut all = self.own_recent.is_none();
        for r in self.own_recent.iter().flatten() {
            dirty.add(chunks_of(r.0, r.1));
        }
        for m in self.members.values().filter(|m| m.state == MemberState::Opening) {
            match m.recent.as_ref().expect("checked above") {
                Some(ranges) => ranges.iter().for_each(|r| dirty.add(chunks_of(r.0, r.1))),
                None => all = true,
            }
        }
        if all {
            dirty = Dirty::all(self.chunks_total);
        }
        if self.config.bugs.has(Bug::SkipReconciliation) {
            // Planted (chaos-bugs): trust that the members are level; copy nothing.
            dirty = Dirty::default();
        }
        for (&n, m) in self.members.iter_mut() {
            if m.state == MemberState::Opening {
                m.state = MemberState::Syncing;
                m.dirty = dirty.clone();
                m.chunks_done = 0;
                m.chunks_total = dirty.count();
                m.recent = None;
                self.outputs.push_back(Output::Progress { node: n, done_chunks: 0, total_chunks: m.chunks_total });
            }
        }
        self.advance_copies();
    }

    /// The copy of `chunk` to `n` is durable there.
    pub fn on_copied(&mut self, n: NodeId, chunk: u64) {
        let Some(m) = self.members.get_mut(&n) else { return };
        if m.copying != Some((chunk, true)) {
            return;
        }
        m.copying = None;
        m.chunks_done += 1;
        if m.chunks_done % 16 == 0 || m.dirty.is_empty() {
            self.outputs.push_back(Output::Progress {
                node: n,
                done_chunks: m.chunks_done,
                total_chunks: m.chunks_total,
            });
        }
        self.release_deferred_soon();
        self.advance_copies();
    }

    /// Moves every syncing member along: lock the next chunk, copy it once no write in flight
    /// to it is unacknowledged by that member, and ask to join when nothing is left.
    pub(super) fn advance_copies(&mut self) {
        if self.phase == Phase::Deposed {
            return;
        }
        let locked = self.locked_chunks();
        let reconciling = self.phase == Phase::Reconciling;
        let mut joins = false;
        let ids: Vec<NodeId> = self.members.keys().copied().collect();
        for n in ids {
            let m = self.members.get_mut(&n).expect("listed above");
            if m.state != MemberState::Syncing {
                continue;
            }
            if m.copying.is_none() {
                // Skip chunks another member is copying right now; they come back later.
                let mut skipped = Vec::new();
                while let Some(c) = m.dirty.next() {
                    if locked.contains(&c) {
                        skipped.push(c);
                    } else {
                        m.copying = Some((c, false));
                        break;
                    }
                }
                for c in skipped {
                    m.dirty.chunks.insert(c);
                }
            }
            match m.copying {
                Some((c, false)) => {
                    let busy = self.pending.values().any(|p| p.chunks.contains(&c) && p.extra.contains(&n));
                    if !busy {
                        m.copying = Some((c, true));
                        self.outputs.push_back(Output::Copy { to: n, chunk: c });
                    }
                }
                Some((_, true)) => {}
                None => {
                    // While serving, a member with nothing left to copy gates new writes at
                    // once; `desired_isr` adds it only once the writes it was sent as a
                    // non-gating member are acknowledged, and every write sequenced before
                    // it gated writes is complete.
                    // While reconciling, a member with nothing left to copy stays `Syncing`:
                    // it is declared level only when reconciliation finishes
                    // (`maybe_finish_reconcile`).
                    if m.dirty.is_empty() && !reconciling {
                        m.state = MemberState::Joining;
                        m.joined_at = self.next_seq;
                        joins = true;
                    }
                }
            }
        }
        if joins || self.members.values().any(|m| m.state == MemberState::Joining) {
            self.propose();
        }
        self.maybe_finish_reconcile();
    }

    pub(super) fn maybe_finish_reconcile(&mut self) {
        if self.phase != Phase::Reconciling {
            return;
        }
        if self.members.values().any(|m| m.state == MemberState::Opening) {
            self.maybe_start_reconcile_copies();
            if self.members.values().any(|m| m.state == MemberState::Opening) {
                return;
            }
        }
        let busy = self.members.values().any(|m| match m.state {
            MemberState::Leaving => true,
            MemberState::Syncing => m.copying.is_some() || !m.dirty.is_empty(),
            _ => false,
        });
        if busy || self.proposing.is_some() {
            return;
        }
        // Only now, with every member left in the committed ISR identical to this copy and
        // every failed one removed by a committed shrink, are the reconciled members declared
        // level (`Progress` with no chunks: the driver marks their recent logs complete).
        // Declaring one level as soon as its own copies were done, as before, let its log,
        // which the copies had pushed past its bound (incomplete), become complete while
        // another member of the committed ISR (still being copied to, or failed and not yet
        // removed) differed from it in a chunk neither log showed any more: if this primary
        // died then, the next one would skip that chunk and serve two different replicas (I4).
        for (&n, m) in self.members.iter_mut() {
            if m.state == MemberState::Syncing {
                m.state = MemberState::InSync;
                self.outputs.push_back(Output::Progress { node: n, done_chunks: 0, total_chunks: 0 });
            }
        }
        self.phase = Phase::Serving;
        self.outputs.push_back(Output::Serving);
    }
}
