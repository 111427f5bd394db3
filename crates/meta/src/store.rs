//! [`MetaStore`]: one node's handle on the replicated metadata.
//!
//! Any node accepts any operation. Reads are linearizable everywhere: a node gets a read index
//! from the leader (which confirms its leadership with a quorum first, openraft's read-index
//! path), waits until it has applied that far, and answers from its own state machine. Writes
//! and membership changes are carried out by the leader; another node forwards them over the
//! transport and retries while an election is in progress, up to [`LEADER_WAIT`].
//!
//! Membership: only a few members vote (`MetaConfig::voters`, the rule is [`crate::voters`]);
//! the others are learners. Every change of the voters (forming the cluster, adding, removing,
//! replacing a lost voter) is made by the leader under one lock, as one `ReplaceAllVoters`
//! (openraft's joint consensus), and only if a majority of the new voters is live.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::{de::DeserializeOwned, Serialize};
use tandem_transport::{BoxFuture, Handler, Transport};
use tandem_types::Channel;
use tandem_types::{NodeId, SNAPSHOT_CHUNK_BYTES};
use tokio::time::Instant;

use crate::log_store::LogStore;
use crate::network::{call, decode_msg, encode_msg, Forwarded, MetaError, MetaRpc, Network};
use crate::raft_types::Raft;
use crate::state_machine::{ChangeFeed, SmReader, SmState, SnapshotStats, StateMachine};
use crate::voters::{has_live_majority, initial_voters, pick_voter, settle, voter_target};
use tandem_clustermap::{MetaCmd, MetaReply, NodeRecord};

/// How long an operation waits for a reachable leader (elections, a leader change) before it
/// reports the store unavailable.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long a new node may take to catch up as a learner before it is made a voter.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(60);
/// How long a follower waits to apply up to a read index.
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// A learner counts as caught up (may be promoted) while its replicated log is at most this many
/// entries behind the leader's.
const CAUGHT_UP_ENTRIES_MAX: u64 = 64;

/// Whether the leader heard from a node recently (its lease renewals, `tandem_node::lease`):
/// `None` while it cannot tell yet (it took over a moment ago). Set once by the node; without it
/// every node counts as live.
pub type Liveness = Arc<dyn Fn(NodeId) -> Option<bool> + Send + Sync>;
/// How long a removal waits for a new leader to learn which learners are live, so that the
/// seat goes to the learner the rule prefers rather than to the first one heard from.
const LIVENESS_WAIT: Duration = Duration::from_secs(5);

/// Raft timing and log compaction, from the cluster config.
#[derive(Clone, Debug)]
pub struct MetaConfig {
    pub cluster_name: String,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one, or after as many
    /// entries as the state holds objects if that is more (see `snapshot_trigger`).
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot (for followers slightly behind); older ones
    /// are purged, and a follower further behind is sent the snapshot.
    pub logs_to_keep: u64,
    /// Voters the cluster keeps (1, 3 or 5; see [`crate::voters`]); the other members are
    /// learners. The leader's value rules.
    pub voters: usize,
}

impl MetaConfig {
    fn raft_config(&self) -> Result<Config, String> {
        Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            // Triggered by `snapshot_trigger`, which also weighs the state's size.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.logs_to_keep,
            purge_batch_size: 1,
            max_payload_entries: ENTRIES_PER_APPEND_MAX,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            install_snapshot_timeout: 5_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }
}

/// This node's role in Raft, as openraft's `ServerState` reports it. The API serves it as the
/// lowercase name (`leader`, `follower`, `candidate`, `learner`, `shutdown`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaftRole {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl RaftRole {
    pub fn name(self) -> &'static str {
        match self {
            RaftRole::Leader => "leader",
            RaftRole::Follower => "follower",
            RaftRole::Candidate => "candidate",
            RaftRole::Learner => "learner",
            RaftRole::Shutdown => "shutdown",
        }
    }
}

impl From<ServerState> for RaftRole {
    fn from(state: ServerState) -> RaftRole {
        match state {
            ServerState::Leader => RaftRole::Leader,
            ServerState::Follower => RaftRole::Follower,
            ServerState::Candidate => RaftRole::Candidate,
            ServerState::Learner => RaftRole::Learner,
            ServerState::Shutdown => RaftRole::Shutdown,
        }
    }
}

impl std::fmt::Display for RaftRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One node's view of Raft, for status displays.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: NodeId,
    pub role: RaftRole,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

pub struct MetaStore {
    id: NodeId,
    raft: Raft,
    sm: SmReader,
    transport: Arc<dyn Transport>,
    db: sled::Db,
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    /// `MetaConfig::voters`.
    voter_cap: usize,
    liveness: std::sync::OnceLock<Liveness>,
    /// Held by every membership change this node makes as leader, so they never race (openraft
    /// refuses a change while another is uncommitted).
    membership_lock: tokio::sync::Mutex<()>,
    /// The last log index this node's log held when it started: every read index it gives as
    /// leader is at least this (or its last log index, if that is lower now). See
    /// [`MetaStore::local_read_index`].
    restored_last_log: u64,
}

fn not_leader(leader: Option<NodeId>) -> MetaError {
    MetaError::NotLeader { leader }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> MetaError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f.leader_id),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => MetaError::Conflict(c.to_string()),
        RaftError::Fatal(f) => MetaError::Internal(f.to_string()),
    }
}

fn reply_result(reply: MetaReply) -> Result<MetaReply, MetaError> {
    match reply {
        MetaReply::NotFound(m) => Err(MetaError::NotFound(m)),
        MetaReply::Invalid(m) => Err(MetaError::Invalid(m)),
        MetaReply::Conflict(m) => Err(MetaError::Conflict(m)),
        MetaReply::Batch(_) => Err(MetaError::Internal("a batch reply reached a single writer".into())),
        done @ (MetaReply::Done { .. } | MetaReply::Reservation(_) | MetaReply::Token(_)) => Ok(done),
    }
}

/// Client writes waiting to be proposed; when the leader falls behind, writers wait.
const PROPOSALS_QUEUED_MAX: usize = 4096;
/// Estimated encoded bytes of commands batched into one log entry. With
/// [`ENTRIES_PER_APPEND_MAX`] this keeps an AppendEntries request far below the frame limit.
const BATCH_BYTES_MAX: usize = 256 * 1024;
/// Log entries per AppendEntries request.
const ENTRIES_PER_APPEND_MAX: u64 = 32;
/// Batches proposed and not yet committed. More than one lets the leader flush the next batch
/// while the previous one is being replicated.
const BATCHES_IN_FLIGHT_MAX: usize = 4;

type Proposal = (MetaCmd, tokio::sync::oneshot::Sender<Result<MetaReply, MetaError>>);

/// An upper estimate of a reservation command's encoded size beyond its fixed part.
fn reserve_op_bytes(op: &tandem_reservations::Op) -> usize {
    match op {
        tandem_reservations::Op::Register { also, .. } => also.iter().map(|a| a.len() + 8).sum(),
        tandem_reservations::Op::RegisterAndMove { to, .. } => to.initiator.len() + 8,
        _ => 64,
    }
}

/// An upper estimate of a command's encoded size.
fn estimated_bytes(cmd: &MetaCmd) -> usize {
    64 + match cmd {
        MetaCmd::PutSetting { key, value } => key.len() + value.len(),
        MetaCmd::CasSetting { key, expect, value } => key.len() + value.len() + expect.as_ref().map_or(0, String::len),
        MetaCmd::DeleteSetting { key } => key.len(),
        MetaCmd::RegisterNode(n) => n.site.len() + 64,
        MetaCmd::Batch(cmds) => cmds.iter().map(estimated_bytes).sum(),
        MetaCmd::CreateDataset { name, preferred_site, .. } => {
            name.len() + preferred_site.as_ref().map_or(0, String::len)
        }
        MetaCmd::DeleteDataset { name } | MetaCmd::DeleteVolume { name } => name.len(),
        MetaCmd::CreateVolume { name, dataset, .. } => name.len() + dataset.as_ref().map_or(0, String::len),
        MetaCmd::SetVolumeIsr { isr, .. } | MetaCmd::Failover { isr, .. } => 8 * isr.len(),
        MetaCmd::AddHost { name, site, iqns } => name.len() + site.len() + iqns.iter().map(String::len).sum::<usize>(),
        MetaCmd::RemoveHost { name } => name.len(),
        MetaCmd::ConnectHost { host, volume } | MetaCmd::DisconnectHost { host, volume } => host.len() + volume.len(),
        MetaCmd::PublishPaths { host, paths, .. } => host.len() + tandem_clustermap::path_map_bytes(paths),
        MetaCmd::SetHostCredential { host, credential } => {
            host.len() + credential.id.len() + credential.cert_sha256.len()
        }
        MetaCmd::SetHostChap { host, chap } => {
            host.len()
                + chap.as_ref().map_or(0, |c| {
                    c.user.len()
                        + c.secret.len()
                        + c.target_user.as_ref().map_or(0, String::len)
                        + c.target_secret.as_ref().map_or(0, Vec::len)
                })
        }
        MetaCmd::Reserve { nexus, op, .. } => nexus.initiator.len() + reserve_op_bytes(op),
        MetaCmd::CreateToken { ranges, host, .. } => 16 * ranges.len() + host.as_ref().map_or(0, String::len) + 64,
        MetaCmd::TokenReady { holders, .. } | MetaCmd::FinishClone { holders, .. } => 8 * holders.len(),
        MetaCmd::CloneVolume { name, source, .. } => name.len() + source.len(),
        MetaCmd::TouchToken { .. } | MetaCmd::RevokeToken { .. } | MetaCmd::Expire { .. } => 0,
        MetaCmd::RemoveNode { .. }
        | MetaCmd::SetTransport { .. }
        | MetaCmd::ClaimPrimary { .. }
        | MetaCmd::SetResyncProgress { .. }
        | MetaCmd::ClearResync { .. } => 0,
    }
}

/// Proposes client writes on the leader: every write that arrived while earlier batches were
/// being committed goes into the next log entry together (group commit for the metadata
/// store; see [`MetaCmd::Batch`]).
async fn batcher(raft: Raft, mut rx: tokio::sync::mpsc::Receiver<Proposal>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT_MAX));
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Wait for room first, so that writes arriving meanwhile join this batch.
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let mut bytes = estimated_bytes(&first.0);
        let mut batch = vec![first];
        while let Ok(p) = rx.try_recv() {
            bytes += estimated_bytes(&p.0);
            if bytes > BATCH_BYTES_MAX {
                carried = Some(p);
                break;
            }
            batch.push(p);
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            if batch.len() == 1 {
                let (cmd, tx) = batch.pop().expect("one proposal");
                let _ = tx.send(raft.client_write(cmd).await.map(|r| r.data).map_err(write_error));
            } else {
                let (cmds, txs): (Vec<MetaCmd>, Vec<_>) = batch.into_iter().unzip();
                match raft.client_write(MetaCmd::Batch(cmds)).await {
                    Ok(resp) => match resp.data {
                        MetaReply::Batch(replies) if replies.len() == txs.len() => {
                            for (tx, r) in txs.into_iter().zip(replies) {
                                let _ = tx.send(Ok(r));
                            }
                        }
                        other => {
                            let e = MetaError::Internal(format!("unexpected reply to a batch: {other:?}"));
                            for tx in txs {
                                let _ = tx.send(Err(e.clone()));
                            }
                        }
                    },
                    Err(e) => {
                        let e = write_error(e);
                        for tx in txs {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Builds a snapshot once the log since the last one has grown past both `every` entries and
/// the number of objects the state held at the last snapshot. Building one costs time and
/// bytes in proportion to the state (it is copied, encoded and written whole): spacing
/// snapshots by at least the state's size keeps their share of a write's cost bounded (about
/// one object per command) however large the state grows. Log purge follows each snapshot and
/// costs in proportion to the entries it drops, so its share is constant too.
async fn snapshot_trigger(raft: Raft, sm: SmReader, every: u64) {
    let mut applied = sm.subscribe();
    // The applied index and the state's size at the last trigger (a snapshot takes a while to
    // show in the metrics).
    let mut triggered = 0;
    let mut objects = sm.read(|st| st.map.object_count()) as u64;
    loop {
        if applied.changed().await.is_err() {
            return;
        }
        let index = *applied.borrow_and_update();
        let snapshot = raft.metrics().borrow().snapshot.map_or(0, |l| l.index);
        if index.saturating_sub(snapshot.max(triggered)) >= every.max(objects) {
            triggered = index;
            objects = sm.read(|st| st.map.object_count()) as u64;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

impl MetaStore {
    /// Opens (or creates) the store in `dir` and starts Raft. A node restarted on its dir comes
    /// back with its log, vote and state, and rejoins the cluster on its own.
    pub async fn open(
        id: NodeId,
        config: &MetaConfig,
        dir: &Path,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<MetaStore>, String> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| format!("cannot open metadata store in {}: {e}", dir.display()))?;
        let mut log = LogStore::open(&db, dir).map_err(|e| e.to_string())?;
        let restored_last_log = openraft::storage::RaftLogStorage::get_log_state(&mut log)
            .await
            .map_err(|e| e.to_string())?
            .last_log_id
            .map_or(0, |l| l.index);
        let sm = StateMachine::open(&db, dir).map_err(|e| e.to_string())?;
        log.follow_snapshots(sm.snapshot_floor());
        let reader = sm.reader();
        // Peers already in the map get their addresses now, so even forwarded requests to them
        // work before Raft has replicated to them.
        reader.read(|st| {
            for (nid, node) in st.membership.membership().nodes() {
                if let Ok(addr) = node.addr.parse() {
                    transport.set_peer_addr(*nid, addr);
                }
            }
        });
        let raft_config = Arc::new(config.raft_config()?);
        let network = Network { transport: transport.clone() };
        let raft = Raft::new(id, raft_config, network, log, sm).await.map_err(|e| e.to_string())?;
        let (proposals, rx) = tokio::sync::mpsc::channel(PROPOSALS_QUEUED_MAX);
        tokio::spawn(batcher(raft.clone(), rx));
        tokio::spawn(snapshot_trigger(raft.clone(), reader.clone(), config.snapshot_after_entries.max(1)));
        Ok(Arc::new(MetaStore {
            id,
            raft,
            sm: reader,
            transport,
            db,
            proposals,
            voter_cap: config.voters,
            liveness: std::sync::OnceLock::new(),
            membership_lock: tokio::sync::Mutex::new(()),
            restored_last_log,
        }))
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The handler for this store's requests on the control channel.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(RpcHandler { store: self.clone() })
    }

    /// Sets how this node, as leader, tells whether it heard from a node recently (once; later
    /// calls are ignored).
    pub fn set_liveness(&self, live: Liveness) {
        let _ = self.liveness.set(live);
    }

    /// Forms a new cluster from `members` (each must be running, this node among them). Call on
    /// one pristine node; on a node that already belongs to a cluster it does nothing and
    /// returns `Ok(false)`. The cluster starts with the voters [`initial_voters`] chooses (this
    /// node and others spread over sites); the other members then join as learners.
    pub async fn initialize(&self, members: &[NodeRecord]) -> Result<bool, MetaError> {
        for m in members {
            m.validate().map_err(MetaError::Invalid)?;
            self.transport.set_peer_addr(m.id, m.raft_addr);
        }
        let ids: BTreeSet<NodeId> = members.iter().map(|m| m.id).collect();
        if !ids.contains(&self.id) {
            return Err(MetaError::Invalid(format!(
                "node {} forms the cluster, so it must be one of the initial members {ids:?}",
                self.id
            )));
        }
        let sites: BTreeMap<NodeId, String> = members.iter().map(|m| (m.id, m.site.clone())).collect();
        let voters = initial_voters(self.id, &ids, &sites, self.voter_cap);
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .filter(|m| voters.contains(&m.id))
            .map(|m| (m.id, BasicNode::new(m.raft_addr.to_string())))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => return Ok(false),
            Err(e) => return Err(MetaError::Invalid(e.to_string())),
        }
        tracing::info!(voters = ?voters, "formed the cluster");
        for m in members.iter().filter(|m| voters.contains(&m.id)) {
            self.write(MetaCmd::RegisterNode(m.clone())).await?;
        }
        for m in members.iter().filter(|m| !voters.contains(&m.id)) {
            self.add_node(m.clone()).await?;
        }
        Ok(true)
    }

    /// Proposes a command and returns its reply once it is committed and applied.
    pub async fn write(&self, cmd: MetaCmd) -> Result<MetaReply, MetaError> {
        let reply = self.on_leader(Forwarded::Write(cmd.clone()), || self.local_write(cmd.clone())).await?;
        reply_result(reply)
    }

    /// Runs `f` on state that reflects every write committed before this call began.
    pub async fn read<T>(&self, f: impl FnOnce(&SmState) -> T) -> Result<T, MetaError> {
        let index: Option<u64> = self.on_leader(Forwarded::ReadIndex, || self.local_read_index()).await?;
        self.raft
            .wait(Some(APPLY_WAIT))
            .applied_index_at_least(index, "linearizable read")
            .await
            .map_err(|e| MetaError::Unavailable(format!("could not apply up to the read index: {e}")))?;
        Ok(self.sm.read(f))
    }

    /// Changes whenever this node applies more of the log (its value is the applied index).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sm.subscribe()
    }

    /// What later apply steps on this node change (see [`ChangeFeed`]).
    pub fn changes(&self) -> ChangeFeed {
        self.sm.changes()
    }

    /// The latest snapshot this node built or installed.
    pub fn snapshot_stats(&self) -> &SnapshotStats {
        self.sm.snapshot_stats()
    }

    /// This node's applied state as it is now, without asking the leader (may be stale).
    pub fn local_read<T>(&self, f: impl FnOnce(&SmState) -> T) -> T {
        self.sm.read(f)
    }

    /// Adds a node: records it in the map, lets it catch up as a learner, then makes it a voter
    /// if the cluster has fewer voters than it should ([`settle`]).
    pub async fn add_node(&self, rec: NodeRecord) -> Result<MetaReply, MetaError> {
        rec.validate().map_err(MetaError::Invalid)?;
        let reply = self.on_leader(Forwarded::AddNode(rec.clone()), || self.local_add_node(rec.clone())).await?;
        reply_result(reply)
    }

    /// Removes a node from the Raft membership and the map. A voter that leaves is replaced by
    /// a learner in the same change where one is live and caught up ([`settle`]).
    pub async fn remove_node(&self, id: NodeId) -> Result<MetaReply, MetaError> {
        let reply = self.on_leader(Forwarded::RemoveNode(id), || self.local_remove_node(id)).await?;
        reply_result(reply)
    }

    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        RaftStatus {
            id: self.id,
            role: RaftRole::from(m.state),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    /// Waits until this node knows a leader, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, MetaError> {
        let m = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a known leader")
            .await
            .map_err(|e| MetaError::Unavailable(e.to_string()))?;
        m.current_leader.ok_or_else(|| MetaError::Unavailable("no leader".into()))
    }

    /// Stops Raft and flushes everything to disk.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Err(e) = self.db.flush_async().await {
            tracing::warn!(error = %e, "final flush of the metadata store failed");
        }
    }

    /// Runs `local` if this node leads, else forwards `fwd` to the leader; retries while there
    /// is no leader or it moved, until [`LEADER_WAIT`] has passed.
    async fn on_leader<T, F, Fut>(&self, fwd: Forwarded, local: F) -> Result<T, MetaError>
    where
        T: DeserializeOwned,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, MetaError>>,
    {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut metrics = self.raft.metrics();
        loop {
            let leader = metrics.borrow_and_update().current_leader;
            let result = match leader {
                Some(l) if l == self.id => local().await,
                Some(l) => match self.forward::<T>(l, &fwd).await {
                    Ok(r) => r,
                    Err(e) => Err(MetaError::Unavailable(format!("leader {l} unreachable: {e}"))),
                },
                None => Err(MetaError::Unavailable("no leader elected".into())),
            };
            match result {
                Err(e @ (MetaError::NotLeader { .. } | MetaError::Unavailable(_))) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(match e {
                            MetaError::NotLeader { .. } => MetaError::Unavailable("leadership kept moving".into()),
                            e => e,
                        });
                    }
                    // Wake on a metrics change (a new leader) or after a short pause.
                    let pause = Duration::from_millis(50).min(deadline - now);
                    let _ = tokio::time::timeout(pause, metrics.changed()).await;
                }
                other => return other,
            }
        }
    }

    /// Sends a forwarded operation to the leader, first making sure the transport knows the
    /// leader's address (it may have joined after this node started).
    async fn forward<T: DeserializeOwned>(
        &self,
        leader: NodeId,
        fwd: &Forwarded,
    ) -> Result<Result<T, MetaError>, tandem_transport::TransportError> {
        let addr =
            self.raft.metrics().borrow().membership_config.membership().get_node(&leader).map(|n| n.addr.clone());
        if let Some(addr) = addr.and_then(|a| a.parse().ok()) {
            self.transport.set_peer_addr(leader, addr);
        }
        call::<Result<T, MetaError>>(self.transport.as_ref(), leader, &MetaRpc::Forward(fwd.clone())).await
    }

    async fn local_write(&self, cmd: MetaCmd) -> Result<MetaReply, MetaError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.proposals.send((cmd, tx)).await.map_err(|_| MetaError::Internal("proposer stopped".into()))?;
        rx.await.map_err(|_| MetaError::Internal("proposer stopped".into()))?
    }

    /// Succeeds only on the leader, once a majority has confirmed that it still leads (a
    /// heartbeat round). Leases build on it.
    pub async fn confirm_leadership(&self) -> Result<(), MetaError> {
        self.local_read_index().await.map(|_| ())
    }

    /// Confirms this node's leadership with a majority and returns the index every write
    /// committed before the call is at or below (the read index).
    pub async fn read_index(&self) -> Result<u64, MetaError> {
        self.local_read_index().await.map(|i| i.unwrap_or(0))
    }

    /// The read index, on the leader: openraft's (the larger of the commit index and this
    /// leader's first entry), raised to the last log index this node had when it started.
    ///
    /// openraft restores a node that was leader as leader at once on restart, in the same term,
    /// reusing that term's first entry; its commit index comes back only as far as the state
    /// machine had persisted its applies (not flushed per batch) or the unflushed saved committed
    /// id. After a power loss both may miss entries that were committed and acknowledged before,
    /// although they are in the flushed log; openraft's read index then lets a read miss an
    /// acknowledged write (the chaos suite's power-loss nemesis found it:
    /// `regress-stale-read-after-power-cut`). Any entry that may have been committed before
    /// the restart is at or below the restored last log index, so no read index below it is
    /// safe. Once the commit index has passed it, this changes nothing. The cap at the current
    /// last log index covers a tail truncated by a newer leader since.
    async fn local_read_index(&self) -> Result<Option<u64>, MetaError> {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => {
                let index = log_id.map(|l| l.index);
                let last = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
                let floor = self.restored_last_log.min(last);
                if floor == 0 {
                    return Ok(index);
                }
                Ok(Some(index.map_or(floor, |i| i.max(floor))))
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(not_leader(f.leader_id)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(MetaError::Unavailable(q.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(MetaError::Internal(f.to_string())),
        }
    }

    fn membership_sets(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        (membership.voter_ids().collect(), membership.learner_ids().collect())
    }

    fn is_live(&self, id: NodeId) -> bool {
        id == self.id || self.liveness.get().is_none_or(|live| live(id) == Some(true))
    }

    /// Waits (at most [`LIVENESS_WAIT`]) until this node, leading, can tell of each of `nodes`
    /// whether it is live.
    async fn wait_for_liveness(&self, nodes: &BTreeSet<NodeId>) {
        let Some(live) = self.liveness.get() else { return };
        let deadline = Instant::now() + LIVENESS_WAIT;
        while nodes.iter().any(|n| *n != self.id && live(*n).is_none()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The sites of the nodes the map records.
    fn sites(&self) -> BTreeMap<NodeId, String> {
        self.sm.read(|st| st.map.nodes.iter().map(|(id, n)| (*id, n.site.clone())).collect())
    }

    /// On the leader: those of `nodes` that are live and caught up (a learner among them may be
    /// promoted now; a voter among them is not the first to step down).
    fn eligible(&self, nodes: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        let m = self.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let Some(replication) = m.replication else { return BTreeSet::new() };
        nodes
            .iter()
            .copied()
            .filter(|l| {
                let matched = replication.get(l).cloned().flatten().map(|log| log.index);
                matched.is_some_and(|i| i + CAUGHT_UP_ENTRIES_MAX >= last) && self.is_live(*l)
            })
            .collect()
    }

    /// On the leader: makes `next` the voters in one joint change, keeping those that leave as
    /// learners; only if a majority of `next` is live (`fresh`, a learner that has just caught
    /// up, counts as live). Returns whether it changed anything.
    async fn change_voters(
        &self,
        current: &BTreeSet<NodeId>,
        next: BTreeSet<NodeId>,
        fresh: Option<NodeId>,
    ) -> Result<bool, MetaError> {
        if *current == next {
            return Ok(false);
        }
        if !has_live_majority(&next, |n| Some(n) == fresh || self.is_live(n)) {
            return Err(MetaError::Unavailable(format!(
                "not changing the voters from {current:?} to {next:?}: most of the new voters are not live"
            )));
        }
        tracing::info!(from = ?current, to = ?next, "changing the Raft voters");
        self.raft.change_membership(ChangeMembers::ReplaceAllVoters(next), true).await.map_err(write_error)?;
        Ok(true)
    }

    /// On the leader: brings the voters to what [`settle`] gives (promoting live, caught-up
    /// learners while below the target, shrinking an even count of four or more). `fresh` is a
    /// learner that has just caught up, eligible even before the leader hears its first lease
    /// renewal. Returns whether the voters changed.
    async fn settle_voters_locked(&self, fresh: Option<NodeId>) -> Result<bool, MetaError> {
        let (voters, learners) = self.membership_sets();
        let mut eligible = self.eligible(&voters.union(&learners).copied().collect());
        eligible.extend(fresh.filter(|f| learners.contains(f)));
        let target = voter_target(self.voter_cap, voters.len() + learners.len());
        let next = settle(&voters, &eligible, &self.sites(), target, Some(self.id));
        self.change_voters(&voters, next, fresh).await
    }

    /// On the leader (fails with `NotLeader` elsewhere): [`settle`]s the voters, as after an
    /// add. For the node's periodic check.
    pub async fn settle_voters(&self) -> Result<bool, MetaError> {
        let _guard = self.membership_lock.lock().await;
        self.settle_voters_locked(None).await
    }

    /// On the leader: replaces voter `lost` (not heard from for long) with a live, caught-up
    /// learner chosen by [`pick_voter`]; `lost` stays a member as a learner, so it catches up
    /// if it returns. Does nothing (returns `None`) if `lost` is not a voter, is this node, or
    /// no learner qualifies: dropping a voter without a replacement would not make the quorum
    /// any easier to reach.
    pub async fn replace_voter(&self, lost: NodeId) -> Result<Option<NodeId>, MetaError> {
        let _guard = self.membership_lock.lock().await;
        let (voters, learners) = self.membership_sets();
        if lost == self.id || !voters.contains(&lost) {
            return Ok(None);
        }
        let mut remaining = voters.clone();
        remaining.remove(&lost);
        let mut eligible = self.eligible(&learners);
        eligible.remove(&lost);
        let Some(new) = pick_voter(&remaining, &eligible, &self.sites()) else { return Ok(None) };
        let mut next = remaining;
        next.insert(new);
        self.change_voters(&voters, next, None).await?;
        Ok(Some(new))
    }

    async fn local_add_node(&self, rec: NodeRecord) -> Result<MetaReply, MetaError> {
        let id = rec.id;
        let _guard = self.membership_lock.lock().await;
        let (voters, learners) = self.membership_sets();
        let known = self.sm.read(|st| st.map.nodes.get(&id).cloned());
        if voters.contains(&id) || learners.contains(&id) {
            return match known {
                // A retry of an add that already completed (or stopped after the node became
                // a learner: it may still be promoted).
                Some(k) if k == rec => {
                    let promoted = !voters.contains(&id) && self.settle_voters_locked(None).await?;
                    Ok(MetaReply::Done { changed: promoted })
                }
                _ => Err(MetaError::Conflict(format!("node {id} is already a member; remove it first"))),
            };
        }
        reply_result(self.local_write(MetaCmd::RegisterNode(rec.clone())).await?)?;
        self.transport.set_peer_addr(id, rec.raft_addr);
        let node = BasicNode::new(rec.raft_addr.to_string());
        match tokio::time::timeout(CATCH_UP_WAIT, self.raft.add_learner(id, node, true)).await {
            Ok(r) => r.map_err(write_error)?,
            Err(_) => {
                return Err(MetaError::Unavailable(format!(
                    "node {id} did not catch up within {CATCH_UP_WAIT:?}; is it running and reachable at {}?",
                    rec.raft_addr
                )))
            }
        };
        self.settle_voters_locked(Some(id)).await?;
        Ok(MetaReply::Done { changed: true })
    }

    async fn local_remove_node(&self, id: NodeId) -> Result<MetaReply, MetaError> {
        // `MetaCmd::RemoveNode` refuses a node that holds replicas, but it is applied after the
        // membership change; check first, on state that reflects every committed write, so a
        // refused removal leaves the membership alone too.
        let index = self.local_read_index().await?;
        self.raft
            .wait(Some(APPLY_WAIT))
            .applied_index_at_least(index, "node removal check")
            .await
            .map_err(|e| MetaError::Unavailable(format!("could not apply up to the read index: {e}")))?;
        if let Some(why) = self.sm.read(|st| st.map.node_in_use(id)) {
            return Err(MetaError::Invalid(why));
        }
        let _guard = self.membership_lock.lock().await;
        let (voters, learners) = self.membership_sets();
        let in_map = self.sm.read(|st| st.map.nodes.contains_key(&id));
        if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(MetaError::Conflict(format!("node {id} is the last voter; a cluster cannot remove it")));
            }
            // One joint change: the node stops voting and, where a learner qualifies, another
            // takes its seat. The node stays a learner until the removal below.
            let mut remaining = voters.clone();
            remaining.remove(&id);
            self.wait_for_liveness(&learners).await;
            let mut eligible = self.eligible(&remaining.union(&learners).copied().collect());
            eligible.remove(&id);
            let target = voter_target(self.voter_cap, voters.len() + learners.len() - 1);
            let keep = Some(self.id).filter(|me| *me != id);
            let next = settle(&remaining, &eligible, &self.sites(), target, keep);
            tracing::info!(node = %id, from = ?voters, to = ?next, eligible = ?eligible, "removing a voter");
            self.raft.change_membership(ChangeMembers::ReplaceAllVoters(next), true).await.map_err(write_error)?;
        }
        if voters.contains(&id) || learners.contains(&id) {
            // If this node just removed itself from the voters it no longer leads: this fails
            // with `NotLeader`, and the caller retries on the new leader, which finds the node a
            // learner and finishes here.
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(write_error)?;
        } else if !in_map {
            return Err(MetaError::NotFound(format!("node {id} is not a member of the cluster")));
        }
        match self.local_write(MetaCmd::RemoveNode { id }).await? {
            MetaReply::NotFound(_) => Ok(MetaReply::Done { changed: true }),
            other => Ok(other),
        }
    }
}

/// Serves [`MetaRpc`]s arriving on the control channel.
struct RpcHandler {
    store: Arc<MetaStore>,
}

fn reply<T: Serialize>(v: &T) -> Result<Bytes, String> {
    encode_msg(v)
}

impl RpcHandler {
    async fn handle_rpc(&self, payload: Bytes) -> Result<Bytes, String> {
        let raft = &self.store.raft;
        match decode_msg::<MetaRpc>(&payload)? {
            MetaRpc::AppendEntries(req) => reply(&raft.append_entries(req).await),
            MetaRpc::Vote(req) => reply(&raft.vote(req).await),
            MetaRpc::InstallSnapshot(req) => reply(&raft.install_snapshot(req).await),
            MetaRpc::Forward(Forwarded::Write(cmd)) => reply(&self.store.local_write(cmd).await),
            MetaRpc::Forward(Forwarded::ReadIndex) => reply(&self.store.local_read_index().await),
            MetaRpc::Forward(Forwarded::AddNode(rec)) => reply(&self.store.local_add_node(rec).await),
            MetaRpc::Forward(Forwarded::RemoveNode(id)) => reply(&self.store.local_remove_node(id).await),
        }
    }
}

impl Handler for RpcHandler {
    fn handle(&self, _from: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            if channel != Channel::Control {
                return Err(format!("the metadata store does not serve the {channel} channel"));
            }
            self.handle_rpc(payload).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API serves the role by these names (INTERFACE.md): they must not change. The JSON
    /// form is checked where the API serves it (`tandem_node::api`).
    #[test]
    fn raft_roles_keep_their_names() {
        let roles = [
            (ServerState::Leader, "leader"),
            (ServerState::Follower, "follower"),
            (ServerState::Candidate, "candidate"),
            (ServerState::Learner, "learner"),
            (ServerState::Shutdown, "shutdown"),
        ];
        for (state, name) in roles {
            let role = RaftRole::from(state);
            assert_eq!(role.name(), name);
            assert_eq!(role.to_string(), name);
        }
    }
}
