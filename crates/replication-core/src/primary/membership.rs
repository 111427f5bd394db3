//! A primary's members failing and leaving, and the ISR it proposes and learns was committed
//! (I3): a failed member leaves only through a committed shrink. The tick times members out.

use std::collections::BTreeSet;
use std::time::Instant;

use tandem_types::{NodeId, Seq};

use super::Primary;
use crate::member::{Dirty, MemberState};
use crate::output::{Output, Phase};
use crate::SYNCING_ACK_TIMEOUT_FACTOR;

impl Primary {
    /// `n` refused record `seq`. Records of an earlier session may still be on their way when
    /// a new `Open` overtakes them (the `Open` is a request, records go through the ring), and
    /// the member rightly refuses them; that says nothing about the new session, so such a
    /// refusal is ignored. Before this rule, a member back from a pause under load was failed
    /// again by the refusals of its old records after every `Open`, and never rejoined.
    pub fn on_member_refused(&mut self, n: NodeId, seq: Seq) {
        let Some(m) = self.members.get(&n) else { return };
        if seq < m.session_start {
            return;
        }
        self.on_member_failed(n);
    }

    /// `n` failed: it refused a record, did not answer in time, or is unreachable.
    pub fn on_member_failed(&mut self, n: NodeId) {
        let Some(m) = self.members.get_mut(&n) else { return };
        match m.state {
            MemberState::InSync | MemberState::Joining => {
                m.state = MemberState::Leaving;
                m.copying = None;
                self.propose();
                self.drop_leavers();
            }
            MemberState::Opening | MemberState::Syncing
                if self.phase == Phase::Reconciling && self.committed_isr.contains(&n) =>
            {
                // A member being reconciled is still in the committed ISR: it leaves only
                // through a committed shrink (I3), and the volume is not served before (I4).
                // What it still lacks is what was left to copy, or, if it never reported its
                // recent writes, unknown.
                if m.state == MemberState::Opening {
                    m.dirty = Dirty::all(self.chunks_total);
                }
                if let Some((c, _)) = m.copying.take() {
                    m.dirty.add(c..c + 1);
                }
                m.state = MemberState::Leaving;
                m.recent = None;
                self.propose();
                // Its chunk lock is free: a member that skipped that chunk must move on now,
                // since no write or ack comes to move it while reconciling.
                self.advance_copies();
            }
            MemberState::Opening | MemberState::Syncing => {
                m.state = MemberState::Out;
                if let Some((c, _)) = m.copying.take() {
                    m.dirty.add(c..c + 1);
                }
                m.recent = None;
                for p in self.pending.values_mut() {
                    // Also what it has but another member may still lack: see `drop_leavers`.
                    if p.extra.remove(&n) || !p.completed {
                        m.dirty.add(p.chunks.clone());
                    }
                }
                let seqs: Vec<Seq> = self.pending.keys().copied().collect();
                for s in seqs {
                    self.settle(s);
                }
                self.release_deferred_soon();
                // Its chunk lock is free: move on the members that skipped that chunk.
                self.advance_copies();
            }
            MemberState::Leaving | MemberState::Out => {}
        }
    }

    /// The ISR this primary wants: itself and every member that gates writes, except those
    /// leaving; while reconciling, also the committed members still being reconciled (they
    /// leave only if they fail).
    pub(super) fn desired_isr(&self) -> BTreeSet<NodeId> {
        let reconciling = self.phase == Phase::Reconciling;
        let mut isr = BTreeSet::from([self.me]);
        for (&n, m) in &self.members {
            let keep = match m.state {
                MemberState::InSync => true,
                // Level with the primary only once every write sent before it gated writes
                // is acknowledged (I5); and proposed only once every write sequenced before
                // that is complete, i.e. on every member that gates it. Its grow declares it
                // level (its recent log complete), but the copies it received may have pushed
                // out of its log a write it applied that another ISR member still lacks:
                // were the primary to die then, neither log would show where the two differ
                // (I4). Writes sequenced later gate on it and stay in its log.
                MemberState::Joining => {
                    self.committed_isr.contains(&n)
                        || !self.pending.range(..m.joined_at).any(|(_, p)| !p.completed || p.extra.contains(&n))
                }
                MemberState::Opening | MemberState::Syncing => reconciling && self.committed_isr.contains(&n),
                MemberState::Leaving | MemberState::Out => false,
            };
            if keep {
                isr.insert(n);
            }
        }
        isr
    }

    pub(super) fn propose(&mut self) {
        if self.phase == Phase::Deposed || self.proposing.is_some() {
            return;
        }
        let desired = self.desired_isr();
        if desired != self.committed_isr {
            self.outputs.push_back(Output::ProposeIsr { isr: desired.iter().copied().collect() });
            self.proposing = Some(desired);
        }
    }

    /// The ISR proposal was committed.
    pub fn on_isr_committed(&mut self, isr: &[NodeId]) {
        let isr: BTreeSet<NodeId> = isr.iter().copied().collect();
        self.proposing = None;
        self.committed_isr = isr.clone();
        for (&n, m) in self.members.iter_mut() {
            if m.state == MemberState::Joining && isr.contains(&n) {
                m.state = MemberState::InSync;
                self.outputs.push_back(Output::Progress { node: n, done_chunks: 0, total_chunks: 0 });
            }
        }
        self.drop_leavers();
        self.propose();
        self.maybe_finish_reconcile();
    }

    /// Failed members that are neither in the committed ISR nor in a proposal that may still
    /// commit stop gating writes: no shrink has to commit for them to go (a member that failed
    /// while `Joining` before its grow committed). The writes they held back are released and
    /// what they miss is remembered as dirty, and so is every write not yet complete, even one
    /// they acknowledged: if they restarted, their recent log forgot it, and when they are back
    /// in the ISR only the copy of that chunk (recorded in their log) still shows where they
    /// may differ from a member that has not received it yet.
    pub(super) fn drop_leavers(&mut self) {
        let mut released = Vec::new();
        for (&n, m) in self.members.iter_mut() {
            let may_be_in_isr =
                self.committed_isr.contains(&n) || self.proposing.as_ref().is_some_and(|p| p.contains(&n));
            if m.state != MemberState::Leaving || may_be_in_isr {
                continue;
            }
            m.state = MemberState::Out;
            for (&s, p) in self.pending.iter_mut() {
                let gated = p.need.remove(&n);
                // Sent to it before it gated writes (it was `Joining` with these still
                // unacknowledged): completed or not, it may lack them.
                let sent = p.extra.remove(&n);
                if gated || sent {
                    released.push(s);
                }
                if sent || !p.completed {
                    m.dirty.add(p.chunks.clone());
                }
            }
        }
        for s in released {
            self.settle(s);
        }
    }

    /// The ISR proposal was refused because the epoch moved on: this primary is deposed.
    pub fn on_isr_refused(&mut self, reason: &str) {
        self.depose(&format!("the volume's configuration moved on: {reason}"));
    }

    /// The proposal could not be carried out (no Raft leader reachable); it is made again on
    /// the next tick. Call it only when the proposal is known not to have committed: a
    /// proposal that may still commit must be answered with its outcome.
    pub fn on_isr_unavailable(&mut self) {
        self.proposing = None;
        self.drop_leavers();
        self.maybe_finish_reconcile();
    }

    /// Periodic: declares members failed that sit on a write for longer than the ack
    /// timeout, and retries an ISR proposal that could not be made.
    pub fn on_tick(&mut self, now: Instant) {
        if self.phase == Phase::Deposed {
            return;
        }
        self.now = self.now.max(now);
        let mut late = BTreeSet::new();
        let syncing_timeout = self.config.ack_timeout * SYNCING_ACK_TIMEOUT_FACTOR;
        for p in self.pending.values() {
            let age = now.saturating_duration_since(p.sent_at);
            if age >= self.config.ack_timeout {
                late.extend(p.need.iter().copied().filter(|&n| n != self.me));
            }
            if age >= syncing_timeout {
                late.extend(p.extra.iter().copied());
            }
        }
        for n in late {
            self.on_member_failed(n);
        }
        self.propose();
    }
}
