//! A primary's writes: sequencing in arrival order, holding back writes to chunks being
//! copied, local durability and members' acks, completion (I1).

use std::collections::BTreeSet;
use std::time::Instant;

use tandem_types::chaos_bugs::Bug;
use tandem_types::{NodeId, Seq};

use super::{DeferredWrite, PendingWrite, Primary};
use crate::output::{Output, Phase};
use crate::{chunks_of, Token};

impl Primary {
    /// A host write of `len` bytes at `offset`. It is sequenced at once unless it touches a
    /// chunk being copied (or an earlier held-back write), in which case it waits for that.
    pub fn on_write(&mut self, now: Instant, token: Token, offset: u64, len: u64) {
        assert!(self.phase == Phase::Serving, "writes are submitted only while serving");
        self.now = self.now.max(now);
        let w = DeferredWrite { token, offset, len };
        if self.must_defer(&w) {
            self.deferred.push_back(w);
        } else {
            self.sequence(now, w);
        }
    }

    pub(super) fn locked_chunks(&self) -> BTreeSet<u64> {
        self.members.values().filter_map(|m| m.copying.map(|(c, _)| c)).collect()
    }

    pub(super) fn must_defer(&self, w: &DeferredWrite) -> bool {
        let locked = self.locked_chunks();
        let chunks = chunks_of(w.offset, w.len);
        chunks.clone().any(|c| locked.contains(&c))
            || self.deferred.iter().any(|d| {
                let dc = chunks_of(d.offset, d.len);
                dc.start < chunks.end && chunks.start < dc.end
            })
    }

    pub(super) fn sequence(&mut self, now: Instant, w: DeferredWrite) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let chunks = chunks_of(w.offset, w.len);
        let mut need = BTreeSet::from([self.me]);
        let mut extra = BTreeSet::new();
        let mut to = Vec::new();
        for (&n, m) in self.members.iter_mut() {
            if m.state.gates_writes() {
                need.insert(n);
                to.push(n);
            } else if m.state.receives_writes() {
                extra.insert(n);
                to.push(n);
            } else {
                m.dirty.add(chunks.clone());
            }
        }
        self.pending.insert(seq, PendingWrite { token: w.token, chunks, need, extra, completed: false, sent_at: now });
        self.outputs.push_back(Output::Write { token: w.token, seq, to });
    }

    pub fn on_local_durable(&mut self, seq: Seq) {
        self.acked(self.me, seq);
    }

    /// `from` has write `seq` durable.
    pub fn on_ack(&mut self, from: NodeId, seq: Seq) {
        self.acked(from, seq);
    }

    pub(super) fn acked(&mut self, from: NodeId, seq: Seq) {
        let Some(p) = self.pending.get_mut(&seq) else { return };
        p.need.remove(&from);
        p.extra.remove(&from);
        self.settle(seq);
        self.advance_copies();
    }

    /// Completes a write whose gating members all have it, and forgets it once nobody it was
    /// sent to is still to answer.
    pub(super) fn settle(&mut self, seq: Seq) {
        let Some(p) = self.pending.get_mut(&seq) else { return };
        // Planted (chaos-bugs): complete once durable here, whatever the gating members have.
        let early = self.config.bugs.has(Bug::AckBeforeBackups) && !p.need.contains(&self.me);
        if (p.need.is_empty() || early) && !p.completed {
            p.completed = true;
            self.outputs.push_back(Output::Complete { token: p.token });
        }
        // (`need` is empty once completed, but for the planted early completion above.)
        if p.completed && p.need.is_empty() && p.extra.is_empty() {
            self.pending.remove(&seq);
        }
    }

    /// Moves held-back writes whose chunks are free again into the sequence, in order.
    pub(super) fn release_deferred_soon(&mut self) {
        if self.phase != Phase::Serving || self.deferred.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.deferred);
        let locked = self.locked_chunks();
        for w in waiting {
            let chunks = chunks_of(w.offset, w.len);
            let blocked = chunks.clone().any(|c| locked.contains(&c))
                || self.deferred.iter().any(|d| {
                    let dc = chunks_of(d.offset, d.len);
                    dc.start < chunks.end && chunks.start < dc.end
                });
            if blocked {
                self.deferred.push_back(w);
            } else {
                self.sequence(self.now, w);
            }
        }
    }
}
