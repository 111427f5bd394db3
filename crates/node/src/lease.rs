//! Leases and failure detection: how a primary knows it may still serve, and how the cluster
//! decides that a primary is gone.
//!
//! Every node asks the Raft leader for a lease every [`RENEW_EVERY`] on the `probe` channel.
//! The leader answers only after confirming with a majority that it still leads, and notes
//! when it last heard from each node. A node's lease lasts [`LEASE`] from the moment it *sent*
//! the granted request; the leader declares a node failed only after [`FAILURE_TIMEOUT`]
//! without hearing from it, measured from when it *received* the request. As `LEASE <
//! FAILURE_TIMEOUT`, a primary's lease has ended before anyone can replace it (I2), even if
//! clocks run at slightly different rates.
//!
//! A leader that just took over knows nothing of the past. The leases the previous leader
//! granted were granted after a majority confirmed it; at least one node of that majority voted
//! for the new leader, and a node votes only after an election timeout without hearing from the
//! old leader. So every lease the old leader granted was sent at least
//! `election_timeout_min` before the new leader took over, and has ended by
//! `LEASE - election_timeout_min` after it. A new leader therefore treats a node it has not
//! heard from as failed only after [`takeover_grace`]: that bound plus [`DRIFT_MARGIN`], and
//! never less than the margin, so every live node has renewed with it first.
//!
//! This file keeps the lease and the leader's record of whom it heard from; the failover
//! supervisor that acts on that record is `failover.rs`, and the probe channel's handler that
//! passes lease requests here is `probe_answer.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_meta::store::MetaStore;
use tandem_transport::Transport;
use tandem_types::NodeId;
use tandem_wire::data::{ProbeMsg, ProbeReply};

use crate::probe::probe_call;

/// How long a granted lease lasts, from when its request was sent.
pub const LEASE: Duration = Duration::from_millis(1500);
/// How long the leader waits without hearing from a node before it fails the node's volumes
/// over. Must exceed [`LEASE`] by more than the clock drift over that span.
pub const FAILURE_TIMEOUT: Duration = Duration::from_millis(2500);
/// How often a node renews its lease: several renewals per lease, so one lost request does
/// not cost the lease.
pub const RENEW_EVERY: Duration = Duration::from_millis(250);
/// Allowance for clocks running at different rates and for messages in flight.
pub const DRIFT_MARGIN: Duration = Duration::from_millis(500);

// I2: a lease has ended, with room for drift, before the leader may fail its holder over.
const _: () = assert!(LEASE.as_millis() + DRIFT_MARGIN.as_millis() <= FAILURE_TIMEOUT.as_millis());
// Several renewals per lease, so one lost request does not cost the lease.
const _: () = assert!(RENEW_EVERY.as_millis() * 4 <= LEASE.as_millis());

/// How long a new leader waits before it may fail over a node it has not heard from.
pub fn takeover_grace(election_timeout_min: Duration) -> Duration {
    LEASE.saturating_sub(election_timeout_min).max(RENEW_EVERY * 2) + DRIFT_MARGIN
}

/// How long one renewal may take before it counts as failed.
const RENEW_TIMEOUT: Duration = Duration::from_millis(1000);

/// On the leader: when it last heard from each node, and the nodes a failover is being
/// committed for (with how many such failovers are in flight). One lock for both: a grant and
/// a failover decision about the same node are ordered by it.
#[derive(Default)]
struct Heard {
    at: HashMap<NodeId, Instant>,
    condemned: HashMap<NodeId, usize>,
}

/// This node's lease and, when it leads, what it heard from the others.
pub struct Leases {
    me: NodeId,
    meta: Arc<MetaStore>,
    until: Mutex<Option<Instant>>,
    heard: Mutex<Heard>,
    /// When this node, leading, first noted itself (the failover supervisor does every round);
    /// None while it does not lead.
    leading_since: Mutex<Option<Instant>>,
    /// See [`takeover_grace`].
    grace: Duration,
    /// The log index up to which this node's data plane has acted on the committed map
    /// ([`Leases::note_applied`]); a grant counts only once this reaches its index.
    applied: tokio::sync::watch::Sender<u64>,
    /// Why this node cannot hold replicas, if it cannot (its block store failed):
    /// [`Leases::set_health`].
    health: std::sync::OnceLock<HealthCheck>,
}

/// Why a node is unfit to hold replicas (None while it is fit); see [`Leases::set_health`].
pub type HealthCheck = Box<dyn Fn() -> Option<String> + Send + Sync>;

impl Leases {
    pub fn new(me: NodeId, meta: Arc<MetaStore>, election_timeout_min: Duration) -> Arc<Leases> {
        Arc::new(Leases {
            me,
            meta,
            until: Mutex::new(None),
            heard: Mutex::new(Heard::default()),
            leading_since: Mutex::new(None),
            grace: takeover_grace(election_timeout_min),
            applied: tokio::sync::watch::Sender::new(0),
            health: std::sync::OnceLock::new(),
        })
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Sets the check of this node's fitness (once; later calls are ignored). While it says
    /// the node is unfit (its block store failed: it refuses changes until the node restarts),
    /// the node asks for no lease and, leading, does not count itself live: its lease lapses
    /// within [`LEASE`] and the leader fails its volumes over after [`FAILURE_TIMEOUT`], as if
    /// it had crashed, while it goes on proxying host I/O and taking part in Raft.
    pub fn set_health(&self, check: HealthCheck) {
        let _ = self.health.set(check);
    }

    /// Why this node is unfit to hold replicas, if it is.
    pub fn unfit(&self) -> Option<String> {
        self.health.get().and_then(|check| check())
    }

    pub fn valid(&self) -> bool {
        self.until.lock().expect("lease lock").is_some_and(|u| Instant::now() < u)
    }

    fn extend(&self, sent: Instant) {
        let mut until = self.until.lock().expect("lease lock");
        let new = sent + LEASE;
        if until.is_none_or(|u| u < new) {
            *until = Some(new);
        }
    }

    /// The node's data plane has acted on the committed map up to log index `index`.
    pub fn note_applied(&self, index: u64) {
        self.applied.send_if_modified(|v| {
            let newer = index > *v;
            if newer {
                *v = index;
            }
            newer
        });
    }

    /// Waits (at most `timeout`) until the data plane has acted on the map up to `index`.
    async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|v| *v >= index)).await.is_ok_and(|r| r.is_ok())
    }

    /// On the leader: note that `from` is alive, then confirm leadership with a majority. The
    /// grant carries the read index: the lease counts only once the node has applied that far.
    ///
    /// A node a failover is being committed for gets no grant until that commit is done (the
    /// next grant's read index then covers it). Without this, a grant whose read index was
    /// taken just before the failover committed gave the old primary a lease on a map without
    /// it, while the new primary served: two primaries. And the node is noted alive before the
    /// read index is taken, under the lock a failover decision takes: a decision made after this
    /// sees the node alive; one made before has condemned it and this grant is refused.
    pub(crate) async fn grant(&self, from: NodeId) -> ProbeReply {
        {
            let mut heard = self.heard.lock().expect("heard lock");
            if heard.condemned.contains_key(&from) {
                return ProbeReply::Refused(format!("a failover of node {from} is being committed"));
            }
            heard.at.insert(from, Instant::now());
        }
        match tokio::time::timeout(RENEW_TIMEOUT, self.meta.read_index()).await {
            Ok(Ok(index)) => ProbeReply::GrantedAt { index },
            _ => ProbeReply::NotLeader(self.meta.status().leader.filter(|l| *l != self.me)),
        }
    }

    /// On the leader, before it commits a failover of `node`'s volumes: whether `node` is still
    /// not alive (see [`Leases::alive`]); if so, no grant reaches it until [`Leases::absolve`]
    /// (after the failover's commit, or its failure).
    pub(crate) fn condemn(&self, node: NodeId, now: Instant, since: Instant) -> bool {
        let mut heard = self.heard.lock().expect("heard lock");
        if Self::alive_in(&heard, node, now, since, self.grace) {
            return false;
        }
        *heard.condemned.entry(node).or_insert(0) += 1;
        true
    }

    /// A failover [`Leases::condemn`] allowed is committed or failed.
    pub(crate) fn absolve(&self, node: NodeId) {
        let mut heard = self.heard.lock().expect("heard lock");
        if let Some(n) = heard.condemned.get_mut(&node) {
            *n -= 1;
            if *n == 0 {
                heard.condemned.remove(&node);
            }
        }
    }

    /// Whether the leader heard from `node` recently (only meaningful on the leader, which has
    /// led since `since`). A node not heard from since the takeover is alive until the grace
    /// period has passed.
    pub(crate) fn alive(&self, node: NodeId, now: Instant, since: Instant) -> bool {
        Self::alive_in(&self.heard.lock().expect("heard lock"), node, now, since, self.grace)
    }

    fn alive_in(heard: &Heard, node: NodeId, now: Instant, since: Instant, grace: Duration) -> bool {
        if let Some(h) = heard.at.get(&node).copied() {
            if now.saturating_duration_since(h) < FAILURE_TIMEOUT {
                return true;
            }
        }
        now.saturating_duration_since(since) < grace
    }

    /// When this node, as the leader, last granted `node` a lease (None if it has not since
    /// it took over, or does not lead).
    pub fn last_heard(&self, node: NodeId) -> Option<Instant> {
        self.heard.lock().expect("heard lock").at.get(&node).copied()
    }

    /// Whether this node, as the leader, knows `node` to be live at `now`: `Some(true)` if it
    /// granted it a lease within [`FAILURE_TIMEOUT`], `Some(false)` if not, `None` while it cannot
    /// tell yet (it does not lead, or took over so recently that the node may not have renewed
    /// with it yet).
    pub fn liveness(&self, node: NodeId, now: Instant) -> Option<bool> {
        let heard = self.last_heard(node);
        if heard.is_some_and(|h| now.saturating_duration_since(h) < FAILURE_TIMEOUT) {
            return Some(true);
        }
        let since = (*self.leading_since.lock().expect("leading lock"))?;
        let settled = now.saturating_duration_since(since) >= FAILURE_TIMEOUT.max(self.grace);
        (heard.is_some() || settled).then_some(false)
    }

    /// Renews this node's lease for as long as the node runs (one task per node), asking the
    /// Raft leader over `transport`.
    pub fn spawn_renewal(self: &Arc<Self>, transport: impl Transport) {
        let leases = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(RENEW_EVERY);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut unfit_logged = false;
            loop {
                interval.tick().await;
                if let Some(why) = leases.unfit() {
                    // Dropping out: no renewal, and the lease in hand is given up at once
                    // (ending it early is always safe; only holding it too long is not).
                    *leases.until.lock().expect("lease lock") = None;
                    if !unfit_logged {
                        tracing::error!(error = %why, "this node is unfit to hold replicas: no longer renewing its lease");
                        unfit_logged = true;
                    }
                    continue;
                }
                let sent = Instant::now();
                let granted = match leases.meta.status().leader {
                    Some(l) if l == leases.me => match leases.grant(leases.me).await {
                        ProbeReply::GrantedAt { index } => Some(index),
                        _ => None,
                    },
                    Some(l) => request_lease(&transport, l).await,
                    None => None,
                };
                // The lease still counts from when it was asked for; applying only delays it.
                if let Some(index) = granted {
                    if leases.wait_applied(index, LEASE).await {
                        leases.extend(sent);
                    }
                }
            }
        });
    }

    /// On the leader: note that `node` was heard from at `now` (the leader hears itself).
    pub(crate) fn note_heard(&self, node: NodeId, now: Instant) {
        if node == self.me {
            self.leading_since.lock().expect("leading lock").get_or_insert(now);
            if self.unfit().is_some() {
                // An unfit leader is not live to its own supervisor: its volumes fail over.
                return;
            }
        }
        self.heard.lock().expect("heard lock").at.insert(node, now);
    }

    /// This node does not lead (any more): what it heard as leader no longer counts.
    pub(crate) fn forget_heard(&self) {
        // Failovers in flight keep their condemnations until they end.
        self.heard.lock().expect("heard lock").at.clear();
        *self.leading_since.lock().expect("leading lock") = None;
    }
}

/// The read index the leader granted a lease at, if it granted one.
async fn request_lease(transport: &dyn Transport, leader: NodeId) -> Option<u64> {
    match probe_call(transport, leader, &ProbeMsg::LeaseRequest, RENEW_TIMEOUT).await {
        Ok(ProbeReply::GrantedAt { index }) => Some(index),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use tandem_types::Channel;

    use super::*;
    use crate::probe::fake::{Answer, FakeTransport};

    #[test]
    fn a_lease_ends_before_a_failover_can_begin() {
        assert!(LEASE + DRIFT_MARGIN <= FAILURE_TIMEOUT);
        assert!(RENEW_EVERY * 4 <= LEASE);
        // A new leader's grace covers the rest of any lease its predecessor granted.
        for election_min_ms in [100, 750, 1500, 3000] {
            let min = Duration::from_millis(election_min_ms);
            assert!(takeover_grace(min) + min >= LEASE + DRIFT_MARGIN, "{election_min_ms} ms");
            assert!(takeover_grace(min) >= RENEW_EVERY * 2 + DRIFT_MARGIN);
        }
    }

    /// A renewal asks the Raft leader, and counts only a grant (with the index it was granted
    /// at); a refusal, a failed call or silence renew nothing.
    #[tokio::test]
    async fn a_renewal_counts_only_a_grant_from_the_leader() {
        let granted = FakeTransport::new(Answer::Reply(ProbeReply::GrantedAt { index: 42 }));
        assert_eq!(request_lease(&granted, NodeId(3)).await, Some(42));
        assert_eq!(granted.sent(), vec![(NodeId(3), Channel::Probe, ProbeMsg::LeaseRequest)]);

        let deposed = FakeTransport::new(Answer::Reply(ProbeReply::NotLeader(Some(NodeId(2)))));
        assert_eq!(request_lease(&deposed, NodeId(3)).await, None);

        let cut = FakeTransport::new(Answer::Unreachable);
        assert_eq!(request_lease(&cut, NodeId(3)).await, None);

        let started = Instant::now();
        let silent = FakeTransport::new(Answer::Silent);
        assert_eq!(request_lease(&silent, NodeId(3)).await, None);
        // A silent leader costs one renewal timeout, which ends before the lease would.
        assert!(started.elapsed() >= RENEW_TIMEOUT);
    }
}
