//! The replication protocol as deterministic state machines: no I/O, no clock, no tokio.
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use tandem_types::{Epoch, NodeId, Seq, VolumeId, BLOCK_BYTES};

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

/// Chunks a member still has to receive: explicit ones, plus a range still to be scanned
/// (the whole volume when nothing better is known).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Dirty {
    chunks: BTreeSet<u64>,
    scan: Range<u64>,
}

impl Dirty {
    fn all(chunks_total: u64) -> Dirty {
        Dirty { chunks: BTreeSet::new(), scan: 0..chunks_total }
    }

    fn add(&mut self, r: Range<u64>) {
        for c in r {
            if !self.scan.contains(&c) {
                self.chunks.insert(c);
            }
        }
    }

    fn next(&mut self) -> Option<u64> {
        if let Some(c) = self.chunks.pop_first() {
            return Some(c);
        }
        let c = self.scan.next()?;
        Some(c)
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.scan.is_empty()
    }

    fn count(&self) -> u64 {
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
    fn gates_writes(self) -> bool {
        matches!(self, MemberState::InSync | MemberState::Leaving | MemberState::Joining)
    }

    /// Whether new writes are sent to this member.
    fn receives_writes(self) -> bool {
        matches!(self, MemberState::InSync | MemberState::Leaving | MemberState::Syncing | MemberState::Joining)
    }
}

#[derive(Clone, Debug)]
struct Member {
    state: MemberState,
    dirty: Dirty,
    /// The chunk being copied to it, if any, and whether the copy was handed to the driver
    /// (it waits first for writes in flight to that chunk to be acknowledged).
    copying: Option<(u64, bool)>,
    /// Chunks copied since the current resync began; bytes are reported by the driver.
    chunks_done: u64,
    chunks_total: u64,
    /// The reconciliation ranges this member reported, until every member has reported.
    recent: Option<Option<Vec<(u64, u64)>>>,
    /// The first sequence number of its current session (the `start_seq` of the last `Open`):
    /// a refusal of an earlier record is about a session that is over.
    session_start: Seq,
    /// The sequence number of the first write that gated on it as `Joining`: its grow waits
    /// until every write before it is complete.
    joined_at: Seq,
}

impl Member {
    fn new(state: MemberState, dirty: Dirty) -> Member {
        Member {
            state,
            dirty,
            copying: None,
            chunks_done: 0,
            chunks_total: 0,
            recent: None,
            session_start: 0,
            joined_at: 0,
        }
    }
}

#[derive(Clone, Debug)]
struct PendingWrite {
    token: Token,
    chunks: Range<u64>,
    /// Must acknowledge before the write completes (includes the primary itself).
    need: BTreeSet<NodeId>,
    /// Were sent the write but do not gate it (syncing members).
    extra: BTreeSet<NodeId>,
    completed: bool,
    sent_at: Instant,
}

#[derive(Clone, Debug)]
struct DeferredWrite {
    token: Token,
    offset: u64,
    len: u64,
}

/// The primary's life cycle in one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Making the surviving ISR members identical before serving (I4).
    Reconciling,
    Serving,
    /// A newer epoch exists or the local store failed: it serves nothing more.
    Deposed,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Apply host write `token` locally as sequence `seq` (before handling any later output),
    /// then send it to `to`. Report local durability with `on_local_durable(seq)`.
    Write { token: Token, seq: Seq, to: Vec<NodeId> },
    /// Every member that gates it has the write durable: acknowledge the host.
    Complete { token: Token },
    /// The write will not complete here (the primary was deposed): fail it to the host.
    Fail { token: Token, reason: String },
    /// Send `Open` to a member; answer with `on_opened` or `on_member_failed`.
    Open { to: NodeId, start_seq: Seq },
    /// Make chunk `chunk` of `to` identical to the local copy (compare checksums, send what
    /// differs, wait until durable there). Every earlier write to the chunk has been output
    /// already and later ones are held back until `on_copied`, so the driver may read the
    /// local data at any time before it answers. The member records the chunk with [`RecentLog::record_copy`] before it
    /// answers. Answer with `on_copied` or `on_member_failed`.
    Copy { to: NodeId, chunk: u64 },
    /// Propose the ISR `isr` for this epoch through Raft; answer with `on_isr_committed`,
    /// `on_isr_refused` (a newer epoch: deposed) or `on_isr_unavailable` (try again).
    ProposeIsr { isr: Vec<NodeId> },
    /// Report resync progress of `node` (chunks done of total) for display.
    Progress { node: NodeId, done_chunks: u64, total_chunks: u64 },
    /// Reconciliation is done: host I/O may be served.
    Serving,
}

#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// A member that has not acknowledged a write for this long is declared failed.
    pub ack_timeout: Duration,
}

/// The primary of one volume for one epoch.
pub struct Primary {
    volume: VolumeId,
    me: NodeId,
    epoch: Epoch,
    chunks_total: u64,
    config: PrimaryConfig,
    phase: Phase,
    committed_isr: BTreeSet<NodeId>,
    members: BTreeMap<NodeId, Member>,
    next_seq: Seq,
    pending: BTreeMap<Seq, PendingWrite>,
    deferred: VecDeque<DeferredWrite>,
    /// The ISR proposal in flight, if any.
    proposing: Option<BTreeSet<NodeId>>,
    own_recent: Option<Vec<(u64, u64)>>,
    /// The latest time an input carried; writes released from the held-back queue start
    /// their ack clock at it.
    now: Instant,
    outputs: VecDeque<Output>,
}

impl Primary {
    /// Takes over a volume as primary of `epoch`. `isr` is the committed ISR (it contains
    /// `me`); `replicas` every node holding a copy. `own_recent` is this node's
    /// [`RecentLog::ranges`]. Every other ISR member is opened and reconciled before serving.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        now: Instant,
        volume: VolumeId,
        me: NodeId,
        epoch: Epoch,
        size_bytes: u64,
        replicas: &[NodeId],
        isr: &[NodeId],
        own_recent: Option<Vec<(u64, u64)>>,
        config: PrimaryConfig,
    ) -> Primary {
        assert!(isr.contains(&me), "a primary is always in its own ISR");
        let chunks_total = size_bytes.div_ceil(CHUNK_BYTES);
        let mut p = Primary {
            volume,
            me,
            epoch,
            chunks_total,
            config,
            phase: Phase::Reconciling,
            committed_isr: isr.iter().copied().collect(),
            members: BTreeMap::new(),
            next_seq: 1,
            pending: BTreeMap::new(),
            deferred: VecDeque::new(),
            proposing: None,
            own_recent,
            now,
            outputs: VecDeque::new(),
        };
        for &n in replicas.iter().filter(|&&n| n != me) {
            if isr.contains(&n) {
                let mut m = Member::new(MemberState::Opening, Dirty::default());
                m.session_start = p.next_seq;
                p.members.insert(n, m);
                p.outputs.push_back(Output::Open { to: n, start_seq: p.next_seq });
            } else {
                // What an out-of-sync replica lacks is unknown to a new primary: compare all.
                p.members.insert(n, Member::new(MemberState::Out, Dirty::all(chunks_total)));
            }
        }
        p.maybe_finish_reconcile();
        p
    }

    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn committed_isr(&self) -> Vec<NodeId> {
        self.committed_isr.iter().copied().collect()
    }

    pub fn member_state(&self, n: NodeId) -> Option<MemberState> {
        self.members.get(&n).map(|m| m.state)
    }

    /// Members that are out of sync and not being resynced: candidates for `start_resync`.
    pub fn out_members(&self) -> Vec<NodeId> {
        self.members.iter().filter(|(_, m)| m.state == MemberState::Out).map(|(&n, _)| n).collect()
    }

    /// Writes in flight (sequenced, not yet acknowledged by every member they were sent to).
    pub fn inflight(&self) -> usize {
        self.pending.len()
    }

    /// Whether another write may be submitted now without exceeding the in-flight bound.
    pub fn has_room(&self) -> bool {
        self.pending.len() + self.deferred.len() < INFLIGHT_WRITES_MAX
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

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

    fn locked_chunks(&self) -> BTreeSet<u64> {
        self.members.values().filter_map(|m| m.copying.map(|(c, _)| c)).collect()
    }

    fn must_defer(&self, w: &DeferredWrite) -> bool {
        let locked = self.locked_chunks();
        let chunks = chunks_of(w.offset, w.len);
        chunks.clone().any(|c| locked.contains(&c))
            || self.deferred.iter().any(|d| {
                let dc = chunks_of(d.offset, d.len);
                dc.start < chunks.end && chunks.start < dc.end
            })
    }

    fn sequence(&mut self, now: Instant, w: DeferredWrite) {
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

    fn acked(&mut self, from: NodeId, seq: Seq) {
        let Some(p) = self.pending.get_mut(&seq) else { return };
        p.need.remove(&from);
        p.extra.remove(&from);
        self.settle(seq);
        self.advance_copies();
    }

    /// Completes a write whose gating members all have it, and forgets it once nobody it was
    /// sent to is still to answer.
    fn settle(&mut self, seq: Seq) {
        let Some(p) = self.pending.get_mut(&seq) else { return };
        if p.need.is_empty() && !p.completed {
            p.completed = true;
            self.outputs.push_back(Output::Complete { token: p.token });
        }
        if p.completed && p.extra.is_empty() {
            self.pending.remove(&seq);
        }
    }

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
    fn desired_isr(&self) -> BTreeSet<NodeId> {
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

    fn propose(&mut self) {
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
    fn drop_leavers(&mut self) {
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

    /// Stops serving: fails every write in flight. The driver calls it when the cluster map
    /// shows a newer epoch, when the local store fails, or when shutting down.
    pub fn depose(&mut self, reason: &str) {
        if self.phase == Phase::Deposed {
            return;
        }
        self.phase = Phase::Deposed;
        for (_, p) in std::mem::take(&mut self.pending) {
            if !p.completed {
                self.outputs.push_back(Output::Fail { token: p.token, reason: reason.to_string() });
            }
        }
        for d in std::mem::take(&mut self.deferred) {
            self.outputs.push_back(Output::Fail { token: d.token, reason: reason.to_string() });
        }
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

    fn maybe_start_reconcile_copies(&mut self) {
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
    fn advance_copies(&mut self) {
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

    /// Moves held-back writes whose chunks are free again into the sequence, in order.
    fn release_deferred_soon(&mut self) {
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

    fn maybe_finish_reconcile(&mut self) {
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

/// Why a replica refused a record or request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("epoch {got} is older than the epoch {known} this replica knows")]
    StaleEpoch { got: Epoch, known: Epoch },
    #[error("no replication session is open for epoch {epoch} from node {from}")]
    NoSession { from: NodeId, epoch: Epoch },
    #[error("sequence {got} does not follow {last}")]
    OutOfOrder { got: Seq, last: Seq },
}

/// A replica's acceptance rules for one volume: it follows exactly one primary session at a
/// time, opened with [`Backup::on_open`], and refuses anything from an older epoch (I2).
#[derive(Clone, Debug, Default)]
pub struct Backup {
    known_epoch: Epoch,
    /// The primary, epoch and last accepted sequence of the open session.
    session: Option<(NodeId, Epoch, Seq)>,
}

impl Backup {
    /// The epoch and primary that the committed cluster map shows.
    pub fn on_epoch(&mut self, epoch: Epoch) {
        if epoch > self.known_epoch {
            self.known_epoch = epoch;
        }
        if let Some((_, e, _)) = self.session {
            if e < self.known_epoch {
                self.session = None;
            }
        }
    }

    pub fn known_epoch(&self) -> Epoch {
        self.known_epoch
    }

    pub fn on_open(&mut self, from: NodeId, epoch: Epoch, start_seq: Seq) -> Result<(), Refusal> {
        if epoch < self.known_epoch {
            return Err(Refusal::StaleEpoch { got: epoch, known: self.known_epoch });
        }
        self.known_epoch = epoch;
        self.session = Some((from, epoch, start_seq.saturating_sub(1)));
        Ok(())
    }

    /// Checks a record (or a chunk, with `seq` = None) against the open session.
    pub fn check(&mut self, from: NodeId, epoch: Epoch, seq: Option<Seq>) -> Result<(), Refusal> {
        if epoch < self.known_epoch {
            return Err(Refusal::StaleEpoch { got: epoch, known: self.known_epoch });
        }
        match &mut self.session {
            Some((p, e, last)) if *p == from && *e == epoch => {
                if let Some(s) = seq {
                    if s <= *last {
                        return Err(Refusal::OutOfOrder { got: s, last: *last });
                    }
                    *last = s;
                }
                Ok(())
            }
            _ => Err(Refusal::NoSession { from, epoch }),
        }
    }

    /// Forgets the session (the volume was deleted or the node is stopping).
    pub fn close(&mut self) {
        self.session = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PrimaryConfig {
        PrimaryConfig { ack_timeout: Duration::from_secs(1) }
    }

    fn drain(p: &mut Primary) -> Vec<Output> {
        std::iter::from_fn(|| p.poll_output()).collect()
    }

    /// A 3-replica volume whose primary (1) has reconciled with 2 and 3 (nothing recent).
    fn serving() -> (Primary, Instant) {
        let now = Instant::now();
        let mut p = Primary::new(now, 9, 1, 2, 8 * CHUNK_BYTES, &[1, 2, 3], &[1, 2, 3], Some(vec![]), cfg());
        assert_eq!(drain(&mut p), vec![Output::Open { to: 2, start_seq: 1 }, Output::Open { to: 3, start_seq: 1 }]);
        p.on_opened(2, Some(vec![]));
        p.on_opened(3, Some(vec![]));
        let out = drain(&mut p);
        assert!(out.contains(&Output::Serving), "{out:?}");
        assert_eq!(p.phase(), Phase::Serving);
        (p, now)
    }

    #[test]
    fn a_write_completes_only_when_every_isr_member_has_it() {
        let (mut p, now) = serving();
        p.on_write(now, 100, 0, 4096);
        assert_eq!(drain(&mut p), vec![Output::Write { token: 100, seq: 1, to: vec![2, 3] }]);
        p.on_ack(2, 1);
        p.on_local_durable(1);
        assert!(drain(&mut p).is_empty());
        p.on_ack(3, 1);
        assert_eq!(drain(&mut p), vec![Output::Complete { token: 100 }]);
        assert_eq!(p.inflight(), 0);
    }

    #[test]
    fn a_failed_backup_releases_writes_only_after_the_shrink_commits() {
        let (mut p, now) = serving();
        p.on_write(now, 1, 0, 4096);
        drain(&mut p);
        p.on_local_durable(1);
        p.on_ack(2, 1);
        p.on_tick(now + Duration::from_secs(2));
        assert_eq!(drain(&mut p), vec![Output::ProposeIsr { isr: vec![1, 2] }]);
        assert_eq!(p.member_state(3), Some(MemberState::Leaving));
        // Nothing completes while the shrink is only proposed (I3).
        p.on_tick(now + Duration::from_secs(3));
        assert!(drain(&mut p).is_empty());
        p.on_isr_committed(&[1, 2]);
        assert_eq!(drain(&mut p), vec![Output::Complete { token: 1 }]);
        assert_eq!(p.member_state(3), Some(MemberState::Out));
        // Later writes are not sent to 3, and its chunks are remembered as dirty.
        p.on_write(now, 2, 5 * CHUNK_BYTES, 10);
        assert_eq!(drain(&mut p), vec![Output::Write { token: 2, seq: 2, to: vec![2] }]);
    }

    #[test]
    fn resync_copies_only_dirty_chunks_and_then_rejoins() {
        let (mut p, now) = serving();
        p.on_member_failed(3);
        drain(&mut p);
        p.on_isr_committed(&[1, 2]);
        p.on_write(now, 1, 2 * CHUNK_BYTES, 4096);
        p.on_write(now, 2, 6 * CHUNK_BYTES + 10, 4096);
        drain(&mut p);
        for s in [1, 2] {
            p.on_local_durable(s);
            p.on_ack(2, s);
        }
        drain(&mut p);
        p.start_resync(3);
        assert_eq!(drain(&mut p), vec![Output::Open { to: 3, start_seq: 3 }]);
        p.on_opened(3, None);
        let out = drain(&mut p);
        assert!(out.contains(&Output::Copy { to: 3, chunk: 2 }), "{out:?}");
        // A write to the chunk being copied waits; one elsewhere goes through, to 3 as well.
        p.on_write(now, 3, 2 * CHUNK_BYTES, 512);
        p.on_write(now, 4, 0, 512);
        assert_eq!(drain(&mut p), vec![Output::Write { token: 4, seq: 3, to: vec![2, 3] }]);
        p.on_copied(3, 2);
        let out = drain(&mut p);
        assert!(out.contains(&Output::Write { token: 3, seq: 4, to: vec![2, 3] }), "{out:?}");
        assert!(out.contains(&Output::Copy { to: 3, chunk: 6 }), "{out:?}");
        p.on_copied(3, 6);
        let out = drain(&mut p);
        assert_eq!(p.member_state(3), Some(MemberState::Joining), "nothing left to copy: new writes wait for 3");
        assert!(
            !out.iter().any(|o| matches!(o, Output::ProposeIsr { .. })),
            "no grow while writes sent to 3 are unacknowledged: {out:?}"
        );
        // A new write gates on 3 now: it completes only with 3's ack.
        p.on_write(now, 5, 0, 512);
        assert_eq!(drain(&mut p), vec![Output::Write { token: 5, seq: 5, to: vec![2, 3] }]);
        p.on_local_durable(5);
        p.on_ack(2, 5);
        assert!(!drain(&mut p).contains(&Output::Complete { token: 5 }), "write 5 waits for the joining member");
        for s in [3, 4] {
            p.on_local_durable(s);
            p.on_ack(2, s);
            p.on_ack(3, s);
        }
        let out = drain(&mut p);
        assert!(out.contains(&Output::ProposeIsr { isr: vec![1, 2, 3] }), "{out:?}");
        p.on_ack(3, 5);
        assert!(drain(&mut p).contains(&Output::Complete { token: 5 }));
        p.on_isr_committed(&[1, 2, 3]);
        assert_eq!(p.member_state(3), Some(MemberState::InSync));
    }

    #[test]
    fn a_refusal_of_a_record_from_before_the_current_open_does_not_fail_the_member() {
        let (mut p, now) = serving();
        p.on_write(now, 1, 0, 4096);
        assert_eq!(drain(&mut p), vec![Output::Write { token: 1, seq: 1, to: vec![2, 3] }]);
        // 3 stops answering and leaves; the shrink commits.
        p.on_member_failed(3);
        drain(&mut p);
        p.on_isr_committed(&[1, 2]);
        p.on_local_durable(1);
        p.on_ack(2, 1);
        drain(&mut p);
        p.start_resync(3);
        assert_eq!(drain(&mut p), vec![Output::Open { to: 3, start_seq: 2 }]);
        p.on_opened(3, None);
        drain(&mut p);
        assert_eq!(p.member_state(3), Some(MemberState::Syncing));
        // The old record 1 reaches 3 after the Open and is refused: the new session goes on.
        p.on_member_refused(3, 1);
        assert_eq!(p.member_state(3), Some(MemberState::Syncing));
        // A refusal within the new session does fail it.
        p.on_write(now, 2, 0, 4096);
        drain(&mut p);
        p.on_member_refused(3, 2);
        assert_eq!(p.member_state(3), Some(MemberState::Out));
    }

    #[test]
    fn a_new_primary_reconciles_the_union_of_recent_writes_before_serving() {
        let mut p =
            Primary::new(Instant::now(), 9, 2, 3, 8 * CHUNK_BYTES, &[1, 2, 3], &[2, 3], Some(vec![(0, 4096)]), cfg());
        assert_eq!(drain(&mut p), vec![Output::Open { to: 3, start_seq: 1 }]);
        assert_eq!(p.member_state(1), Some(MemberState::Out));
        p.on_opened(3, Some(vec![(3 * CHUNK_BYTES, 8192)]));
        let out = drain(&mut p);
        assert!(out.contains(&Output::Copy { to: 3, chunk: 0 }), "{out:?}");
        assert!(!out.contains(&Output::Serving));
        p.on_copied(3, 0);
        let out = drain(&mut p);
        assert!(out.contains(&Output::Copy { to: 3, chunk: 3 }), "{out:?}");
        p.on_copied(3, 3);
        let out = drain(&mut p);
        assert!(out.contains(&Output::Serving), "{out:?}");
    }

    #[test]
    fn a_member_that_cannot_tell_what_it_wrote_is_compared_everywhere() {
        let mut p = Primary::new(Instant::now(), 9, 2, 3, 3 * CHUNK_BYTES, &[2, 3], &[2, 3], Some(vec![]), cfg());
        drain(&mut p);
        p.on_opened(3, None);
        let mut copied = Vec::new();
        loop {
            let out = drain(&mut p);
            if out.contains(&Output::Serving) {
                break;
            }
            let Some(Output::Copy { chunk, .. }) = out.into_iter().find(|o| matches!(o, Output::Copy { .. })) else {
                panic!("reconciliation stalled")
            };
            copied.push(chunk);
            p.on_copied(3, chunk);
        }
        assert_eq!(copied, vec![0, 1, 2]);
    }

    #[test]
    fn a_refused_proposal_deposes_and_fails_what_is_in_flight() {
        let (mut p, now) = serving();
        p.on_write(now, 7, 0, 1);
        p.on_member_failed(2);
        drain(&mut p);
        p.on_isr_refused("epoch 3 exists");
        assert_eq!(p.phase(), Phase::Deposed);
        let out = drain(&mut p);
        assert!(matches!(out.as_slice(), [Output::Fail { token: 7, .. }]), "{out:?}");
    }

    #[test]
    fn backups_fence_older_epochs_and_foreign_primaries() {
        let mut b = Backup::default();
        b.on_epoch(2);
        assert!(matches!(b.on_open(1, 1, 1), Err(Refusal::StaleEpoch { .. })));
        b.on_open(3, 2, 5).expect("opens");
        b.check(3, 2, Some(5)).expect("in order");
        assert!(matches!(b.check(3, 2, Some(5)), Err(Refusal::OutOfOrder { .. })));
        assert!(matches!(b.check(1, 2, Some(6)), Err(Refusal::NoSession { .. })));
        b.on_epoch(3);
        assert!(matches!(b.check(3, 2, Some(6)), Err(Refusal::StaleEpoch { .. })));
    }

    #[test]
    fn a_member_failing_during_reconciliation_leaves_only_through_a_committed_shrink() {
        let now = Instant::now();
        let mut p = Primary::new(now, 9, 1, 2, 8 * CHUNK_BYTES, &[1, 2, 3], &[1, 2, 3], Some(vec![]), cfg());
        drain(&mut p);
        // Reconciling members are not proposed out on a tick.
        p.on_tick(now + Duration::from_secs(5));
        assert!(drain(&mut p).is_empty());
        p.on_opened(2, Some(vec![]));
        p.on_member_failed(3);
        let out = drain(&mut p);
        assert!(out.contains(&Output::ProposeIsr { isr: vec![1, 2] }), "{out:?}");
        assert!(!out.contains(&Output::Serving), "{out:?}");
        assert_eq!(p.member_state(3), Some(MemberState::Leaving));
        assert_eq!(p.phase(), Phase::Reconciling);
        p.on_isr_committed(&[1, 2]);
        assert!(drain(&mut p).contains(&Output::Serving));
        assert_eq!(p.member_state(3), Some(MemberState::Out));
    }

    #[test]
    fn a_reconciled_member_is_declared_level_only_when_reconciliation_finishes() {
        let now = Instant::now();
        let mut p = Primary::new(now, 9, 1, 2, 2 * CHUNK_BYTES, &[1, 2, 3], &[1, 2, 3], None, cfg());
        drain(&mut p);
        p.on_opened(2, Some(vec![]));
        p.on_opened(3, Some(vec![]));
        let out = drain(&mut p);
        assert!(out.contains(&Output::Copy { to: 2, chunk: 0 }), "{out:?}");
        // 3 fails: its removal is proposed. 2 receives every chunk meanwhile.
        p.on_member_failed(3);
        assert!(drain(&mut p).contains(&Output::ProposeIsr { isr: vec![1, 2] }));
        p.on_copied(2, 0);
        drain(&mut p);
        p.on_copied(2, 1);
        let out = drain(&mut p);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Progress { node: 2, total_chunks: 0, .. })),
            "2 is not declared level while 3, still in the committed ISR, may differ from it: {out:?}"
        );
        assert_eq!(p.member_state(2), Some(MemberState::Syncing));
        p.on_isr_committed(&[1, 2]);
        let out = drain(&mut p);
        let level = out.iter().position(|o| *o == Output::Progress { node: 2, done_chunks: 0, total_chunks: 0 });
        let serving = out.iter().position(|o| *o == Output::Serving);
        assert!(level.is_some() && serving.is_some() && level < serving, "{out:?}");
        assert_eq!(p.member_state(2), Some(MemberState::InSync));
    }

    #[test]
    fn a_grow_waits_until_writes_sequenced_before_the_member_gated_writes_are_complete() {
        let (mut p, now) = serving();
        p.on_member_failed(3);
        drain(&mut p);
        p.on_isr_committed(&[1, 2]);
        p.on_write(now, 1, 5 * CHUNK_BYTES, 4096);
        assert_eq!(drain(&mut p), vec![Output::Write { token: 1, seq: 1, to: vec![2] }]);
        p.on_local_durable(1);
        p.on_ack(2, 1);
        drain(&mut p);
        p.start_resync(3);
        p.on_opened(3, Some(vec![]));
        assert!(drain(&mut p).contains(&Output::Copy { to: 3, chunk: 5 }));
        // Sent to 3 while it resyncs; 2 has not acknowledged it yet.
        p.on_write(now, 2, 6 * CHUNK_BYTES, 4096);
        assert_eq!(drain(&mut p), vec![Output::Write { token: 2, seq: 2, to: vec![2, 3] }]);
        p.on_local_durable(2);
        p.on_ack(3, 2);
        p.on_copied(3, 5);
        let out = drain(&mut p);
        assert_eq!(p.member_state(3), Some(MemberState::Joining));
        assert!(
            !out.iter().any(|o| matches!(o, Output::ProposeIsr { .. })),
            "write 2 is not on 2 yet, and 3's log may have lost it: no grow: {out:?}"
        );
        p.on_ack(2, 2);
        let out = drain(&mut p);
        assert!(out.contains(&Output::ProposeIsr { isr: vec![1, 2, 3] }), "{out:?}");
    }

    #[test]
    fn a_member_that_skipped_a_chunk_gets_it_when_the_member_copying_it_fails() {
        let mut p = Primary::new(Instant::now(), 9, 1, 2, 2 * CHUNK_BYTES, &[1, 2, 3], &[1, 2, 3], None, cfg());
        drain(&mut p);
        p.on_opened(2, Some(vec![]));
        p.on_opened(3, Some(vec![]));
        drain(&mut p);
        p.on_copied(3, 0);
        assert!(drain(&mut p).contains(&Output::Copy { to: 3, chunk: 1 }));
        p.on_copied(2, 0);
        let out = drain(&mut p);
        assert!(!out.iter().any(|o| matches!(o, Output::Copy { to: 2, .. })), "3 holds chunk 1: {out:?}");
        // 3 fails holding the chunk: nothing else (no write, no ack) will come to move 2 on.
        p.on_member_failed(3);
        let out = drain(&mut p);
        assert!(out.contains(&Output::Copy { to: 2, chunk: 1 }), "{out:?}");
        p.on_copied(2, 1);
        p.on_isr_committed(&[1, 2]);
        assert!(drain(&mut p).contains(&Output::Serving));
    }

    #[test]
    fn a_joining_member_that_fails_before_its_grow_commits_stops_gating_writes() {
        let (mut p, now) = serving();
        p.on_member_failed(3);
        drain(&mut p);
        p.on_isr_committed(&[1, 2]);
        p.start_resync(3);
        p.on_opened(3, Some(vec![]));
        assert!(drain(&mut p).contains(&Output::ProposeIsr { isr: vec![1, 2, 3] }));
        p.on_isr_unavailable();
        p.on_member_failed(3);
        assert_eq!(p.member_state(3), Some(MemberState::Out));
        p.on_write(now, 1, 0, 4096);
        assert_eq!(drain(&mut p), vec![Output::Write { token: 1, seq: 1, to: vec![2] }]);
        p.on_local_durable(1);
        p.on_ack(2, 1);
        assert_eq!(drain(&mut p), vec![Output::Complete { token: 1 }]);
    }

    #[test]
    fn recent_log_keeps_entries_when_marked_complete_and_copies_never_push_out_silently() {
        let mut log = RecentLog::after_restart().with_entries_max(2);
        log.record(0, 4096);
        log.mark_complete();
        assert_eq!(log.ranges(), Some(vec![(0, 4096)]));
        log.record(8192, 4096);
        log.record(16384, 4096);
        assert_eq!(log.ranges(), Some(vec![(8192, 4096), (16384, 4096)]), "writes age out");
        log.record_copy(CHUNK_BYTES, CHUNK_BYTES);
        assert_eq!(log.ranges(), None, "a copy pushed out an entry");
        log.mark_complete();
        log.record_copy(2 * CHUNK_BYTES, CHUNK_BYTES);
        log.record(0, 1);
        assert_eq!(log.ranges(), None, "a copy entry was pushed out");
    }

    #[test]
    fn chunk_ranges() {
        assert_eq!(chunks_of(0, 1), 0..1);
        assert_eq!(chunks_of(CHUNK_BYTES - 1, 2), 0..2);
        assert_eq!(chunks_of(CHUNK_BYTES, CHUNK_BYTES), 1..2);
        let mut log = RecentLog::fresh();
        log.record(100, 10);
        assert_eq!(log.ranges(), Some(vec![(0, 4096)]));
        assert_eq!(RecentLog::after_restart().ranges(), None);
    }
}
