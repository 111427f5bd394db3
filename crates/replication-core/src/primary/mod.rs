//! [`Primary`]: the primary of one volume for one epoch. This file holds its state, its
//! construction, what the driver may ask of it and how it steps down; the inputs are split by
//! job: `writes` (sequencing, acks, held-back writes), `membership` (failures, the ISR and
//! its proposals, the tick) and `copies` (resync and reconciliation).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use tandem_types::chaos_bugs::Bugs;
use tandem_types::{Epoch, NodeId, Seq, VolumeId};

use crate::member::{Dirty, Member, MemberState};
use crate::output::{Output, Phase};
#[cfg(doc)]
use crate::RecentLog;
use crate::{Token, CHUNK_BYTES, INFLIGHT_WRITES_MAX};

mod copies;
mod membership;
mod writes;

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

#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// A member that has not acknowledged a write for this long is declared failed.
    pub ack_timeout: Duration,
    /// Planted bugs this primary runs with (`chaos-bugs`; always empty without the feature).
    pub bugs: Bugs,
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
            next_seq: Seq(1),
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
}
