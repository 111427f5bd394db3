//! The async driver: [`DataPlane`] runs the protocol of [`tandem_replication_core`] for every volume
//! this node holds, over a [`Network`] (the node's `tandem_transport::link::Mesh`, or an
//! in-memory one in tests) and its [`BlockStore`].
//!
//! ## How a host write travels (primary side)
//! 1. [`DataPlane::write`] takes an in-flight permit, registers the write under a token and
//!    calls `Primary::on_write`, then pumps the outputs while still holding the volume's lock.
//! 2. `Output::Write`: the bytes are applied to the local store at once (so local order is
//!    sequence order), the local durability wait is queued on the volume's flusher, and a
//!    record is queued to each member's `PeerSender`, which posts it on the network's
//!    [`RecordLink`] to the member. Over the mesh, the link allocates space in the member's
//!    region for this node and posts a descriptor on the member's ring (replication channel);
//!    the member's region is *credited*, so the descriptor completes only once the member has
//!    taken the bytes out, and the space is reused after that.
//! 3. The member checks the record (epoch, session, order, checksum), applies it, and once it
//!    is durable sends `Acks`. The primary feeds acks to the core; `Output::Complete` answers
//!    the host.
//!
//! ## Everything else
//! - Replica side: records arrive as region completions and are applied strictly in arrival
//!   order by one task; `Open`, `Checksums` and `Chunk` arrive as requests.
//! - Proxying: a node that is not the primary forwards host I/O to the primary. An attempt in
//!   flight to a primary that the committed map replaces is abandoned and re-routed to the new
//!   one (the old one is fenced by the epoch: docs/PROTOCOL.md, "Re-routing"). A request that
//!   finds no serving primary is retried until it is served or fails for a definite reason
//!   ([`IoFail`]); "no serving primary" alone fails it only after [`DataPlaneConfig::hold_time`].
//! - A ticker drives time: ack timeouts, ISR proposals to retry, resync of members that are
//!   back, and the lease: a primary without a lease *pauses* (admits no new I/O, keeps its
//!   state); it steps down when a newer epoch is committed, or when the lease stays lost for
//!   longer than the hold time.
//!
//! ## Where each job lives
//! - this file: the [`DataPlane`] facade, its configuration and the per-volume state;
//!   every queue bound and the relations between the constants (asserted at compile time);
//! - `network.rs`: the [`Network`] and [`RecordLink`] traits; `mesh.rs`: their implementation
//!   over the transport's mesh (rings, credited regions);
//! - `coordinator.rs`: [`Coordinator`], what the driver asks of the metadata store;
//! - `host_io.rs`: routing host I/O here or to the primary, one attempt each, the hold time;
//! - `extents.rs`: a range's allocation map (block status), from the primary;
//! - `primary.rs`: a primary's life (start after earlier ones drained, host writes and reads,
//!   local durability, pause and confirmation); `outputs.rs`: the pump that carries out the
//!   core's outputs, one named step per output, and chunk copies;
//! - `applier.rs`: a volume's local applier (every store access of its primaries, in order);
//! - `replica.rs`: records received, applied in arrival order, acknowledged once durable;
//! - `handler.rs`: requests from peers (`Open`, `Acks`, copies, `Level`, proxied I/O);
//! - `sender.rs`: per peer, the ordered record queue onto the network;
//! - `tick.rs`: the ticker (timeouts, resyncs, the lease, restarts).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_reservations::{Op, Outcome, Refusal};
use tandem_storage::{Admission, BlockStore, Lsn, StoreError};
use tandem_transport::Handler;
use tandem_types::chaos_bugs::Bugs;
use tandem_types::Channel;
use tandem_types::{Epoch, NodeId, Seq, VolumeId, BLOCK_BYTES};
use tandem_wire::data::{Requester, WriteKind};
use tokio::sync::{mpsc, watch, Semaphore};

use tandem_replication_core::{Backup, Phase, RecentLog, CHUNK_BYTES, INFLIGHT_WRITES_MAX};

mod applier;
mod coordinator;
mod extents;
mod handler;
mod host_io;
mod images;
mod mesh;
mod network;
mod outputs;
mod primary;
mod replica;
mod sender;
mod tick;

pub use images::image_size;

#[cfg(doc)]
use applier::Apply;
use applier::{run_applier, ApplyQueue};
pub use coordinator::{Coordinator, ProposeError};
use handler::DataHandler;
use host_io::{check_range, Hold};
pub use network::{Network, RecordLink};
use primary::{new_nonce, Claim, PrimaryDriver};
use replica::{apply_records, read_records, send_acks, RecordWork};
use sender::{PeerSender, SenderEnd};
use tick::tick;

/// The largest piece a host write is cut into; each piece is one sequenced record.
pub const WRITE_PIECE_BYTES_MAX: u64 = 1024 * 1024;
/// The largest range one zeroing record covers (it carries no data).
pub const ZEROES_PIECE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// The largest range one clone record covers (it carries no data; the store applies it in
/// steps of its own).
pub const CLONE_PIECE_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// Proxied host I/O travels on the bulk channel, never on the replication channel: a proxied
/// write waits for acks that a member sends on the replication channel, and a flood of
/// proxied writes from that same member must not take every handler slot of that channel.
const PROXY_CHANNEL: Channel = Channel::Bulk;
/// Bytes of proxied reads a node has in flight at once, over all connections: whatever the
/// hosts ask for, a proxying node holds at most this much read data (plus one piece).
pub const PROXY_READ_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The largest proxied read or write message (well below the frame limit).
pub const PROXY_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Bytes of the region each node keeps for one peer's records.
pub const REGION_BYTES: usize = 8 * 1024 * 1024;
/// A member that does not answer an `Open` within this is declared failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A member that does not take a 1 MiB chunk within this is declared failed.
const COPY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the ticker runs.
const TICK: Duration = Duration::from_millis(100);
/// How often an out-of-sync member is offered a resync.
const RESYNC_RETRY: Duration = Duration::from_secs(1);
/// A proxied write is sequenced within this long of its arrival at the primary, or refused
/// (the proxy retries it): the deadline fence of docs/PROTOCOL.md, "Requests a host gave up
/// on".
pub const PROXIED_WRITE_ADMIT_MAX: Duration = Duration::from_secs(5);
/// A proxying node reports a write failed no sooner than this after its last attempt left
/// plus [`PROXIED_WRITE_ADMIT_MAX`]: time for that attempt to reach the primary.
pub const PROXY_FENCE_MARGIN: Duration = Duration::from_secs(10);
/// Host reads one primary has queued for its local applier at once.
const READS_QUEUED_MAX: usize = 256;
/// Items a local applier hands to one blocking task.
const APPLY_BATCH_MAX: usize = 64;
/// Records received from primaries, decoded and admitted, waiting for the record applier.
const RECORDS_QUEUED_MAX: usize = 1024;
/// Items a volume's local applier may have queued; asserted at every enqueue
/// ([`applier::ApplyQueue::send`]). The queue holds the items of at most two primaries (see
/// [`Apply`]), each at most [`INFLIGHT_WRITES_MAX`] writes and [`READS_QUEUED_MAX`] reads: this
/// is that, doubled, for the chunk reads (one per member) and the barriers (one per primary
/// start and per `Open` answered) besides.
const APPLY_QUEUED_MAX: usize = 4 * (INFLIGHT_WRITES_MAX + READS_QUEUED_MAX);
/// Records of one volume this replica applied and has not acknowledged yet. A primary keeps
/// at most [`INFLIGHT_WRITES_MAX`] writes in flight; this leaves room for the tail of an older
/// epoch's primary and for members being resynced (their writes do not hold the primary's
/// room). When it is full the record applier waits: backpressure to the primaries through
/// [`RECORDS_QUEUED_MAX`] and their regions here.
const ACKS_QUEUED_MAX: usize = 4 * INFLIGHT_WRITES_MAX;
/// `Acks` calls of one volume in flight; the ack sender waits for one to finish before it
/// starts another (the acks keep their order of batches, and nothing piles up behind a slow
/// primary).
const ACK_CALLS_IN_FLIGHT_MAX: usize = 64;
/// Records of one volume queued to one peer and not yet posted on its ring. A member that
/// gates writes has at most [`INFLIGHT_WRITES_MAX`] of them per primary of the volume on this
/// node (a write completes only once the member took its record); one being resynced gates
/// nothing, and at this bound it is failed (its resync starts over) rather than queued without
/// end. The slack covers a deposed primary's tail.
const SEND_QUEUED_PER_VOLUME_MAX: usize = 4 * INFLIGHT_WRITES_MAX;
/// `Nack`s in flight from this node. At the bound a refusal is not sent: the primary then
/// times the member out, which fails it just the same (later).
const NACKS_IN_FLIGHT_MAX: usize = 256;
/// Tasks one primary runs for its outputs: `Open`s, chunk copies and progress reports (an ISR
/// proposal is not counted: the core keeps one in flight at most). A member gets a new `Open`
/// or copy only once its previous one answered or its session ended, at most once per
/// [`RESYNC_RETRY`], and each lives at most [`OPEN_TIMEOUT`] or [`COPY_TIMEOUT`] after its
/// local read: a volume's few members stay far below this. At the bound an `Open` or a copy
/// fails its member (resync retries it) and a progress report is skipped (display only; a lost
/// `Level` only makes reconciliation slower, never wrong).
const OUTPUT_TASKS_MAX: usize = 256;
/// How long a replica waits for a volume it has not heard of yet (a peer's Raft apply can be
/// ahead of ours).
const VOLUME_WAIT: Duration = Duration::from_secs(8);
/// The default [`DataPlaneConfig::ack_timeout`].
const ACK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(2);

// A record (one write piece and its header) must fit in the peer's region for this node, or
// its sender waits for room forever.
const _: () = assert!(WRITE_PIECE_BYTES_MAX + 64 * 1024 <= REGION_BYTES as u64);
// A replica waits for an unknown volume for less than the primary waits for the answer to its
// `Open`: a restarting node first catches up with the map.
const _: () = assert!(VOLUME_WAIT.as_millis() < OPEN_TIMEOUT.as_millis());
// The ticker runs several times per resync retry, and per deadline fence of a proxied write.
const _: () = assert!(TICK.as_millis() < RESYNC_RETRY.as_millis());
const _: () = assert!(TICK.as_millis() < PROXIED_WRITE_ADMIT_MAX.as_millis());
// A backup failure (its `Open` unanswered, or a write unacknowledged, then the shrink) is
// dealt with well within the hold time: the host sees latency, never an error.
const _: () = assert!(OPEN_TIMEOUT.as_millis() + ACK_TIMEOUT_DEFAULT.as_millis() < HOLD_TIME_DEFAULT.as_millis());
// A proxied read piece fits in the proxy read budget.
const _: () = assert!(PROXY_BYTES_MAX <= PROXY_READ_BYTES_MAX);
// One batch of the appliers fits in their queues.
const _: () = assert!(APPLY_BATCH_MAX <= RECORDS_QUEUED_MAX && APPLY_BATCH_MAX <= APPLY_QUEUED_MAX);

/// Why host I/O failed. Only [`IoFail::Unavailable`] is retried inside the data plane; every
/// other variant is a definite reason that reaches the host.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IoFail {
    #[error("no volume named {0:?}")]
    NoVolume(String),
    #[error("{0}")]
    Invalid(String),
    /// No serving primary could take the request just now (a failover, a lapsed lease, a
    /// primary that moved). Retried by [`DataPlane`]; reaches a host only once the request
    /// went unserved for the whole [`DataPlaneConfig::hold_time`].
    #[error("volume unavailable: {0}")]
    Unavailable(String),
    /// This node has been cut off from the metadata majority (no lease) for longer than the
    /// hold time: it cannot know who serves the volume.
    #[error("cut off from the cluster: {0}")]
    CutOff(String),
    /// The data plane is stopping (the node shuts down).
    #[error("shutting down: {0}")]
    Stopping(String),
    #[error("I/O error: {0}")]
    Io(String),
    /// The host may not use the volume (the primary's LUN-masking check); definite.
    #[error("not permitted: {0}")]
    Denied(String),
    /// A persistent reservation excludes the request (it was not executed); definite.
    #[error("{0}")]
    Conflict(String),
}

/// A volume as committed in the cluster map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeConfig {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub replicas: Vec<NodeId>,
    pub primary: NodeId,
    pub isr: Vec<NodeId>,
    pub epoch: Epoch,
    /// The start of the primary that claimed this epoch, if one did.
    pub claim: Option<u64>,
    /// A read-only snapshot: every write is refused.
    pub read_only: bool,
    /// On whose behalf host I/O made with this configuration runs: requests proxied to the
    /// primary carry it, and the primary checks it ([`Coordinator::may_access`]). `None` in the
    /// committed configuration; a host protocol's opened volume sets it.
    pub requester: Option<Requester>,
}

#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    /// A member that does not acknowledge a write for this long leaves the ISR.
    pub ack_timeout: Duration,
    /// The hold time (multipath's `no_path_retry`, as a duration): a host request that finds
    /// no serving primary keeps being retried for this long before it fails, and a node
    /// without a lease for this long fails what it holds. A failover, a paused node or a lease
    /// blip cost the host latency below this, never an error.
    pub hold_time: Duration,
}

/// The default [`DataPlaneConfig::hold_time`]: many failovers long (one takes 3 to 8 s here,
/// a leader's crash included), and well below the 180 s a Linux SCSI or NBD host waits.
pub const HOLD_TIME_DEFAULT: Duration = Duration::from_secs(30);

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig { ack_timeout: ACK_TIMEOUT_DEFAULT, hold_time: HOLD_TIME_DEFAULT }
    }
}

/// Resync figures of one volume on this node (when it is the primary), for status and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VolumeStats {
    pub id: VolumeId,
    pub name: String,
    pub serving: bool,
    /// Bytes sent to other replicas by resync and reconciliation since this node started.
    pub resync_bytes_sent: u64,
    /// Bytes compared (by checksum) by resync and reconciliation since this node started.
    pub resync_bytes_compared: u64,
}

/// The data plane of one node.
#[derive(Clone)]
pub struct DataPlane<S: BlockStore> {
    inner: Arc<Inner<S>>,
}

struct Inner<S: BlockStore> {
    me: NodeId,
    net: Arc<dyn Network>,
    store: Arc<S>,
    coord: Arc<dyn Coordinator>,
    config: DataPlaneConfig,
    volumes: Mutex<HashMap<VolumeId, Arc<Vol>>>,
    /// Every volume of the cluster, including those this node holds no copy of (it proxies
    /// their I/O to their primary).
    configs: Mutex<HashMap<VolumeId, VolumeConfig>>,
    /// Bumped on every configuration change; waiters re-read the volumes.
    version: watch::Sender<u64>,
    /// This node's record senders, per peer, with the signal of each one's end. Peers that
    /// leave the configuration are dropped from it ([`Inner::retire_senders`]).
    senders: Mutex<HashMap<NodeId, (Arc<PeerSender>, SenderEnd)>>,
    /// Senders dropped from `senders` whose tasks may still be delivering: a new sender to the
    /// same peer waits for the end of the old one. Finished ones are pruned at each retirement.
    senders_ending: Mutex<HashMap<NodeId, SenderEnd>>,
    /// Wire sequence numbers are unique for the life of the process, across primaries.
    next_wire_seq: AtomicU64,
    /// Bytes copied by [`DataPlane::copy`] through this node: by reference, and streamed.
    copied_by_reference: AtomicU64,
    copied_streamed: AtomicU64,
    /// [`PROXY_READ_BYTES_MAX`], in blocks.
    proxy_read_budget: Semaphore,
    /// Since when this node has had no lease (kept by the ticker), for the hold time.
    lease_lost_at: Mutex<Option<Instant>>,
    /// Records from every primary, in arrival order, for the record applier.
    records: mpsc::Sender<RecordWork>,
    /// [`NACKS_IN_FLIGHT_MAX`].
    nacks: Arc<Semaphore>,
    /// The store's failure was logged ([`Inner::store_failed`]).
    store_failure_logged: AtomicBool,
    /// Images this process made in its store (`images.rs`). A volume made from one (a clone,
    /// a snapshot: the image's id is the volume's) holds, when its configuration first
    /// arrives, exactly what every other holder holds, so its first primary has nothing to
    /// reconcile. Forgotten at a restart (the copy's past is unknown then); a few ids at most
    /// between an image and its volume, each removed when its volume arrives or when the
    /// sweeper deletes the image.
    made_images: Mutex<BTreeSet<VolumeId>>,
    /// Bytes [`DataPlane::read`] returned (host reads through this node), for `/metrics`.
    host_read_bytes: AtomicU64,
}

struct Vol {
    cfg: Mutex<VolumeConfig>,
    backup: Mutex<Backup>,
    recent: Mutex<RecentLog>,
    primary: Mutex<Option<Arc<PrimaryDriver>>>,
    /// This node's local applier for the volume: every store access of its primaries (writes,
    /// host reads, reads of chunks to copy), in sequence order, off the async workers.
    apply: ApplyQueue,
    /// Records of this volume that this replica applied and must acknowledge once durable
    /// ([`ACKS_QUEUED_MAX`]).
    acks: mpsc::Sender<(NodeId, Epoch, Seq, Lsn)>,
    resync_bytes_sent: AtomicU64,
    resync_bytes_compared: AtomicU64,
    /// This node's claim of the volume's epoch for its next primary.
    claim: Mutex<Claim>,
}

impl<S: BlockStore> DataPlane<S> {
    /// Starts the data plane: registers as the handler of the replication and bulk channels
    /// and starts the record reader and the ticker.
    /// `net` is the node-to-node network: the node's `tandem_transport::link::Mesh`, or an
    /// in-memory one in tests.
    pub fn start(
        me: NodeId,
        net: impl Network,
        store: Arc<S>,
        coord: Arc<dyn Coordinator>,
        config: DataPlaneConfig,
    ) -> Self {
        let net: Arc<dyn Network> = Arc::new(net);
        let (version, _) = watch::channel(0);
        let (records, records_rx) = mpsc::channel(RECORDS_QUEUED_MAX);
        let inner = Arc::new(Inner {
            me,
            net: net.clone(),
            store,
            coord,
            config,
            volumes: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
            version,
            senders: Mutex::new(HashMap::new()),
            senders_ending: Mutex::new(HashMap::new()),
            next_wire_seq: AtomicU64::new(1),
            copied_by_reference: AtomicU64::new(0),
            copied_streamed: AtomicU64::new(0),
            proxy_read_budget: Semaphore::new((PROXY_READ_BYTES_MAX / BLOCK_BYTES) as usize),
            lease_lost_at: Mutex::new(None),
            records,
            nacks: Arc::new(Semaphore::new(NACKS_IN_FLIGHT_MAX)),
            store_failure_logged: AtomicBool::new(false),
            made_images: Mutex::new(BTreeSet::new()),
            host_read_bytes: AtomicU64::new(0),
        });
        let handler: Arc<dyn Handler> = Arc::new(DataHandler { inner: Arc::downgrade(&inner) });
        net.serve(Channel::Replication, handler.clone());
        net.serve(Channel::Bulk, handler);
        tokio::spawn(read_records(Arc::downgrade(&inner), net));
        tokio::spawn(apply_records(Arc::downgrade(&inner), records_rx));
        tokio::spawn(tick(Arc::downgrade(&inner)));
        DataPlane { inner }
    }

    /// Makes sure every peer can write records into a region of this node.
    pub fn set_peers(&self, peers: &[NodeId]) {
        for &p in peers.iter().filter(|&&p| p != self.inner.me) {
            if let Err(e) = self.inner.net.accept_records_from(p) {
                tracing::error!(peer = %p, error = %e, "cannot register a replication region");
            }
        }
    }

    /// Brings the node in line with the committed volumes: creates and deletes local copies,
    /// fences old epochs, and starts or stops being primary. `volumes` is every volume of the
    /// cluster; see [`DataPlane::apply_changes`] for a change to a few.
    pub fn apply_config(&self, volumes: Vec<VolumeConfig>) {
        let inner = &self.inner;
        let deleted: Vec<VolumeId> = {
            let mut configs = inner.configs.lock().expect("configs lock");
            *configs = volumes.iter().map(|v| (v.id, v.clone())).collect();
            let vols = inner.volumes.lock().expect("volumes lock");
            vols.keys().filter(|id| !configs.contains_key(id)).copied().collect()
        };
        self.update(volumes, deleted, true);
    }

    /// Like [`DataPlane::apply_config`], for the volumes that changed: `changed` holds their
    /// new configurations, `deleted` the ids of volumes that no longer exist. The cost is
    /// that of the change, not of the number of volumes.
    pub fn apply_changes(&self, changed: Vec<VolumeConfig>, deleted: Vec<VolumeId>) {
        let inner = &self.inner;
        let holders_changed = {
            let mut configs = inner.configs.lock().expect("configs lock");
            let mut holders_changed = false;
            for id in &deleted {
                holders_changed |= configs.remove(id).is_some();
            }
            for v in &changed {
                let old = configs.insert(v.id, v.clone());
                holders_changed |= old.is_none_or(|o| o.replicas != v.replicas);
            }
            holders_changed
        };
        self.update(changed, deleted, holders_changed);
    }

    fn update(&self, volumes: Vec<VolumeConfig>, deleted: Vec<VolumeId>, holders_changed: bool) {
        let inner = &self.inner;
        if holders_changed {
            // Records go only to nodes holding a copy of some volume.
            let holders: BTreeSet<NodeId> =
                inner.configs.lock().expect("configs lock").values().flat_map(|v| v.replicas.iter().copied()).collect();
            inner.retire_senders(&holders);
        }
        let mut gone_ids = deleted;
        let mut mine = Vec::new();
        for v in volumes {
            if v.replicas.contains(&inner.me) {
                mine.push(v);
            } else {
                // No longer (or never) a replica here.
                gone_ids.push(v.id);
            }
        }
        let gone: Vec<(VolumeId, Arc<Vol>)> = {
            let mut vols = inner.volumes.lock().expect("volumes lock");
            gone_ids.into_iter().filter_map(|id| vols.remove(&id).map(|v| (id, v))).collect()
        };
        for (id, vol) in gone {
            if let Some(p) = vol.primary.lock().expect("primary lock").take() {
                p.depose(inner, "the volume was deleted");
            }
            if let Err(e) = inner.store.delete_volume(id) {
                tracing::error!(volume = %id, error = %e, "cannot delete the local copy");
            }
        }
        for cfg in mine {
            let id = cfg.id;
            let vol = {
                let mut vols = inner.volumes.lock().expect("volumes lock");
                match vols.get(&id) {
                    Some(v) => v.clone(),
                    None => {
                        let fresh = cfg.epoch == Epoch(1);
                        let made_here = inner.made_images.lock().expect("images lock").remove(&id);
                        let existed = inner.store.volume_size(id).is_some() && !made_here;
                        if let Err(e) = inner.store.create_volume(id, cfg.size_bytes) {
                            tracing::error!(volume = %id, error = %e, "cannot create the local copy");
                            continue;
                        }
                        let (acks, rx) = mpsc::channel(ACKS_QUEUED_MAX);
                        let (apply, apply_rx) = ApplyQueue::new();
                        let v = Arc::new(Vol {
                            cfg: Mutex::new(cfg.clone()),
                            backup: Mutex::new(Backup::default()),
                            // A copy made just now holds zeros like every other copy of a new
                            // volume; a copy that was already on disk has an unknown past.
                            recent: Mutex::new(if fresh && !existed {
                                RecentLog::fresh()
                            } else {
                                RecentLog::after_restart()
                            }),
                            primary: Mutex::new(None),
                            apply,
                            acks,
                            resync_bytes_sent: AtomicU64::new(0),
                            resync_bytes_compared: AtomicU64::new(0),
                            claim: Mutex::new(Claim::default()),
                        });
                        tokio::spawn(send_acks(Arc::downgrade(inner), id, rx));
                        tokio::spawn(run_applier(Arc::downgrade(inner), apply_rx));
                        vols.insert(id, v.clone());
                        v
                    }
                }
            };
            *vol.cfg.lock().expect("cfg lock") = cfg.clone();
            {
                let mut backup = vol.backup.lock().expect("backup lock");
                // Planted bugs (chaos-bugs) switched since take effect here or at the next open.
                backup.set_bugs(Bugs::current());
                backup.on_epoch(cfg.epoch);
            }
            inner.reconcile_role(id, &vol);
        }
        inner.version.send_modify(|v| *v += 1);
    }

    pub fn stats(&self) -> Vec<VolumeStats> {
        let vols: Vec<(VolumeId, Arc<Vol>)> =
            self.inner.volumes.lock().expect("volumes lock").iter().map(|(k, v)| (*k, v.clone())).collect();
        vols.into_iter()
            .map(|(id, v)| VolumeStats {
                id,
                name: v.cfg.lock().expect("cfg lock").name.clone(),
                serving: v.serving_primary().is_some(),
                resync_bytes_sent: v.resync_bytes_sent.load(Ordering::Relaxed),
                resync_bytes_compared: v.resync_bytes_compared.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// A digest of this node's own copy of volume `id` (FNV-1a over its per-block checksums),
    /// to compare replicas. Not proxied: it says what this node holds.
    pub fn local_digest(&self, id: VolumeId) -> Result<u64, String> {
        let size = self.inner.volume(id).ok_or("no local copy")?.cfg.lock().expect("cfg lock").size_bytes;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut at = 0;
        while at < size {
            let len = (size - at).min(CHUNK_BYTES * 64);
            for sum in self.inner.store.block_checksums(id, at, len).map_err(|e| e.to_string())? {
                for b in sum.to_be_bytes() {
                    h ^= b as u64;
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
            }
            at += len;
        }
        Ok(h)
    }

    /// A digest of the data of this node's own copy of volume `id`, read from its store: the
    /// crc32c of each block as read, folded like [`DataPlane::local_digest`], so the two agree
    /// when the store's data matches its index. Reads the whole copy (blocking, slow on large
    /// volumes): for tests that compare what each replica holds, not for status.
    pub fn local_data_digest(&self, id: VolumeId) -> Result<u64, String> {
        let size = self.inner.volume(id).ok_or("no local copy")?.cfg.lock().expect("cfg lock").size_bytes;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut buf = vec![0u8; (CHUNK_BYTES as usize).min(size as usize)];
        let mut at = 0;
        while at < size {
            let len = (size - at).min(CHUNK_BYTES) as usize;
            self.inner.store.read(id, at, &mut buf[..len]).map_err(|e| e.to_string())?;
            for block in buf[..len].chunks(BLOCK_BYTES as usize) {
                for b in crc32c::crc32c(block).to_be_bytes() {
                    h ^= b as u64;
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
            }
            at += len as u64;
        }
        Ok(h)
    }

    /// The committed configuration of the volume named `name`. Any node serves any volume:
    /// those it holds no copy of are proxied to their primary.
    pub fn volume_by_name(&self, name: &str) -> Option<VolumeConfig> {
        self.inner.configs.lock().expect("configs lock").values().find(|v| v.name == name).cloned()
    }

    /// Every volume's name, for NBD's export list.
    pub fn volume_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.inner.configs.lock().expect("configs lock").values().map(|v| v.name.clone()).collect();
        names.sort();
        names
    }

    /// Reads `buf.len()` bytes at `offset` of volume `id` (served here or proxied).
    pub async fn read(&self, cfg: &VolumeConfig, offset: u64, buf: &mut [u8]) -> Result<(), IoFail> {
        check_range(cfg, offset, buf.len() as u64)?;
        let mut hold = Hold::new(&self.inner);
        let mut done = 0usize;
        while done < buf.len() {
            let piece = (buf.len() - done).min(PROXY_BYTES_MAX as usize);
            let at = offset + done as u64;
            let target = &mut buf[done..done + piece];
            loop {
                match self.inner.clone().read_once(cfg.id, cfg.requester.clone(), at, target).await {
                    Err(IoFail::Unavailable(why)) => hold.wait(&self.inner, why).await?,
                    other => {
                        other?;
                        break;
                    }
                }
            }
            done += piece;
        }
        self.inner.host_read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes host reads through this node returned since it started (served here or
    /// proxied): what a sparse copy skipped shows here.
    pub fn host_read_bytes(&self) -> u64 {
        self.inner.host_read_bytes.load(Ordering::Relaxed)
    }

    /// Writes `data` at `offset` (served here or proxied); returns once durable on every
    /// in-sync replica.
    pub async fn write(&self, cfg: &VolumeConfig, offset: u64, data: Bytes) -> Result<(), IoFail> {
        check_range(cfg, offset, data.len() as u64)?;
        check_writable(cfg)?;
        let mut hold = Hold::new(&self.inner);
        // One identity for every attempt of this request, wherever it is retried.
        let write = new_nonce();
        let mut done = 0usize;
        while done < data.len() {
            let piece = (data.len() - done).min(PROXY_BYTES_MAX as usize);
            let part = data.slice(done..done + piece);
            let at = offset + done as u64;
            let mut last = None;
            self.inner
                .retry(&mut hold, |inner| {
                    let part = part.clone();
                    let before = inner.before_attempt(cfg.id, &mut last);
                    async move {
                        before.await;
                        let requester = cfg.requester.clone();
                        inner.write_once(cfg.id, requester, write, WriteKind::Data, at, part.len() as u64, part).await
                    }
                })
                .await?;
            done += piece;
        }
        Ok(())
    }

    /// Makes a range read as zeros (WRITE_ZEROES and TRIM).
    pub async fn write_zeroes(&self, cfg: &VolumeConfig, offset: u64, len: u64) -> Result<(), IoFail> {
        check_range(cfg, offset, len)?;
        check_writable(cfg)?;
        let mut hold = Hold::new(&self.inner);
        let write = new_nonce();
        let mut last = None;
        self.inner
            .retry(&mut hold, |inner| {
                let before = inner.before_attempt(cfg.id, &mut last);
                async move {
                    before.await;
                    let requester = cfg.requester.clone();
                    inner.write_once(cfg.id, requester, write, WriteKind::Zeroes, offset, len, Bytes::new()).await
                }
            })
            .await
    }

    /// SCSI COMPARE AND WRITE (served here or proxied): writes `data` at `offset` only if the
    /// range holds `expected` (as long), atomically at the primary against every other write;
    /// `Ok(Some(i))` when byte `i` differs and nothing was written. Returns once the write is
    /// durable on every in-sync replica. A retry after a failover is not compared against its
    /// own effect: it carries the first attempt's identity.
    pub async fn compare_and_write(
        &self,
        cfg: &VolumeConfig,
        offset: u64,
        expected: Bytes,
        data: Bytes,
    ) -> Result<Option<u64>, IoFail> {
        check_range(cfg, offset, data.len() as u64)?;
        check_writable(cfg)?;
        check_compare_and_write(&expected, &data)?;
        let mut hold = Hold::new(&self.inner);
        let write = new_nonce();
        let mut last = None;
        self.inner
            .retry(&mut hold, |inner| {
                let (expected, data) = (expected.clone(), data.clone());
                let before = inner.before_attempt(cfg.id, &mut last);
                async move {
                    before.await;
                    inner.compare_and_write_once(cfg.id, cfg.requester.clone(), write, offset, expected, data).await
                }
            })
            .await
    }

    /// A persistent-reservation command made through the nexus of `cfg`'s requester, executed
    /// by the primary in order with the volume's writes: writes sequenced before it are
    /// acknowledged before it commits, and every write sequenced after it is checked against
    /// the state it made. Retried through failovers like a write, with one id, so it applies
    /// once. `Ok(Err(_))`: the reservations refused it (nothing changed).
    pub async fn reserve(&self, cfg: &VolumeConfig, op: Op) -> Result<Result<Outcome, Refusal>, IoFail> {
        let Some(requester) = cfg.requester.clone() else {
            return Err(IoFail::Invalid("a reservation command needs the requester's nexus".into()));
        };
        let mut hold = Hold::new(&self.inner);
        let id = new_nonce();
        self.inner
            .retry(&mut hold, |inner| {
                let (requester, op) = (requester.clone(), op.clone());
                async move { inner.reserve_once(cfg.id, requester, id, op).await }
            })
            .await
    }

    /// Makes `image`, a frozen copy by reference of `ranges` of the volume (block-aligned,
    /// concatenated), on its primary and every in-sync member, ordered with the writes
    /// (docs/PROTOCOL.md, "Copy by reference"). Returns the nodes holding it, the primary first.
    /// `cfg`'s requester must be allowed to read the ranges. Retried through failovers.
    pub async fn make_image(
        &self,
        cfg: &VolumeConfig,
        image: VolumeId,
        ranges: Vec<(u64, u64)>,
    ) -> Result<Vec<NodeId>, IoFail> {
        image_size(&ranges, cfg.size_bytes)?;
        let mut hold = Hold::new(&self.inner);
        self.inner
            .retry(&mut hold, |inner| {
                let ranges = ranges.clone();
                async move { inner.make_image_once(cfg.id, cfg.requester.clone(), image, ranges).await }
            })
            .await
    }

    /// Writes `len` bytes of `image` from `image_offset` at `offset` of the volume, by reference
    /// where every in-sync replica holds the image (`Ok(true)`), streamed from one of
    /// `holders` otherwise (`Ok(false)`). Durable on every in-sync replica when it returns;
    /// retried through failovers with one identity, so no piece lands twice.
    pub async fn copy(
        &self,
        cfg: &VolumeConfig,
        offset: u64,
        image: VolumeId,
        image_offset: u64,
        len: u64,
        holders: Vec<NodeId>,
    ) -> Result<bool, IoFail> {
        check_range(cfg, offset, len)?;
        check_writable(cfg)?;
        let mut hold = Hold::new(&self.inner);
        let write = new_nonce();
        let by_reference = self
            .inner
            .retry(&mut hold, |inner| {
                let holders = holders.clone();
                async move {
                    inner
                        .copy_once(cfg.id, cfg.requester.clone(), write, offset, image, image_offset, len, holders)
                        .await
                }
            })
            .await?;
        let counter = if by_reference { &self.inner.copied_by_reference } else { &self.inner.copied_streamed };
        counter.fetch_add(len, Ordering::Relaxed);
        Ok(by_reference)
    }

    /// Bytes copied by [`DataPlane::copy`] through this node since it started: (by reference,
    /// streamed).
    pub fn copied_bytes(&self) -> (u64, u64) {
        (self.inner.copied_by_reference.load(Ordering::Relaxed), self.inner.copied_streamed.load(Ordering::Relaxed))
    }

    /// Reads `buf.len()` bytes of `image` at `offset` from this node's copy or a holder's.
    pub async fn read_image(
        &self,
        image: VolumeId,
        offset: u64,
        buf: &mut [u8],
        holders: &[NodeId],
    ) -> Result<(), IoFail> {
        let mut done = 0usize;
        while done < buf.len() {
            let piece = (buf.len() - done).min(PROXY_BYTES_MAX as usize);
            let data = self.inner.read_image(image, offset + done as u64, piece as u64, holders).await?;
            buf[done..done + piece].copy_from_slice(&data);
            done += piece;
        }
        Ok(())
    }

    /// The store ids this node holds that no volume of the configuration claims: images (and
    /// copies of volumes that are gone, being released).
    pub fn unclaimed_store_ids(&self) -> Vec<(VolumeId, u64)> {
        let configs = self.inner.configs.lock().expect("configs lock");
        self.inner.store.volumes().into_iter().filter(|(id, _)| !configs.contains_key(id)).collect()
    }

    /// The local store's space accounting (a block shared by clones, snapshots and images
    /// counts once in its `live_bytes`).
    pub fn store_space(&self) -> tandem_storage::SpaceStats {
        self.inner.store.space()
    }

    /// Deletes an image held here (never a volume of the configuration).
    pub fn delete_image(&self, image: VolumeId) -> Result<(), IoFail> {
        if self.inner.configs.lock().expect("configs lock").contains_key(&image) {
            return Err(IoFail::Invalid(format!("{image} is a volume, not an image")));
        }
        self.inner.made_images.lock().expect("images lock").remove(&image);
        self.inner.store.delete_volume(image).map_err(|e| IoFail::Io(e.to_string()))
    }

    /// Every acknowledged write is already durable on every in-sync replica, so a flush only
    /// has to confirm that the volume is still served.
    pub async fn flush(&self, cfg: &VolumeConfig) -> Result<(), IoFail> {
        let mut hold = Hold::new(&self.inner);
        self.inner.retry(&mut hold, |inner| async move { inner.flush_once(cfg.id, cfg.requester.clone()).await }).await
    }
}

/// Refuses a write to a read-only snapshot.
fn check_writable(cfg: &VolumeConfig) -> Result<(), IoFail> {
    if cfg.read_only {
        return Err(IoFail::Invalid(format!("volume {:?} is a read-only snapshot", cfg.name)));
    }
    Ok(())
}

/// A compare and write compares and writes as many bytes, one piece at most (one record, so
/// one sequencing).
pub(super) fn check_compare_and_write(expected: &[u8], data: &[u8]) -> Result<(), IoFail> {
    if expected.len() != data.len() || data.is_empty() || data.len() as u64 > WRITE_PIECE_BYTES_MAX {
        return Err(IoFail::Invalid(format!(
            "compare and write of {} bytes against {} expected: both must be equal, 1 to {WRITE_PIECE_BYTES_MAX}",
            data.len(),
            expected.len()
        )));
    }
    Ok(())
}

/// Applies one record's change to the local copy: its data, its zeroes, or its clone of an
/// image held here.
pub(super) fn apply_change<S: BlockStore>(
    store: &S,
    admission: Admission,
    volume: VolumeId,
    kind: WriteKind,
    offset: u64,
    len: u64,
    data: &[u8],
) -> Result<Lsn, StoreError> {
    match kind {
        WriteKind::Data => store.write_admitted(admission, volume, offset, data),
        WriteKind::Zeroes => store.write_zeroes_admitted(admission, volume, offset, len),
        WriteKind::Clone { image, image_offset } => {
            drop(admission);
            store.clone_range(image, image_offset, volume, offset, len)
        }
    }
}

impl Vol {
    fn serving_primary(&self) -> Option<Arc<PrimaryDriver>> {
        let p = self.primary.lock().expect("primary lock").clone()?;
        let serving = *p.phase.borrow() == Phase::Serving;
        serving.then_some(p)
    }
}

impl<S: BlockStore> Inner<S> {
    fn volume(&self, id: VolumeId) -> Option<Arc<Vol>> {
        self.volumes.lock().expect("volumes lock").get(&id).cloned()
    }
}
