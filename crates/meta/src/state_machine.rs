//! The Raft state machine on sled: an adapter around [`ClusterMap::apply`].
//!
//! The map lives in memory (reads are served from it) and in the `state_machine` tree, one
//! record per [`ObjectKey`], next to the last applied log id and the membership. Each batch of
//! applied entries is written as one atomic sled batch, so the stored map always matches the
//! stored `applied` id. It is not flushed per batch: the log is durable, and after a crash
//! openraft re-applies from the stored `applied` id. Snapshots flush the whole database before
//! they are reported built, because the log before a snapshot may then be purged.
//!
//! Snapshots are the encoded [`SnapshotBody`] (map, applied id, membership) kept in the
//! `snapshot` tree, so a restarted node can still send its latest one to a lagging peer.
//!
//! Change feed: every apply step publishes the keys of the objects it wrote ([`Changes`]), and
//! a snapshot install publishes "everything". Consumers ([`ChangeFeed`]) react to what changed
//! instead of rescanning the whole map on every applied index, so the cost of a write does not
//! grow with the size of the state.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tandem_types::NodeId;

use crate::log_store::{decode, encode, read_err, write_err, DiskSync};
use crate::raft_types::TypeConfig;
use tandem_clustermap::{ClusterMap, MetaReply, Object, ObjectKey};

const KEY_APPLIED: &[u8] = b"\0applied";
const KEY_MEMBERSHIP: &[u8] = b"\0membership";
const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// What the state machine holds; shared with readers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SmState {
    pub map: ClusterMap,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
}

/// A snapshot's content.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: SmState,
}

/// Apply steps the change feed holds for a consumer that has not read them yet; one that falls
/// further behind is told that everything may have changed (and rescans once).
const CHANGES_QUEUED_MAX: usize = 4096;

/// What one apply step changed.
#[derive(Clone, Debug)]
pub struct Changes {
    /// The applied index after the step.
    pub applied: u64,
    /// The objects written (created, changed or deleted), in key order; empty with `all`.
    pub keys: Vec<ObjectKey>,
    /// The whole state was replaced (a snapshot was installed).
    pub all: bool,
}

/// What changed since a [`ChangeFeed`] was last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// These objects were written.
    Keys(BTreeSet<ObjectKey>),
    /// Anything may have changed: a snapshot replaced the state, or the reader fell behind.
    All,
}

impl Changed {
    /// What changed in `self` or in `other`.
    pub fn union(self, other: Changed) -> Changed {
        match (self, other) {
            (Changed::Keys(mut a), Changed::Keys(b)) => {
                a.extend(b);
                Changed::Keys(a)
            }
            _ => Changed::All,
        }
    }

    fn merge(self, next: &Changes) -> Changed {
        match self {
            Changed::All => Changed::All,
            _ if next.all => Changed::All,
            Changed::Keys(mut keys) => {
                keys.extend(next.keys.iter().cloned());
                Changed::Keys(keys)
            }
        }
    }
}

/// One consumer's view of the change feed. States read after [`ChangeFeed::next`] returns are
/// at least as new as the changes it reported (the state is updated before the changes are
/// published).
pub struct ChangeFeed {
    rx: tokio::sync::broadcast::Receiver<Arc<Changes>>,
}

impl ChangeFeed {
    /// Waits for the next apply step, then takes everything published since the last call:
    /// the union of the keys written, or [`Changed::All`]. `None` once the store has stopped.
    pub async fn next(&mut self) -> Option<Changed> {
        use tokio::sync::broadcast::error::RecvError;
        let first = match self.rx.recv().await {
            Ok(c) => Changed::Keys(BTreeSet::new()).merge(&c),
            Err(RecvError::Lagged(_)) => Changed::All,
            Err(RecvError::Closed) => return None,
        };
        Some(self.drain(first))
    }

    /// Everything published since the last call, without waiting; `None` if nothing was.
    pub fn try_next(&mut self) -> Option<Changed> {
        use tokio::sync::broadcast::error::TryRecvError;
        let first = match self.rx.try_recv() {
            Ok(c) => Changed::Keys(BTreeSet::new()).merge(&c),
            Err(TryRecvError::Lagged(_)) => Changed::All,
            Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
        };
        Some(self.drain(first))
    }

    fn drain(&mut self, mut changed: Changed) -> Changed {
        use tokio::sync::broadcast::error::TryRecvError;
        loop {
            match self.rx.try_recv() {
                Ok(c) => changed = changed.merge(&c),
                Err(TryRecvError::Lagged(_)) => changed = Changed::All,
                Err(TryRecvError::Empty | TryRecvError::Closed) => return changed,
            }
        }
    }
}

impl SnapshotStats {
    fn note(&self, bytes: usize, index: u64, took: std::time::Duration, built: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.bytes.store(bytes as u64, Relaxed);
        self.index.store(index, Relaxed);
        self.micros.store(took.as_micros() as u64, Relaxed);
        if built {
            self.built.fetch_add(1, Relaxed);
        } else {
            self.installed.fetch_add(1, Relaxed);
        }
    }
}

/// A read-only handle on the applied state, for the API.
#[derive(Clone)]
pub struct SmReader {
    state: Arc<RwLock<SmState>>,
    applied: tokio::sync::watch::Receiver<u64>,
    changes: tokio::sync::broadcast::Sender<Arc<Changes>>,
    stats: Arc<SnapshotStats>,
}

/// The latest snapshot this node built or installed, for `/metrics`.
#[derive(Default, Debug)]
pub struct SnapshotStats {
    pub bytes: std::sync::atomic::AtomicU64,
    pub index: std::sync::atomic::AtomicU64,
    /// How long building (or installing) it took, in microseconds.
    pub micros: std::sync::atomic::AtomicU64,
    pub built: std::sync::atomic::AtomicU64,
    pub installed: std::sync::atomic::AtomicU64,
}

impl SmReader {
    pub fn read<T>(&self, f: impl FnOnce(&SmState) -> T) -> T {
        f(&self.state.read().expect("state lock"))
    }

    /// The applied log index; changes whenever the state machine moves on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.clone()
    }

    /// A change feed starting now: what later apply steps change.
    pub fn changes(&self) -> ChangeFeed {
        ChangeFeed { rx: self.changes.subscribe() }
    }

    pub fn snapshot_stats(&self) -> &SnapshotStats {
        &self.stats
    }
}

pub struct StateMachine {
    sync: DiskSync,
    tree: sled::Tree,
    snapshots: sled::Tree,
    state: Arc<RwLock<SmState>>,
    snapshot_seq: u64,
    applied_tx: tokio::sync::watch::Sender<u64>,
    changes: tokio::sync::broadcast::Sender<Arc<Changes>>,
    stats: Arc<SnapshotStats>,
    /// The last log index the durable snapshot covers (see [`StateMachine::snapshot_floor`]).
    snapshot_floor: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachine {
    /// Opens the state machine in `db` (opened in `dir`).
    pub fn open(db: &sled::Db, dir: &std::path::Path) -> Result<StateMachine, StorageError<NodeId>> {
        let tree = db.open_tree("state_machine").map_err(read_err)?;
        let snapshots = db.open_tree("snapshot").map_err(read_err)?;
        let mut state = SmState::default();
        let mut objects = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(read_err)?;
            match &k[..] {
                KEY_APPLIED => state.last_applied = decode(&v)?,
                KEY_MEMBERSHIP => state.membership = decode(&v)?,
                key => {
                    let key = ObjectKey::decode(key).ok_or_else(|| read_err(format!("unknown state key {key:?}")))?;
                    objects.push((key, decode::<Object>(&v)?));
                }
            }
        }
        state.map = ClusterMap::from_objects(objects).map_err(read_err)?;
        let applied = state.last_applied.map_or(0, |l| l.index);
        let snapshot_meta: Option<SnapshotMeta<NodeId, BasicNode>> =
            snapshots.get(KEY_SNAPSHOT_META).map_err(read_err)?.map(|m| decode(&m)).transpose()?;
        let floor = snapshot_meta.and_then(|m| m.last_log_id).map_or(0, |l| l.index);
        Ok(StateMachine {
            snapshot_floor: Arc::new(tokio::sync::watch::channel(floor).0),
            sync: DiskSync::open(db, dir)?,
            tree,
            snapshots,
            state: Arc::new(RwLock::new(state)),
            snapshot_seq: 0,
            applied_tx: tokio::sync::watch::channel(applied).0,
            changes: tokio::sync::broadcast::channel(CHANGES_QUEUED_MAX).0,
            stats: Arc::default(),
        })
    }

    /// The last log index the node's durable snapshot covers, as it moves: the Raft log may be
    /// purged up to there and no further (`LogStore::follow_snapshots`). openraft 0.9 queues a
    /// follower's purge right behind a snapshot's install without waiting for its outcome; a
    /// purge persisted past a failed install left a state openraft refuses at the next start.
    pub fn snapshot_floor(&self) -> tokio::sync::watch::Receiver<u64> {
        self.snapshot_floor.subscribe()
    }

    pub fn reader(&self) -> SmReader {
        SmReader {
            state: self.state.clone(),
            applied: self.applied_tx.subscribe(),
            changes: self.changes.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Publishes an apply step's changes (no one listening is fine).
    fn publish(&self, applied: u64, keys: Vec<ObjectKey>, all: bool) {
        let _ = self.changes.send(Arc::new(Changes { applied, keys, all }));
        self.applied_tx.send_replace(applied);
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let meta = self.snapshots.get(KEY_SNAPSHOT_META).map_err(read_err)?;
        let data = self.snapshots.get(KEY_SNAPSHOT_DATA).map_err(read_err)?;
        match (meta, data) {
            (Some(meta), Some(data)) => {
                Ok(Some(Snapshot { meta: decode(&meta)?, snapshot: Box::new(Cursor::new(data.to_vec())) }))
            }
            _ => Ok(None),
        }
    }
}

/// Stores a snapshot as the node's current one, durably.
async fn save_snapshot(
    sync: &DiskSync,
    snapshots: &sled::Tree,
    meta: &SnapshotMeta<NodeId, BasicNode>,
    data: &[u8],
) -> Result<(), StorageError<NodeId>> {
    let mut batch = sled::Batch::default();
    batch.insert(KEY_SNAPSHOT_META, encode(meta)?);
    batch.insert(KEY_SNAPSHOT_DATA, data);
    snapshots.apply_batch(batch).map_err(write_err)?;
    sync.flush().await.map_err(write_err)?;
    Ok(())
}

/// A snapshot covering `meta` is durable: the log may be purged up to it.
fn raise_floor(floor: &tokio::sync::watch::Sender<u64>, meta: &SnapshotMeta<NodeId, BasicNode>) {
    let index = meta.last_log_id.map_or(0, |l| l.index);
    floor.send_if_modified(|f| {
        let higher = index > *f;
        if higher {
            *f = index;
        }
        higher
    });
}

pub struct SnapshotBuilder {
    sync: DiskSync,
    snapshots: sled::Tree,
    state: SmState,
    seq: u64,
    /// When the state was copied for this snapshot.
    started: std::time::Instant,
    stats: Arc<SnapshotStats>,
    floor: Arc<tokio::sync::watch::Sender<u64>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let last = self.state.last_applied;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta { last_log_id: last, last_membership: self.state.membership.clone(), snapshot_id };
        let data = encode(&SnapshotBody { state: self.state.clone() })?;
        // Flushes the state machine tree too: once this returns, the log up to `last` may go.
        save_snapshot(&self.sync, &self.snapshots, &meta, &data).await?;
        raise_floor(&self.floor, &meta);
        self.stats.note(data.len(), last.map_or(0, |l| l.index), self.started.elapsed(), true);
        tracing::debug!(bytes = data.len(), took = ?self.started.elapsed(), "metadata snapshot built");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>> {
        let st = self.state.read().expect("state lock");
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaReply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let mut batch = sled::Batch::default();
        let touched;
        let applied;
        {
            let mut st = self.state.write().expect("state lock");
            for entry in entries {
                st.last_applied = Some(entry.log_id);
                let reply = match entry.payload {
                    EntryPayload::Blank => MetaReply::Done { changed: false },
                    EntryPayload::Normal(cmd) => st.map.apply(cmd),
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(entry.log_id), m);
                        batch.insert(KEY_MEMBERSHIP, encode(&st.membership)?);
                        MetaReply::Done { changed: true }
                    }
                };
                replies.push(reply);
            }
            touched = st.map.take_touched();
            for key in &touched {
                match st.map.object(key) {
                    Some(obj) => batch.insert(key.encode(), encode(&obj)?),
                    None => batch.remove(key.encode()),
                }
            }
            batch.insert(KEY_APPLIED, encode(&st.last_applied)?);
            applied = st.last_applied.map_or(0, |l| l.index);
        }
        self.tree.apply_batch(batch).map_err(write_err)?;
        self.publish(applied, touched, false);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_seq += 1;
        let started = std::time::Instant::now();
        SnapshotBuilder {
            started,
            stats: self.stats.clone(),
            sync: self.sync.clone(),
            snapshots: self.snapshots.clone(),
            state: self.state.read().expect("state lock").clone(),
            seq: self.snapshot_seq,
            floor: self.snapshot_floor.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        #[cfg(feature = "failpoints")]
        if let Some(arg) = crate::failpoints::eval(crate::failpoints::SNAPSHOT_BEFORE_INSTALL).await {
            let why = std::io::Error::other(format!("failpoint {}: {arg}", crate::failpoints::SNAPSHOT_BEFORE_INSTALL));
            return Err(openraft::StorageIOError::write_snapshot(Some(meta.signature()), &why).into());
        }
        let started = std::time::Instant::now();
        let data = snapshot.into_inner();
        // A snapshot may be far larger than a frame: it has limits of its own.
        let body: SnapshotBody = tandem_wire::decode_snapshot(&data).map_err(read_err)?;
        let mut new_state = body.state;
        // The meta is authoritative for what the snapshot covers.
        new_state.last_applied = meta.last_log_id;
        new_state.membership = meta.last_membership.clone();

        let mut batch = sled::Batch::default();
        for kv in self.tree.iter() {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        for (key, obj) in new_state.map.objects() {
            batch.insert(key.encode(), encode(&obj)?);
        }
        batch.insert(KEY_APPLIED, encode(&new_state.last_applied)?);
        batch.insert(KEY_MEMBERSHIP, encode(&new_state.membership)?);
        self.tree.apply_batch(batch).map_err(write_err)?;
        save_snapshot(&self.sync, &self.snapshots, meta, &data).await?;
        raise_floor(&self.snapshot_floor, meta);
        let applied = new_state.last_applied.map_or(0, |l| l.index);
        *self.state.write().expect("state lock") = new_state;
        self.publish(applied, Vec::new(), true);
        self.stats.note(data.len(), applied, started.elapsed(), false);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        self.current_snapshot()
    }
}
