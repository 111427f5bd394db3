//! The async driver: [`DataPlane`] runs the protocol of [`crate::protocol`] for every volume
//! this node holds, over the node's [`Mesh`] and its [`BlockStore`].
//!
//! ## How a host write travels (primary side)
//! 1. [`DataPlane::write`] takes an in-flight permit, registers the write under a token and
//!    calls `Primary::on_write`, then pumps the outputs while still holding the volume's lock.
//! 2. `Output::Write`: the bytes are applied to the local store at once (so local order is
//!    sequence order), the local durability wait is queued on the volume's flusher, and a
//!    record is queued to each member's [`PeerSender`]. The sender allocates space in the
//!    member's region for this node and posts a descriptor on the member's ring (replication
//!    channel); the member's region is *credited*, so the descriptor completes only once the
//!    member has taken the bytes out, and the space is reused after that.
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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_storage::{Admission, BlockStore, Lsn};
use tandem_transport::link::Mesh;
use tandem_transport::ring::{Descriptor, DescriptorRing, RegionRegistry};
use tandem_transport::{BoxFuture, Channel, Handler};
use tandem_types::{Epoch, NodeId, Seq, VolumeId, BLOCK_BYTES};
use tandem_wire::data::{decode_record, encode_record, DataMsg, DataReply, RecordHeader, WriteKind};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::protocol::{Backup, Output, Phase, Primary, PrimaryConfig, RecentLog, Token, CHUNK_BYTES};

/// The largest piece a host write is cut into; each piece is one sequenced record.
pub const WRITE_PIECE_BYTES_MAX: u64 = 1024 * 1024;
/// The largest range one zeroing record covers (it carries no data).
pub const ZEROES_PIECE_BYTES_MAX: u64 = 64 * 1024 * 1024;
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
/// Descriptors in flight per peer ring.
const RING_SLOTS: usize = 256;
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

/// What the data plane needs from the metadata store. The node implements it over Raft.
pub trait Coordinator: Send + Sync + 'static {
    /// Commits `isr` as the in-sync set of `volume` if its epoch is still `epoch`.
    fn propose_isr(&self, volume: VolumeId, epoch: Epoch, isr: Vec<NodeId>) -> BoxFuture<'_, Result<(), ProposeError>>;
    /// Publishes resync progress (for `tandem volume list`); `total_bytes == 0` clears it.
    fn report_progress(&self, volume: VolumeId, node: NodeId, done_bytes: u64, total_bytes: u64) -> BoxFuture<'_, ()>;
    /// Whether this node holds its lease: it heard from the Raft majority recently enough
    /// that no other node can have been made primary of its volumes.
    fn lease_valid(&self) -> bool;
    /// Whether this node is still the committed primary of `volume` in `epoch`, by a
    /// linearizable read. A primary that lost its lease and got it back asks this before it
    /// serves again: the lease says no *new* failover can begin, not that none happened
    /// while it was away (its copy of the map may not show that yet).
    fn confirm_primary(&self, volume: VolumeId, epoch: Epoch) -> BoxFuture<'_, Result<bool, ProposeError>>;
    /// Claims `epoch` of `volume` for a new start of this node's primary, identified by
    /// `nonce` (`MetaCmd::ClaimPrimary`): the committed map then names this claim, in this
    /// epoch if no earlier start claimed it, else in the next one. A primary is built only in
    /// an epoch its own claim holds, so no two starts ever share an epoch (docs/PROTOCOL.md,
    /// "One primary per epoch").
    fn claim_primary(&self, volume: VolumeId, epoch: Epoch, nonce: u64) -> BoxFuture<'_, Result<(), ProposeError>>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// The configuration moved on (another epoch): the proposer is deposed.
    #[error("refused: {0}")]
    Refused(String),
    /// No leader could be reached; try again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

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
        DataPlaneConfig { ack_timeout: Duration::from_secs(2), hold_time: HOLD_TIME_DEFAULT }
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
    mesh: Mesh,
    store: Arc<S>,
    coord: Arc<dyn Coordinator>,
    config: DataPlaneConfig,
    volumes: Mutex<HashMap<VolumeId, Arc<Vol>>>,
    /// Every volume of the cluster, including those this node holds no copy of (it proxies
    /// their I/O to their primary).
    configs: Mutex<HashMap<VolumeId, VolumeConfig>>,
    /// Bumped on every configuration change; waiters re-read the volumes.
    version: watch::Sender<u64>,
    senders: Mutex<HashMap<NodeId, Arc<PeerSender>>>,
    /// Wire sequence numbers are unique for the life of the process, across primaries.
    next_wire_seq: AtomicU64,
    /// [`PROXY_READ_BYTES_MAX`], in blocks.
    proxy_read_budget: Semaphore,
    /// Since when this node has had no lease (kept by the ticker), for the hold time.
    lease_lost_at: Mutex<Option<Instant>>,
    /// Records from every primary, in arrival order, for the record applier.
    records: mpsc::Sender<RecordWork>,
}

struct Vol {
    cfg: Mutex<VolumeConfig>,
    backup: Mutex<Backup>,
    recent: Mutex<RecentLog>,
    primary: Mutex<Option<Arc<PrimaryDriver>>>,
    /// This node's local applier for the volume: every store access of its primaries (writes,
    /// host reads, reads of chunks to copy), in sequence order, off the async workers.
    apply: mpsc::UnboundedSender<Apply>,
    /// Records of this volume that this replica applied and must acknowledge once durable.
    acks: mpsc::UnboundedSender<(NodeId, Epoch, Seq, Lsn)>,
    resync_bytes_sent: AtomicU64,
    resync_bytes_compared: AtomicU64,
    /// This node's claim of the volume's epoch for its next primary.
    claim: Mutex<Claim>,
}

/// A claim of an epoch for the next start of this node's primary.
#[derive(Default)]
struct Claim {
    /// The nonce proposed, kept until a primary is built with it (a proposal whose outcome is
    /// unknown is repeated with the same nonce).
    nonce: Option<u64>,
    /// A proposal is under way.
    proposing: bool,
}

/// A value no other start of a primary on this node has used: the time, the process and a
/// counter, mixed.
fn new_nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ (u64::from(std::process::id()) << 40) ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(20);
    // splitmix64's finalizer.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

/// The primary of one volume for one epoch: the protocol core and what the driver keeps
/// beside it.
struct PrimaryDriver {
    volume: VolumeId,
    epoch: Epoch,
    st: Mutex<CoreState>,
    /// In-flight host writes ([`crate::protocol::INFLIGHT_WRITES_MAX`]). A permit lives with
    /// the sequenced write (in its [`HostWrite`]) until the core completes or fails it, not
    /// with the host's request: a host that gives up on a request does not free its room
    /// while the write is still in flight.
    room: Arc<Semaphore>,
    /// Host reads queued for the local applier ([`READS_QUEUED_MAX`]).
    reads: Semaphore,
    phase: watch::Sender<Phase>,
    /// Local durability waits, in sequence order.
    local: mpsc::UnboundedSender<(Seq, Lsn)>,
    /// The volume's local applier (shared with this node's earlier and later primaries of the
    /// volume, so their store accesses stay in one order).
    apply: mpsc::UnboundedSender<Apply>,
    /// Set once every store access of earlier primaries on this node is done and the local
    /// store is durable: the core's outputs are carried out only from then on.
    ready: AtomicBool,
    /// Set while the node has no lease, and after that until [`Coordinator::confirm_primary`]
    /// confirmed this epoch: a paused primary admits no host I/O but keeps its state.
    paused: AtomicBool,
    /// A confirmation is under way.
    confirming: AtomicBool,
    /// When this primary began serving, or last served again after a pause: a proxied write
    /// that arrived before then is refused (it may have waited out the pause at this node).
    resumed_at: Mutex<Instant>,
}

struct CoreState {
    core: Primary,
    next_token: Token,
    waiters: HashMap<Token, HostWrite>,
    /// Wire sequence number of core sequence 0.
    seq_base: Seq,
    resync_tried: HashMap<NodeId, Instant>,
    /// Per member, how many `Open`s this core sent it: the answer to an `Open` or a copy of an
    /// earlier one is stale (the member failed and was opened again meanwhile) and ignored.
    opens: HashMap<NodeId, u64>,
}

struct HostWrite {
    kind: WriteKind,
    offset: u64,
    data: Bytes,
    len: u64,
    /// Room in the local store's budget, taken before the core lock: the local applier then
    /// never waits for the store's budget.
    admission: Option<Admission>,
    reply: Option<oneshot::Sender<Result<(), IoFail>>>,
    /// The write's in-flight permit: released when the write leaves the core.
    _room: OwnedSemaphorePermit,
    /// Reads that overlap this write and must not return before it is acknowledged: each is
    /// sent `()` when the write completes; a dropped sender means it failed.
    watchers: Vec<oneshot::Sender<()>>,
}

/// A store access of a volume's primary, carried out by the volume's local applier in the
/// order the primary queued it (under its core lock, so in sequence order).
///
/// Bound: a primary queues at most [`crate::protocol::INFLIGHT_WRITES_MAX`] writes (each holds
/// an in-flight permit until the core is done with it), [`READS_QUEUED_MAX`] reads, one chunk
/// read per member and a barrier; a new primary on this node waits for its barrier before it
/// queues anything, so the queue holds the items of at most two primaries.
enum Apply {
    Write {
        p: Arc<PrimaryDriver>,
        seq: Seq,
        kind: WriteKind,
        offset: u64,
        len: u64,
        data: Bytes,
        admission: Admission,
    },
    Read {
        volume: VolumeId,
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// A chunk to copy to a member, with its block checksums.
    CopyRead {
        volume: VolumeId,
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<ChunkCopy, String>>,
    },
    /// Answered once every item queued before it is done.
    Barrier {
        reply: oneshot::Sender<()>,
    },
}

/// A chunk's data and its block checksums, read to be copied to a member.
type ChunkCopy = (Vec<u8>, Vec<u32>);

/// A record from a primary, checked for its checksum and admitted by the store's budget,
/// waiting for the record applier.
struct RecordWork {
    from: NodeId,
    header: RecordHeader,
    /// The record's encoding; the data is at `data_at..`.
    bytes: Vec<u8>,
    data_at: usize,
    admission: Admission,
}

impl<S: BlockStore> DataPlane<S> {
    /// Starts the data plane: registers as the handler of the replication and bulk channels
    /// and starts the record reader and the ticker.
    pub fn start(me: NodeId, mesh: Mesh, store: Arc<S>, coord: Arc<dyn Coordinator>, config: DataPlaneConfig) -> Self {
        let (version, _) = watch::channel(0);
        let (records, records_rx) = mpsc::channel(RECORDS_QUEUED_MAX);
        let inner = Arc::new(Inner {
            me,
            mesh: mesh.clone(),
            store,
            coord,
            config,
            volumes: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
            version,
            senders: Mutex::new(HashMap::new()),
            next_wire_seq: AtomicU64::new(1),
            proxy_read_budget: Semaphore::new((PROXY_READ_BYTES_MAX / BLOCK_BYTES) as usize),
            lease_lost_at: Mutex::new(None),
            records,
        });
        let handler: Arc<dyn Handler> = Arc::new(DataHandler { inner: Arc::downgrade(&inner) });
        mesh.set_handler(Channel::Replication, handler.clone());
        mesh.set_handler(Channel::Bulk, handler);
        tokio::spawn(read_records(Arc::downgrade(&inner), mesh.regions().clone()));
        tokio::spawn(apply_records(Arc::downgrade(&inner), records_rx));
        tokio::spawn(tick(Arc::downgrade(&inner)));
        DataPlane { inner }
    }

    /// Makes sure every peer can write records into a region of this node.
    pub fn set_peers(&self, peers: &[NodeId]) {
        let regions = self.inner.mesh.regions();
        for &p in peers.iter().filter(|&&p| p != self.inner.me) {
            if !regions.is_registered(p) {
                if let Err(e) = regions.register_credited(p) {
                    tracing::error!(peer = p, error = %e, "cannot register a replication region");
                }
            }
        }
    }

    /// Brings the node in line with the committed volumes: creates and deletes local copies,
    /// fences old epochs, and starts or stops being primary.
    pub fn apply_config(&self, volumes: Vec<VolumeConfig>) {
        let inner = &self.inner;
        *inner.configs.lock().expect("configs lock") = volumes.iter().map(|v| (v.id, v.clone())).collect();
        let mine: HashMap<VolumeId, VolumeConfig> =
            volumes.into_iter().filter(|v| v.replicas.contains(&inner.me)).map(|v| (v.id, v)).collect();
        let gone: Vec<(VolumeId, Arc<Vol>)> = {
            let mut vols = inner.volumes.lock().expect("volumes lock");
            let gone: Vec<VolumeId> = vols.keys().filter(|id| !mine.contains_key(id)).copied().collect();
            gone.into_iter().filter_map(|id| vols.remove(&id).map(|v| (id, v))).collect()
        };
        for (id, vol) in gone {
            if let Some(p) = vol.primary.lock().expect("primary lock").take() {
                p.depose(inner, "the volume was deleted");
            }
            if let Err(e) = inner.store.delete_volume(id) {
                tracing::error!(volume = id, error = %e, "cannot delete the local copy");
            }
        }
        for (id, cfg) in mine {
            let vol = {
                let mut vols = inner.volumes.lock().expect("volumes lock");
                match vols.get(&id) {
                    Some(v) => v.clone(),
                    None => {
                        let fresh = cfg.epoch == 1;
                        let existed = inner.store.volumes().iter().any(|(v, _)| *v == id);
                        if let Err(e) = inner.store.create_volume(id, cfg.size_bytes) {
                            tracing::error!(volume = id, error = %e, "cannot create the local copy");
                            continue;
                        }
                        let (acks, rx) = mpsc::unbounded_channel();
                        let (apply, apply_rx) = mpsc::unbounded_channel();
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
            vol.backup.lock().expect("backup lock").on_epoch(cfg.epoch);
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
                match self.inner.clone().read_once(cfg.id, at, target).await {
                    Err(IoFail::Unavailable(why)) => hold.wait(&self.inner, why).await?,
                    other => {
                        other?;
                        break;
                    }
                }
            }
            done += piece;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (served here or proxied); returns once durable on every
    /// in-sync replica.
    pub async fn write(&self, cfg: &VolumeConfig, offset: u64, data: Bytes) -> Result<(), IoFail> {
        check_range(cfg, offset, data.len() as u64)?;
        let mut hold = Hold::new(&self.inner);
        let mut done = 0usize;
        while done < data.len() {
            let piece = (data.len() - done).min(PROXY_BYTES_MAX as usize);
            let part = data.slice(done..done + piece);
            let at = offset + done as u64;
            self.inner
                .retry(&mut hold, |inner| {
                    let part = part.clone();
                    async move { inner.write_once(cfg.id, WriteKind::Data, at, part.len() as u64, part).await }
                })
                .await?;
            done += piece;
        }
        Ok(())
    }

    /// Makes a range read as zeros (WRITE_ZEROES and TRIM).
    pub async fn write_zeroes(&self, cfg: &VolumeConfig, offset: u64, len: u64) -> Result<(), IoFail> {
        check_range(cfg, offset, len)?;
        let mut hold = Hold::new(&self.inner);
        self.inner
            .retry(&mut hold, |inner| async move {
                inner.write_once(cfg.id, WriteKind::Zeroes, offset, len, Bytes::new()).await
            })
            .await
    }

    /// Every acknowledged write is already durable on every in-sync replica, so a flush only
    /// has to confirm that the volume is still served.
    pub async fn flush(&self, cfg: &VolumeConfig) -> Result<(), IoFail> {
        let mut hold = Hold::new(&self.inner);
        self.inner.retry(&mut hold, |inner| async move { inner.flush_once(cfg.id).await }).await
    }
}

fn check_range(cfg: &VolumeConfig, offset: u64, len: u64) -> Result<(), IoFail> {
    match offset.checked_add(len) {
        Some(end) if end <= cfg.size_bytes => Ok(()),
        _ => Err(IoFail::Invalid(format!(
            "range {offset}+{len} is outside volume {:?} of {} bytes",
            cfg.name, cfg.size_bytes
        ))),
    }
}

/// Where a request for a volume goes right now.
enum Route {
    Local(Arc<PrimaryDriver>),
    Remote(NodeId),
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

    /// Runs `op` until it succeeds or fails for a definite reason ([`Hold::wait`]).
    async fn retry<F, Fut, T>(self: &Arc<Self>, hold: &mut Hold, mut op: F) -> Result<T, IoFail>
    where
        F: FnMut(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = Result<T, IoFail>>,
    {
        loop {
            hold.last_attempt = Some(Instant::now());
            match op(self.clone()).await {
                Err(IoFail::Unavailable(why)) => hold.wait(self, why).await?,
                other => return other,
            }
        }
    }

    /// How long this node has been without a lease, if it has none now.
    fn cut_off_for(&self, now: Instant) -> Option<Duration> {
        if self.coord.lease_valid() {
            return None;
        }
        let lost = *self.lease_lost_at.lock().expect("lease lock").get_or_insert(now);
        Some(now.saturating_duration_since(lost))
    }

    /// Resolves once the committed primary of `id` is no longer `node` (or the volume is
    /// gone), with the reason; never while `node` stays primary.
    async fn primary_moved(&self, id: VolumeId, node: NodeId) -> String {
        let mut version = self.version.subscribe();
        loop {
            match self.configs.lock().expect("configs lock").get(&id) {
                None => return format!("volume {id} was deleted"),
                Some(c) if c.primary != node => {
                    return format!(
                        "node {} (epoch {}) replaced node {node} as primary; re-routing",
                        c.primary, c.epoch
                    )
                }
                Some(_) => {}
            }
            if version.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Sends a proxied request to `node`, the committed primary of `id`. The attempt has no
    /// time limit of its own (a slow primary is only slow), but it is abandoned as soon as the
    /// committed map names another primary: the request then goes to the new one. This is
    /// safe because the old primary is fenced by the epoch (docs/PROTOCOL.md, "Re-routing");
    /// dropping the call withdraws it if it has not gone out yet.
    async fn call_primary(&self, id: VolumeId, node: NodeId, msg: &DataMsg) -> Result<DataReply, IoFail> {
        tokio::select! {
            biased;
            reply = self.call(node, PROXY_CHANNEL, msg) => reply,
            why = self.primary_moved(id, node) => Err(IoFail::Unavailable(why)),
        }
    }

    /// The primary as this node sees it: a local serving primary, or another node.
    async fn route(&self, id: VolumeId, cfg_primary: NodeId) -> Result<Route, IoFail> {
        if cfg_primary == self.me {
            let vol = self.volume(id).ok_or_else(|| IoFail::Unavailable("the local copy is not ready".into()))?;
            let p = vol.primary.lock().expect("primary lock").clone();
            let Some(p) = p else { return Err(IoFail::Unavailable("this node is not serving the volume yet".into())) };
            // Reconciliation runs before serving; wait for it a little (no timer when serving).
            let mut serving = *p.phase.borrow() == Phase::Serving;
            if !serving {
                let mut phase = p.phase.subscribe();
                let ready =
                    tokio::time::timeout(Duration::from_millis(500), phase.wait_for(|ph| *ph != Phase::Reconciling));
                serving = matches!(ready.await, Ok(Ok(ph)) if *ph == Phase::Serving);
            }
            if !serving {
                return Err(IoFail::Unavailable("the primary is reconciling or deposed".into()));
            }
            if !self.coord.lease_valid() {
                return Err(IoFail::Unavailable("this node has no lease (cut off from the metadata majority)".into()));
            }
            if p.paused.load(Ordering::Acquire) {
                return Err(IoFail::Unavailable("the primary is confirming its epoch after a lease loss".into()));
            }
            return Ok(Route::Local(p));
        }
        Ok(Route::Remote(cfg_primary))
    }

    fn primary_of(&self, id: VolumeId) -> Result<NodeId, IoFail> {
        let configs = self.configs.lock().expect("configs lock");
        let cfg = configs.get(&id).ok_or_else(|| IoFail::NoVolume(format!("volume {id} no longer exists")))?;
        Ok(cfg.primary)
    }

    async fn read_once(self: Arc<Self>, id: VolumeId, offset: u64, buf: &mut [u8]) -> Result<(), IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary).await? {
            Route::Local(p) => {
                let data = p.read(&self, offset, buf.len() as u64).await?;
                // The data was current when this node last held its lease and served: a
                // failover waits for the lease to lapse first. Checked again after the read,
                // which may have waited (docs/PROTOCOL.md, "Reads").
                if !self.coord.lease_valid() || p.paused.load(Ordering::Acquire) || *p.phase.borrow() != Phase::Serving
                {
                    return Err(IoFail::Unavailable("the primary lost its lease during the read".into()));
                }
                buf.copy_from_slice(&data);
                Ok(())
            }
            Route::Remote(node) => {
                let blocks = (buf.len() as u64).div_ceil(BLOCK_BYTES).min(PROXY_READ_BYTES_MAX / BLOCK_BYTES) as u32;
                let _budget = self
                    .proxy_read_budget
                    .acquire_many(blocks)
                    .await
                    .map_err(|_| IoFail::Stopping("the data plane is stopping".into()))?;
                let msg = DataMsg::ProxyRead { volume: id, offset, len: buf.len() as u64 };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Data(d) if d.len() == buf.len() => {
                        buf.copy_from_slice(&d);
                        Ok(())
                    }
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    async fn write_once(
        self: Arc<Self>,
        id: VolumeId,
        kind: WriteKind,
        offset: u64,
        len: u64,
        data: Bytes,
    ) -> Result<(), IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary).await? {
            Route::Local(p) => p.write(&self, kind, offset, len, data).await,
            Route::Remote(node) => {
                let msg = match kind {
                    WriteKind::Data => DataMsg::ProxyWrite { volume: id, offset, data: data.to_vec(), fua: false },
                    WriteKind::Zeroes => DataMsg::ProxyZeroes { volume: id, offset, len, fua: false },
                };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Ok => Ok(()),
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    async fn flush_once(self: Arc<Self>, id: VolumeId) -> Result<(), IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary).await? {
            Route::Local(_) => Ok(()),
            Route::Remote(node) => match self.call_primary(id, node, &DataMsg::ProxyFlush { volume: id }).await? {
                DataReply::Ok => Ok(()),
                other => Err(reply_error(node, other)),
            },
        }
    }

    async fn call(&self, node: NodeId, channel: Channel, msg: &DataMsg) -> Result<DataReply, IoFail> {
        let payload = msg.encode().map_err(|e| IoFail::Io(e.to_string()))?;
        let reply = self.mesh.send(node, channel, Bytes::from(payload)).await;
        let reply = match reply {
            Ok(r) => r.wait().await,
            Err(e) => Err(e),
        };
        match reply {
            Ok(bytes) => DataReply::decode(&bytes).map_err(|e| IoFail::Io(format!("bad reply from node {node}: {e}"))),
            Err(e) => Err(IoFail::Unavailable(e.to_string())),
        }
    }

    /// Starts, keeps or stops this node's primary for `vol` to match its configuration and the
    /// lease.
    fn reconcile_role(self: &Arc<Self>, id: VolumeId, vol: &Arc<Vol>) {
        let cfg = vol.cfg.lock().expect("cfg lock").clone();
        let mut slot = vol.primary.lock().expect("primary lock");
        if let Some(p) = slot.as_ref() {
            let deposed = *p.phase.borrow() == Phase::Deposed;
            if cfg.primary != self.me || cfg.epoch != p.epoch || deposed {
                p.depose(self, "the volume has a new primary");
                *slot = None;
            }
        }
        if slot.is_none() && cfg.primary == self.me && self.coord.lease_valid() {
            // Build only in an epoch this start claimed; claim it first otherwise.
            let mut claim = vol.claim.lock().expect("claim lock");
            if cfg.claim.is_none() || cfg.claim != claim.nonce {
                if !claim.proposing {
                    claim.proposing = true;
                    let nonce = *claim.nonce.get_or_insert_with(new_nonce);
                    let (inner, vol, epoch) = (self.clone(), vol.clone(), cfg.epoch);
                    tokio::spawn(async move {
                        match inner.coord.claim_primary(id, epoch, nonce).await {
                            Ok(()) => tracing::info!(volume = id, epoch, "claimed the epoch for a new primary"),
                            Err(e) => tracing::info!(volume = id, epoch, error = %e, "epoch not claimed (yet)"),
                        }
                        vol.claim.lock().expect("claim lock").proposing = false;
                    });
                }
                return;
            }
            // Used: a later start needs a claim of its own.
            claim.nonce = None;
            drop(claim);
            let recent = vol.recent.lock().expect("recent lock").ranges();
            let seq_base = self.next_wire_seq.fetch_add(1 << 32, Ordering::Relaxed);
            let core = Primary::new(
                Instant::now(),
                id,
                self.me,
                cfg.epoch,
                cfg.size_bytes,
                &cfg.replicas,
                &cfg.isr,
                recent,
                PrimaryConfig { ack_timeout: self.config.ack_timeout },
            );
            let (local, local_rx) = mpsc::unbounded_channel();
            let (phase, _) = watch::channel(Phase::Reconciling);
            let p = Arc::new(PrimaryDriver {
                volume: id,
                epoch: cfg.epoch,
                st: Mutex::new(CoreState {
                    core,
                    next_token: 1,
                    waiters: HashMap::new(),
                    seq_base,
                    resync_tried: HashMap::new(),
                    opens: HashMap::new(),
                }),
                room: Arc::new(Semaphore::new(crate::protocol::INFLIGHT_WRITES_MAX)),
                reads: Semaphore::new(READS_QUEUED_MAX),
                phase,
                local,
                apply: vol.apply.clone(),
                ready: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                confirming: AtomicBool::new(false),
                resumed_at: Mutex::new(Instant::now()),
            });
            tokio::spawn(local_durability(Arc::downgrade(self), p.clone(), local_rx));
            tracing::info!(volume = id, epoch = cfg.epoch, "taking over as primary; reconciling");
            tokio::spawn(start_core(self.clone(), p.clone()));
            *slot = Some(p);
        }
    }

    fn sender(self: &Arc<Self>, peer: NodeId) -> Arc<PeerSender> {
        let mut senders = self.senders.lock().expect("senders lock");
        senders.entry(peer).or_insert_with(|| PeerSender::start(Arc::downgrade(self), peer)).clone()
    }

    fn member_failed(self: &Arc<Self>, volume: VolumeId, epoch: Epoch, member: NodeId) {
        let Some(p) = self.volume(volume).and_then(|v| v.primary.lock().expect("primary lock").clone()) else { return };
        if p.epoch != epoch {
            return;
        }
        let mut st = p.st.lock().expect("core lock");
        st.core.on_member_failed(member);
        p.pump(self, &mut st);
    }
}

/// Lets a new primary begin: first every store access that an earlier primary of the volume
/// on this node queued is done, and the local store is durable. Reconciliation then compares
/// the members with local data that no late write of an earlier primary can still change, and
/// that a crash of this node cannot take back (docs/PROTOCOL.md, "Taking over").
async fn start_core<S: BlockStore>(inner: Arc<Inner<S>>, p: Arc<PrimaryDriver>) {
    let (tx, rx) = oneshot::channel();
    let drained = p.apply.send(Apply::Barrier { reply: tx }).is_ok() && rx.await.is_ok();
    let durable = if drained {
        inner.store.durable(inner.store.last_lsn()).await.map_err(|e| e.to_string())
    } else {
        Err("the local applier stopped".to_string())
    };
    let mut st = p.st.lock().expect("core lock");
    if let Err(e) = durable {
        tracing::error!(volume = p.volume, error = %e, "cannot make the local copy durable; not taking over");
        st.core.depose(&format!("local store: {e}"));
    }
    p.ready.store(true, Ordering::Release);
    p.pump(&inner, &mut st);
}

/// Carries out a volume's store accesses in the order its primaries queued them, in batches,
/// each on a blocking thread: never on an async worker, never under a core lock.
async fn run_applier<S: BlockStore>(inner: Weak<Inner<S>>, mut rx: mpsc::UnboundedReceiver<Apply>) {
    let mut batch = Vec::with_capacity(APPLY_BATCH_MAX);
    while rx.recv_many(&mut batch, APPLY_BATCH_MAX).await > 0 {
        let Some(inner) = inner.upgrade() else { return };
        if !apply_batch(inner, std::mem::take(&mut batch), Inner::apply_local, "local applier").await {
            return;
        }
    }
}

/// Runs `apply` on every item of `batch`, in order, on one blocking thread; false if that
/// thread failed.
async fn apply_batch<S: BlockStore, T: Send + 'static>(
    inner: Arc<Inner<S>>,
    batch: Vec<T>,
    apply: fn(&Arc<Inner<S>>, T),
    what: &str,
) -> bool {
    match tokio::task::spawn_blocking(move || batch.into_iter().for_each(|item| apply(&inner, item))).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "{what} task failed");
            false
        }
    }
}

impl<S: BlockStore> Inner<S> {
    /// One item of a local applier (on a blocking thread).
    fn apply_local(self: &Arc<Self>, item: Apply) {
        match item {
            Apply::Write { p, seq, kind, offset, len, data, admission } => {
                if p.st.lock().expect("core lock").core.phase() == Phase::Deposed {
                    // Never acknowledged (that needs this copy durable first), and recorded in
                    // the recent-write log: a deposed core's queued writes are dropped, so
                    // none lands after a newer primary's records (docs/PROTOCOL.md, "Taking
                    // over").
                    return;
                }
                let applied = match kind {
                    WriteKind::Data => self.store.write_admitted(admission, p.volume, offset, &data),
                    WriteKind::Zeroes => self.store.write_zeroes_admitted(admission, p.volume, offset, len),
                };
                match applied {
                    Ok(lsn) => {
                        let _ = p.local.send((seq, lsn));
                    }
                    Err(e) => {
                        tracing::error!(volume = p.volume, error = %e, "local write failed; stepping down");
                        p.depose(self, &format!("local store failed: {e}"));
                    }
                }
            }
            Apply::Read { volume, offset, len, reply } => {
                if reply.is_closed() {
                    return;
                }
                let mut data = vec![0u8; len as usize];
                let read = self.store.read(volume, offset, &mut data).map(|()| data).map_err(|e| e.to_string());
                let _ = reply.send(read);
            }
            Apply::CopyRead { volume, offset, len, reply } => {
                let read = (|| {
                    let mut data = vec![0u8; len as usize];
                    self.store.read(volume, offset, &mut data)?;
                    let sums = self.store.block_checksums(volume, offset, len)?;
                    Ok::<_, tandem_storage::StoreError>((data, sums))
                })()
                .map_err(|e| e.to_string());
                let _ = reply.send(read);
            }
            Apply::Barrier { reply } => {
                let _ = reply.send(());
            }
        }
    }
}

fn reply_error(node: NodeId, reply: DataReply) -> IoFail {
    match reply {
        DataReply::Refused(why) => IoFail::Unavailable(format!("node {node}: {why}")),
        DataReply::Failed(why) => IoFail::Io(format!("node {node}: {why}")),
        other => IoFail::Io(format!("node {node} answered {other:?}")),
    }
}

impl PrimaryDriver {
    async fn write<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        kind: WriteKind,
        offset: u64,
        len: u64,
        data: Bytes,
    ) -> Result<(), IoFail> {
        // Cut into pieces; each is one sequenced record. All must complete.
        let mut waits = Vec::new();
        let mut at = 0u64;
        while at < len {
            let piece_max = match kind {
                WriteKind::Data => WRITE_PIECE_BYTES_MAX,
                WriteKind::Zeroes => ZEROES_PIECE_BYTES_MAX,
            };
            let piece = (len - at).min(piece_max);
            let room =
                self.room.clone().acquire_owned().await.map_err(|_| IoFail::Unavailable("primary stopped".into()))?;
            let cost = match kind {
                WriteKind::Data => piece,
                WriteKind::Zeroes => 0,
            };
            let admission = inner.store.admit(cost).await.map_err(|e| IoFail::Io(format!("local store: {e}")))?;
            let (tx, rx) = oneshot::channel();
            {
                let mut st = self.st.lock().expect("core lock");
                if st.core.phase() != Phase::Serving {
                    return Err(IoFail::Unavailable("the primary stopped serving".into()));
                }
                if let Some(received) = tandem_transport::link::request_received_at() {
                    // Proxied: the deadline fence. The proxy reports the write failed only
                    // after this bound has passed for every attempt it sent.
                    let resumed = *self.resumed_at.lock().expect("resumed lock");
                    if received < resumed || received.elapsed() > PROXIED_WRITE_ADMIT_MAX {
                        return Err(IoFail::Unavailable(format!(
                            "the proxied write waited {:.1} s at the primary{}; the proxy retries it",
                            received.elapsed().as_secs_f64(),
                            if received < resumed { ", across a pause" } else { "" }
                        )));
                    }
                }
                let token = st.next_token;
                st.next_token += 1;
                let bytes = match kind {
                    WriteKind::Data => data.slice(at as usize..(at + piece) as usize),
                    WriteKind::Zeroes => Bytes::new(),
                };
                st.waiters.insert(
                    token,
                    HostWrite {
                        kind,
                        offset: offset + at,
                        data: bytes,
                        len: piece,
                        admission: Some(admission),
                        reply: Some(tx),
                        _room: room,
                        watchers: Vec::new(),
                    },
                );
                st.core.on_write(Instant::now(), token, offset + at, piece);
                self.pump(inner, &mut st);
            }
            waits.push(rx);
            at += piece;
        }
        for rx in waits {
            match rx.await {
                Ok(r) => r?,
                Err(_) => return Err(IoFail::Unavailable("the primary stopped".into())),
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` from the local copy, linearizably: the read is queued on
    /// the local applier behind every write sequenced before it, and it returns only once
    /// each of those writes that overlaps it is acknowledged (durable on every member of the
    /// ISR), so it never returns data that a failover could take away (I6). If one of them
    /// fails, the read fails as `Unavailable` and is retried.
    async fn read<S: BlockStore>(&self, inner: &Arc<Inner<S>>, offset: u64, len: u64) -> Result<Vec<u8>, IoFail> {
        let _queued = self.reads.acquire().await.map_err(|_| IoFail::Unavailable("the primary stopped".to_string()))?;
        let (tx, rx) = oneshot::channel();
        let overlapping: Vec<oneshot::Receiver<()>> = {
            let mut st = self.st.lock().expect("core lock");
            if st.core.phase() != Phase::Serving {
                return Err(IoFail::Unavailable("the primary stopped serving".into()));
            }
            let end = offset + len;
            let waits = st
                .waiters
                .values_mut()
                .filter(|w| w.offset < end && offset < w.offset + w.len)
                .map(|w| {
                    let (t, r) = oneshot::channel();
                    w.watchers.push(t);
                    r
                })
                .collect();
            let item = Apply::Read { volume: self.volume, offset, len, reply: tx };
            if self.apply.send(item).is_err() {
                return Err(IoFail::Unavailable("the local applier stopped".into()));
            }
            waits
        };
        let data = rx
            .await
            .map_err(|_| IoFail::Unavailable("the local applier stopped".into()))?
            .map_err(|e| IoFail::Io(format!("node {}: local read: {e}", inner.me)))?;
        for w in overlapping {
            if w.await.is_err() {
                return Err(IoFail::Unavailable("a write this read overlaps was not acknowledged".into()));
            }
        }
        Ok(data)
    }

    fn depose<S: BlockStore>(self: &Arc<Self>, inner: &Arc<Inner<S>>, reason: &str) {
        let mut st = self.st.lock().expect("core lock");
        st.core.depose(reason);
        self.pump(inner, &mut st);
    }

    /// Carries out the core's outputs. Runs under the core lock, so the local applier gets
    /// writes in sequence order, and copies and reads at their place in that order. Nothing
    /// here waits for the store.
    fn pump<S: BlockStore>(self: &Arc<Self>, inner: &Arc<Inner<S>>, st: &mut CoreState) {
        if !self.ready.load(Ordering::Acquire) {
            // `start_core` pumps once the earlier primaries' store accesses are done.
            return;
        }
        while let Some(out) = st.core.poll_output() {
            match out {
                Output::Write { token, seq, to } => {
                    let Some(w) = st.waiters.get_mut(&token) else { continue };
                    // Admitted before the lock was taken: the applier never waits for budget.
                    let admission = w.admission.take().unwrap_or_else(Admission::unlimited);
                    // Recorded at sequencing, before it reaches any replica: a takeover on this
                    // node sees it in the log whether or not the local copy has it yet.
                    if let Some(v) = inner.volume(self.volume) {
                        v.recent.lock().expect("recent lock").record(w.offset, w.len);
                    }
                    let item = Apply::Write {
                        p: self.clone(),
                        seq,
                        kind: w.kind,
                        offset: w.offset,
                        len: w.len,
                        data: w.data.clone(),
                        admission,
                    };
                    if self.apply.send(item).is_err() {
                        st.core.depose("the local applier stopped");
                        continue;
                    }
                    let wire_seq = st.seq_base + seq;
                    let crc = match w.kind {
                        WriteKind::Data => crc32c::crc32c(&w.data),
                        WriteKind::Zeroes => 0,
                    };
                    let header = RecordHeader {
                        volume: self.volume,
                        epoch: self.epoch,
                        seq: wire_seq,
                        kind: w.kind,
                        offset: w.offset,
                        len: w.len,
                        crc,
                    };
                    match encode_record(&header, &w.data) {
                        Ok(record) => {
                            let record = Bytes::from(record);
                            for n in to {
                                inner.sender(n).push(SendItem {
                                    volume: self.volume,
                                    epoch: self.epoch,
                                    record: record.clone(),
                                });
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode a record");
                            for n in to {
                                st.core.on_member_failed(n);
                            }
                        }
                    }
                }
                Output::Complete { token } => {
                    if let Some(mut w) = st.waiters.remove(&token) {
                        if let Some(tx) = w.reply.take() {
                            let _ = tx.send(Ok(()));
                        }
                        for t in w.watchers.drain(..) {
                            let _ = t.send(());
                        }
                    }
                }
                Output::Fail { token, reason } => {
                    if let Some(mut w) = st.waiters.remove(&token) {
                        if let Some(tx) = w.reply.take() {
                            let _ = tx.send(Err(IoFail::Unavailable(reason)));
                        }
                    }
                }
                Output::Open { to, start_seq } => {
                    let msg = DataMsg::Open {
                        volume: self.volume,
                        epoch: self.epoch,
                        primary: inner.me,
                        start_seq: st.seq_base + start_seq,
                    };
                    let open = {
                        let n = st.opens.entry(to).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let (inner, p) = (inner.clone(), self.clone());
                    tokio::spawn(async move {
                        let result = match tokio::time::timeout(
                            OPEN_TIMEOUT,
                            inner.call(to, Channel::Replication, &msg),
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(_) => Err(IoFail::Unavailable(format!("no answer to open within {OPEN_TIMEOUT:?}"))),
                        };
                        let mut st = p.st.lock().expect("core lock");
                        if st.opens.get(&to) != Some(&open) {
                            return;
                        }
                        match result {
                            Ok(DataReply::Opened { recent }) => {
                                tracing::info!(volume = p.volume, member = to, "member opened");
                                st.core.on_opened(to, recent)
                            }
                            Ok(other) => {
                                tracing::info!(volume = p.volume, member = to, reply = ?other, "open refused");
                                st.core.on_member_failed(to)
                            }
                            Err(e) => {
                                tracing::info!(volume = p.volume, member = to, error = %e, "open failed");
                                st.core.on_member_failed(to)
                            }
                        }
                        p.pump(&inner, &mut st);
                    });
                }
                Output::Copy { to, chunk } => {
                    let size =
                        inner.volume(self.volume).map(|v| v.cfg.lock().expect("cfg lock").size_bytes).unwrap_or(0);
                    let offset = chunk * CHUNK_BYTES;
                    let len = CHUNK_BYTES.min(size.saturating_sub(offset));
                    // Read by the local applier at this point of the sequence: after every
                    // earlier write to the chunk; the core holds back later ones until
                    // `on_copied`.
                    let (tx, rx) = oneshot::channel();
                    let _ = self.apply.send(Apply::CopyRead { volume: self.volume, offset, len, reply: tx });
                    let open = st.opens.get(&to).copied();
                    let (inner, p) = (inner.clone(), self.clone());
                    tokio::spawn(async move {
                        let local = rx.await.unwrap_or_else(|_| Err("the local applier stopped".into()));
                        let result = match local {
                            Ok((data, sums)) => tokio::time::timeout(
                                COPY_TIMEOUT,
                                copy_chunk(&inner, p.volume, p.epoch, to, offset, data, sums),
                            )
                            .await
                            .unwrap_or_else(|_| Err(format!("chunk copy took over {COPY_TIMEOUT:?}"))),
                            Err(e) => Err(format!("local read failed: {e}")),
                        };
                        let mut st = p.st.lock().expect("core lock");
                        if st.opens.get(&to).copied() != open {
                            // The member failed and was opened again meanwhile: this copy went
                            // to its earlier session and says nothing about the current one.
                            return;
                        }
                        match result {
                            Ok(()) => st.core.on_copied(to, chunk),
                            Err(e) => {
                                tracing::info!(volume = p.volume, member = to, chunk, error = %e, "chunk copy failed");
                                st.core.on_member_failed(to);
                            }
                        }
                        p.pump(&inner, &mut st);
                    });
                }
                Output::ProposeIsr { isr } => {
                    let (inner, p) = (inner.clone(), self.clone());
                    tokio::spawn(async move {
                        let result = inner.coord.propose_isr(p.volume, p.epoch, isr.clone()).await;
                        let mut st = p.st.lock().expect("core lock");
                        match result {
                            Ok(()) => {
                                tracing::info!(volume = p.volume, epoch = p.epoch, ?isr, "ISR committed");
                                st.core.on_isr_committed(&isr)
                            }
                            Err(ProposeError::Refused(why)) => st.core.on_isr_refused(&why),
                            Err(ProposeError::Unavailable(why)) => {
                                tracing::warn!(volume = p.volume, error = %why, "ISR change not committed yet; will retry");
                                st.core.on_isr_unavailable()
                            }
                        }
                        p.pump(&inner, &mut st);
                    });
                }
                Output::Progress { node, done_chunks, total_chunks } => {
                    let inner = inner.clone();
                    let (volume, epoch) = (self.volume, self.epoch);
                    tokio::spawn(async move {
                        if total_chunks == 0 {
                            // Back in sync: its recent-write log can be trusted again. If this
                            // is lost, the member's log stays incomplete: only slower
                            // reconciliation, never a wrong one.
                            let _ = inner.call(node, Channel::Replication, &DataMsg::Level { volume, epoch }).await;
                        }
                        inner
                            .coord
                            .report_progress(volume, node, done_chunks * CHUNK_BYTES, total_chunks * CHUNK_BYTES)
                            .await;
                    });
                }
                Output::Serving => {
                    tracing::info!(volume = self.volume, epoch = self.epoch, "serving");
                    if let Some(v) = inner.volume(self.volume) {
                        // Reconciled: every member now matches this copy.
                        v.recent.lock().expect("recent lock").mark_complete();
                    }
                    self.phase.send_replace(Phase::Serving);
                }
            }
        }
        if st.core.phase() == Phase::Deposed {
            self.phase.send_replace(Phase::Deposed);
            for (_, mut w) in st.waiters.drain() {
                if let Some(tx) = w.reply.take() {
                    let _ = tx.send(Err(IoFail::Unavailable("the primary stepped down".into())));
                }
            }
        }
    }
}

/// Makes one chunk of `to` equal to `data` (the primary's copy): compares checksums first
/// and sends only the runs of blocks that differ.
async fn copy_chunk<S: BlockStore>(
    inner: &Arc<Inner<S>>,
    volume: VolumeId,
    epoch: Epoch,
    to: NodeId,
    offset: u64,
    data: Vec<u8>,
    local_sums: Vec<u32>,
) -> Result<(), String> {
    let len = data.len() as u64;
    let theirs = match inner.call(to, Channel::Bulk, &DataMsg::Checksums { volume, epoch, offset, len }).await {
        Ok(DataReply::Checksums(s)) => s,
        Ok(other) => return Err(format!("{other:?}")),
        Err(e) => return Err(e.to_string()),
    };
    if let Some(v) = inner.volume(volume) {
        v.resync_bytes_compared.fetch_add(len, Ordering::Relaxed);
    }
    let blocks = local_sums.len();
    let mut i = 0;
    while i < blocks {
        if theirs.get(i) == Some(&local_sums[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < blocks && theirs.get(i) != Some(&local_sums[i]) {
            i += 1;
        }
        let (a, b) = (start * BLOCK_BYTES as usize, (i * BLOCK_BYTES as usize).min(data.len()));
        let msg = DataMsg::Chunk { volume, epoch, offset: offset + a as u64, data: data[a..b].to_vec() };
        match inner.call(to, Channel::Bulk, &msg).await {
            Ok(DataReply::Ok) => {}
            Ok(other) => return Err(format!("{other:?}")),
            Err(e) => return Err(e.to_string()),
        }
        if let Some(v) = inner.volume(volume) {
            v.resync_bytes_sent.fetch_add((b - a) as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Waits for local durability of the primary's own writes, in order, in groups.
async fn local_durability<S: BlockStore>(
    inner: Weak<Inner<S>>,
    p: Arc<PrimaryDriver>,
    mut rx: mpsc::UnboundedReceiver<(Seq, Lsn)>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let Some(inner) = inner.upgrade() else { return };
        let last = batch.iter().map(|(_, l)| *l).max().expect("non-empty batch");
        let result = inner.store.durable(last).await;
        let mut st = p.st.lock().expect("core lock");
        match result {
            Ok(()) => batch.iter().for_each(|(s, _)| st.core.on_local_durable(*s)),
            Err(e) => {
                tracing::error!(volume = p.volume, error = %e, "local flush failed; stepping down");
                st.core.depose(&format!("local flush failed: {e}"));
            }
        }
        p.pump(&inner, &mut st);
        if st.core.phase() == Phase::Deposed {
            return;
        }
    }
}

/// Sends `Acks` for records this replica applied, once they are durable, in groups.
async fn send_acks<S: BlockStore>(
    inner: Weak<Inner<S>>,
    volume: VolumeId,
    mut rx: mpsc::UnboundedReceiver<(NodeId, Epoch, Seq, Lsn)>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let Some(inner) = inner.upgrade() else { return };
        let last = batch.iter().map(|b| b.3).max().expect("non-empty batch");
        if let Err(e) = inner.store.durable(last).await {
            tracing::error!(volume, error = %e, "flush failed; these records stay unacknowledged");
            continue;
        }
        let mut groups: HashMap<(NodeId, Epoch), Vec<Seq>> = HashMap::new();
        for (primary, epoch, seq, _) in batch {
            groups.entry((primary, epoch)).or_default().push(seq);
        }
        for ((primary, epoch), seqs) in groups {
            let msg = DataMsg::Acks { volume, epoch, seqs };
            let inner = inner.clone();
            // The primary times the member out if the acks never arrive.
            tokio::spawn(async move {
                let _ = inner.call(primary, Channel::Replication, &msg).await;
            });
        }
    }
}

/// One record on its way to a member.
struct SendItem {
    volume: VolumeId,
    epoch: Epoch,
    record: Bytes,
}

/// Per peer: places records in the peer's region for this node through a descriptor ring.
/// The region is used as a circular buffer; space comes back as descriptors complete, which
/// (the region being credited) means the peer took the bytes out.
struct PeerSender {
    queue: mpsc::UnboundedSender<SendItem>,
}

struct RegionSpace {
    head: u64,
    /// Allocated extents, oldest first: (offset, len, volume, epoch).
    used: VecDeque<(u64, u64, VolumeId, Epoch)>,
}

impl RegionSpace {
    /// Finds room for `len` bytes after the newest allocation, wrapping to 0 if needed.
    /// `head` is where the newest allocation ends; with allocations outstanding, `head ==
    /// tail` means the region is full.
    fn alloc(&mut self, len: u64) -> Option<u64> {
        let size = REGION_BYTES as u64;
        let Some(&(tail, _, _, _)) = self.used.front() else {
            return (len <= size).then_some(0);
        };
        if self.head > tail {
            if self.head + len <= size {
                return Some(self.head);
            }
            return (len <= tail).then_some(0);
        }
        (self.head + len <= tail).then_some(self.head)
    }
}

impl PeerSender {
    fn start<S: BlockStore>(inner: Weak<Inner<S>>, peer: NodeId) -> Arc<PeerSender> {
        // Unbounded in type only: every item is a write holding an in-flight permit of its
        // volume's primary.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_sender(inner, peer, rx));
        Arc::new(PeerSender { queue: tx })
    }

    fn push(&self, item: SendItem) {
        let _ = self.queue.send(item);
    }
}

async fn run_sender<S: BlockStore>(inner: Weak<Inner<S>>, peer: NodeId, mut rx: mpsc::UnboundedReceiver<SendItem>) {
    let (me, mesh) = match inner.upgrade() {
        Some(i) => (i.me, i.mesh.clone()),
        None => return,
    };
    let ring = Arc::new(DescriptorRing::new(&mesh, peer, RING_SLOTS));
    let space = Arc::new(Mutex::new(RegionSpace { head: 0, used: VecDeque::new() }));
    let freed = Arc::new(Notify::new());
    {
        let (ring, space, freed, inner) = (ring.clone(), space.clone(), freed.clone(), inner.clone());
        tokio::spawn(async move {
            while let Some(c) = ring.next_completion().await {
                let front = space.lock().expect("space lock").used.pop_front();
                freed.notify_one();
                if let (Err(e), Some((_, _, volume, epoch))) = (&c.result, front) {
                    tracing::info!(peer, volume, error = %e, "record not delivered");
                    if let Some(inner) = inner.upgrade() {
                        inner.member_failed(volume, epoch, peer);
                    }
                }
            }
        });
    }
    while let Some(item) = rx.recv().await {
        let len = item.record.len() as u64;
        let offset = loop {
            let notified = freed.notified();
            if let Some(off) = space.lock().expect("space lock").alloc(len) {
                break off;
            }
            notified.await;
        };
        {
            let mut s = space.lock().expect("space lock");
            s.head = offset + len;
            s.used.push_back((offset, len, item.volume, item.epoch));
        }
        let d = Descriptor { data: item.record, region: me, offset, channel: Channel::Replication };
        if ring.post(d).await.is_err() {
            return;
        }
    }
}

/// Applies records from every primary, strictly in arrival order.
async fn read_records<S: BlockStore>(inner: Weak<Inner<S>>, regions: Arc<RegionRegistry>) {
    while let Some(c) = regions.next_completion().await {
        let Some(inner) = inner.upgrade() else { return };
        if c.channel != Channel::Replication {
            continue;
        }
        let bytes = match regions.read(c.region, c.offset, c.len) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(from = c.from, error = %e, "unreadable record");
                continue;
            }
        };
        // The bytes are ours now: the sender may reuse the space.
        c.consumed.consume();
        let (header, data_at, data_len) = match decode_record(&bytes) {
            Ok((h, data)) => (h, bytes.len() - data.len(), data.len()),
            Err(e) => {
                tracing::warn!(from = c.from, error = %e, "malformed record");
                continue;
            }
        };
        // Room in the store first, awaited: the applier then never waits for budget.
        let cost = if header.kind == WriteKind::Data { data_len as u64 } else { 0 };
        match inner.store.admit(cost).await {
            Ok(admission) => {
                let work = RecordWork { from: c.from, header, bytes, data_at, admission };
                if inner.records.send(work).await.is_err() {
                    return;
                }
            }
            Err(e) => inner.refuse_record(c.from, &header, format!("local store: {e}")),
        }
    }
}

/// Applies records in arrival order, in batches, each on a blocking thread.
async fn apply_records<S: BlockStore>(inner: Weak<Inner<S>>, mut rx: mpsc::Receiver<RecordWork>) {
    let mut batch = Vec::with_capacity(APPLY_BATCH_MAX);
    while rx.recv_many(&mut batch, APPLY_BATCH_MAX).await > 0 {
        let Some(inner) = inner.upgrade() else { return };
        if !apply_batch(inner, std::mem::take(&mut batch), Inner::apply_record_work, "record applier").await {
            return;
        }
    }
}

impl<S: BlockStore> Inner<S> {
    /// Checks, applies and records one record (on a blocking thread). The check, the write and
    /// the record in the recent-write log happen under the volume's backup lock, so a takeover
    /// or an `Open` (which fence the epoch and snapshot the log under the same lock) sees
    /// either none of them or all of them.
    fn apply_record(&self, from: NodeId, h: &RecordHeader, data: &[u8], admission: Admission) -> Result<(), String> {
        let vol = self.volume(h.volume).ok_or_else(|| format!("no copy of volume {} here", h.volume))?;
        if h.kind == WriteKind::Data && crc32c::crc32c(data) != h.crc {
            return Err("record checksum mismatch".into());
        }
        let mut backup = vol.backup.lock().expect("backup lock");
        backup.check(from, h.epoch, Some(h.seq)).map_err(|e| e.to_string())?;
        let applied = match h.kind {
            WriteKind::Data => self.store.write_admitted(admission, h.volume, h.offset, data),
            WriteKind::Zeroes => self.store.write_zeroes_admitted(admission, h.volume, h.offset, h.len),
        };
        // Recorded even if the write failed part way: the range may have changed.
        vol.recent.lock().expect("recent lock").record(h.offset, h.len);
        drop(backup);
        let lsn = applied.map_err(|e| e.to_string())?;
        let _ = vol.acks.send((from, h.epoch, h.seq, lsn));
        Ok(())
    }

    /// One record of the record applier (on a blocking thread); a refusal is sent back.
    fn apply_record_work(self: &Arc<Self>, w: RecordWork) {
        let data = &w.bytes[w.data_at..];
        if let Err(reason) = self.apply_record(w.from, &w.header, data, w.admission) {
            self.refuse_record(w.from, &w.header, reason);
        }
    }

    /// Tells the primary that a record was refused (it fails this member).
    fn refuse_record(self: &Arc<Self>, from: NodeId, h: &RecordHeader, reason: String) {
        tracing::info!(from, volume = h.volume, seq = h.seq, %reason, "record refused");
        let msg = DataMsg::Nack { volume: h.volume, epoch: h.epoch, seq: h.seq, reason };
        let inner = self.clone();
        tokio::spawn(async move {
            let _ = inner.call(from, Channel::Replication, &msg).await;
        });
    }

    /// Waits briefly for a volume this node has not heard of yet (a peer's Raft apply can be
    /// ahead of ours).
    async fn wait_volume(&self, id: VolumeId) -> Option<Arc<Vol>> {
        let mut version = self.version.subscribe();
        // Below OPEN_TIMEOUT: a restarting node first catches up with the map.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        loop {
            if let Some(v) = self.volume(id) {
                return Some(v);
            }
            if tokio::time::timeout_at(deadline, version.changed()).await.is_err() {
                return None;
            }
        }
    }

    async fn handle(self: Arc<Self>, from: NodeId, msg: DataMsg) -> DataReply {
        match msg {
            DataMsg::Open { volume, epoch, primary, start_seq } => {
                let Some(vol) = self.wait_volume(volume).await else {
                    return DataReply::Refused(format!("no copy of volume {volume} here"));
                };
                if primary != from {
                    return DataReply::Refused("an open must come from the primary itself".into());
                }
                // A primary of an older epoch on this node steps down first, and whatever it
                // queued for the local store is done or dropped: none of its writes may land
                // after the new primary's records.
                let older = vol.primary.lock().expect("primary lock").clone().filter(|p| p.epoch < epoch);
                if let Some(p) = older {
                    p.depose(&self, "a primary of a newer epoch opened this replica");
                }
                let (tx, rx) = oneshot::channel();
                if vol.apply.send(Apply::Barrier { reply: tx }).is_err() || rx.await.is_err() {
                    return DataReply::Failed("the local applier stopped".into());
                }
                // Under the backup lock, which an applier holds across a check, its write and
                // its record: the log sent back shows every record applied before this open.
                // On a blocking thread: that lock may wait for a store write.
                let opened = tokio::task::spawn_blocking(move || {
                    let mut backup = vol.backup.lock().expect("backup lock");
                    backup.on_open(from, epoch, start_seq)?;
                    let recent = vol.recent.lock().expect("recent lock").ranges();
                    Ok(recent)
                })
                .await;
                // Durable before the answer: a resync skips blocks whose checksums match, so
                // it would never make durable what this copy applied and did not flush yet.
                if let Ok(Ok(_)) = &opened {
                    if let Err(e) = self.store.durable(self.store.last_lsn()).await {
                        return DataReply::Failed(format!("flush before open: {e}"));
                    }
                }
                match opened {
                    Ok(Ok(recent)) => DataReply::Opened { recent },
                    Ok(Err(e)) => DataReply::Refused(crate::protocol::Refusal::to_string(&e)),
                    Err(e) => DataReply::Failed(format!("open task: {e}")),
                }
            }
            DataMsg::Acks { volume, epoch, seqs } => {
                let Some(p) = self.volume(volume).and_then(|v| v.primary.lock().expect("primary lock").clone()) else {
                    return DataReply::Ok;
                };
                if p.epoch == epoch {
                    let mut st = p.st.lock().expect("core lock");
                    let base = st.seq_base;
                    for s in seqs {
                        if s > base {
                            st.core.on_ack(from, s - base);
                        }
                    }
                    p.pump(&self, &mut st);
                }
                DataReply::Ok
            }
            DataMsg::Nack { volume, epoch, seq, reason } => {
                tracing::info!(volume, from, seq, %reason, "member refused a record");
                let Some(p) = self.local_primary(volume) else { return DataReply::Ok };
                if p.epoch == epoch {
                    let mut st = p.st.lock().expect("core lock");
                    // Wire sequence numbers of this primary start above its base.
                    if let Some(core_seq) = seq.checked_sub(st.seq_base) {
                        st.core.on_member_refused(from, core_seq);
                        p.pump(&self, &mut st);
                    }
                }
                DataReply::Ok
            }
            DataMsg::Checksums { volume, epoch, offset, len } => {
                let Some(vol) = self.volume(volume) else {
                    return DataReply::Refused(format!("no copy of volume {volume}"));
                };
                let store = self.store.clone();
                let sums = tokio::task::spawn_blocking(move || {
                    if let Err(e) = vol.backup.lock().expect("backup lock").check(from, epoch, None) {
                        return DataReply::Refused(e.to_string());
                    }
                    match store.block_checksums(volume, offset, len) {
                        Ok(s) => DataReply::Checksums(s),
                        Err(e) => DataReply::Failed(e.to_string()),
                    }
                })
                .await;
                sums.unwrap_or_else(|e| DataReply::Failed(format!("checksum task: {e}")))
            }
            DataMsg::Chunk { volume, epoch, offset, data } => {
                let Some(vol) = self.volume(volume) else {
                    return DataReply::Refused(format!("no copy of volume {volume}"));
                };
                // Room first: nothing may wait between the epoch check and the write.
                let admission = match self.store.admit(data.len() as u64).await {
                    Ok(a) => a,
                    Err(e) => return DataReply::Failed(e.to_string()),
                };
                // The check, the write and the record under the backup lock, as for a record;
                // on a blocking thread.
                let store = self.store.clone();
                let written = tokio::task::spawn_blocking(move || {
                    let mut backup = vol.backup.lock().expect("backup lock");
                    if let Err(e) = backup.check(from, epoch, None) {
                        return Err(DataReply::Refused(e.to_string()));
                    }
                    let written = store.write_admitted(admission, volume, offset, &data);
                    // A copy changes this replica like a write does: reconciliation must see it.
                    vol.recent.lock().expect("recent lock").record_copy(offset, data.len() as u64);
                    drop(backup);
                    written.map_err(|e| DataReply::Failed(e.to_string()))
                })
                .await;
                let lsn = match written {
                    Ok(Ok(lsn)) => lsn,
                    Ok(Err(reply)) => return reply,
                    Err(e) => return DataReply::Failed(format!("copy task: {e}")),
                };
                match self.store.durable(lsn).await {
                    Ok(()) => DataReply::Ok,
                    Err(e) => DataReply::Failed(e.to_string()),
                }
            }
            DataMsg::Level { volume, epoch } => {
                let Some(vol) = self.volume(volume) else {
                    return DataReply::Refused(format!("no copy of volume {volume}"));
                };
                let levelled = tokio::task::spawn_blocking(move || {
                    let mut backup = vol.backup.lock().expect("backup lock");
                    backup.check(from, epoch, None)?;
                    vol.recent.lock().expect("recent lock").mark_complete();
                    Ok(())
                })
                .await;
                match levelled {
                    Ok(Ok(())) => DataReply::Ok,
                    Ok(Err(e)) => DataReply::Refused(crate::protocol::Refusal::to_string(&e)),
                    Err(e) => DataReply::Failed(format!("level task: {e}")),
                }
            }
            DataMsg::ProxyRead { volume, offset, len } => {
                if len > PROXY_BYTES_MAX {
                    return DataReply::Refused(format!("proxied read of {len} bytes is over {PROXY_BYTES_MAX}"));
                }
                if self.local_primary(volume).is_none() {
                    return DataReply::Refused("not the primary".into());
                }
                let mut buf = vec![0u8; len as usize];
                match self.clone().read_once(volume, offset, &mut buf).await {
                    Ok(()) => DataReply::Data(buf),
                    Err(e) => fail_reply(e),
                }
            }
            DataMsg::ProxyWrite { volume, offset, data, .. } => {
                if self.local_primary(volume).is_none() {
                    return DataReply::Refused("not the primary".into());
                }
                let len = data.len() as u64;
                match self.clone().write_once(volume, WriteKind::Data, offset, len, Bytes::from(data)).await {
                    Ok(()) => DataReply::Ok,
                    Err(e) => fail_reply(e),
                }
            }
            DataMsg::ProxyZeroes { volume, offset, len, .. } => {
                if self.local_primary(volume).is_none() {
                    return DataReply::Refused("not the primary".into());
                }
                match self.clone().write_once(volume, WriteKind::Zeroes, offset, len, Bytes::new()).await {
                    Ok(()) => DataReply::Ok,
                    Err(e) => fail_reply(e),
                }
            }
            DataMsg::ProxyFlush { volume } => match self.local_primary(volume) {
                Some(_) => DataReply::Ok,
                None => DataReply::Refused("not the primary".into()),
            },
        }
    }

    /// Proxied requests are served only by the primary itself: no chains of proxies.
    fn local_primary(&self, volume: VolumeId) -> Option<Arc<PrimaryDriver>> {
        self.volume(volume).and_then(|v| v.primary.lock().expect("primary lock").clone())
    }
}

/// A proxied request's outcome for the proxying node: `Refused` means "not served here, try
/// the primary again" (the proxy retries), `Failed` is definite.
fn fail_reply(e: IoFail) -> DataReply {
    match e {
        IoFail::Unavailable(why) | IoFail::NoVolume(why) | IoFail::CutOff(why) | IoFail::Stopping(why) => {
            DataReply::Refused(why)
        }
        IoFail::Invalid(why) | IoFail::Io(why) => DataReply::Failed(why),
    }
}

struct DataHandler<S: BlockStore> {
    inner: Weak<Inner<S>>,
}

impl<S: BlockStore> Handler for DataHandler<S> {
    fn handle(&self, from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let inner = self.inner.upgrade().ok_or("data plane stopped")?;
            let msg = DataMsg::decode(&payload).map_err(|e| e.to_string())?;
            let reply = inner.handle(from, msg).await;
            reply.encode().map(Bytes::from).map_err(|e| e.to_string())
        })
    }
}

/// Drives time: timeouts, retried proposals, resyncs, the lease, and primaries to (re)start.
async fn tick<S: BlockStore>(inner: Weak<Inner<S>>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let lease = inner.coord.lease_valid();
        if lease {
            *inner.lease_lost_at.lock().expect("lease lock") = None;
        }
        let cut_off_for = inner.cut_off_for(now);
        let hold = inner.config.hold_time;
        let vols: Vec<(VolumeId, Arc<Vol>)> =
            inner.volumes.lock().expect("volumes lock").iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, vol) in vols {
            let p = vol.primary.lock().expect("primary lock").clone();
            if let Some(p) = p {
                if cut_off_for.is_some() {
                    p.paused.store(true, Ordering::Release);
                } else if p.paused.load(Ordering::Acquire) && !p.confirming.swap(true, Ordering::AcqRel) {
                    tokio::spawn(confirm_primary(inner.clone(), p.clone()));
                }
                let mut st = p.st.lock().expect("core lock");
                match cut_off_for {
                    // Paused: `route` admits no new I/O without a lease, and nothing times a
                    // member out (its acks may be waiting behind this node's own stall). Writes
                    // already sent complete if every gating member acknowledges them: that
                    // keeps I1, and they were ordered before any failover could begin.
                    Some(d) if d < hold => {}
                    Some(d) => st.core.depose(&format!(
                        "this node has been cut off from the metadata majority for {:.1} s (hold time {:.0} s)",
                        d.as_secs_f64(),
                        hold.as_secs_f64()
                    )),
                    None => {
                        let out_before = st.core.out_members();
                        st.core.on_tick(now);
                        for n in st.core.out_members().into_iter().filter(|n| !out_before.contains(n)) {
                            tracing::info!(volume = id, member = n, "member timed out (no ack within the ack timeout)");
                        }
                        if st.core.phase() == Phase::Serving {
                            for n in st.core.out_members() {
                                let due =
                                    st.resync_tried.get(&n).is_none_or(|t| now.duration_since(*t) >= RESYNC_RETRY);
                                if due {
                                    st.resync_tried.insert(n, now);
                                    st.core.start_resync(n);
                                }
                            }
                        }
                    }
                }
                p.pump(&inner, &mut st);
            }
            inner.reconcile_role(id, &vol);
        }
    }
}

/// Ends the pause of a primary whose node has its lease again: it serves again only if the
/// committed map still names it primary of its epoch; otherwise it steps down.
async fn confirm_primary<S: BlockStore>(inner: Arc<Inner<S>>, p: Arc<PrimaryDriver>) {
    let confirmed = inner.coord.confirm_primary(p.volume, p.epoch).await;
    match confirmed {
        Ok(true) if inner.coord.lease_valid() => {
            tracing::info!(volume = p.volume, epoch = p.epoch, "lease back and epoch confirmed; serving again");
            *p.resumed_at.lock().expect("resumed lock") = Instant::now();
            p.paused.store(false, Ordering::Release);
        }
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(volume = p.volume, epoch = p.epoch, "a newer configuration replaced this primary");
            p.depose(&inner, "a newer configuration replaced this primary while its node had no lease");
        }
        Err(e) => tracing::info!(volume = p.volume, error = %e, "cannot confirm the epoch yet; staying paused"),
    }
    p.confirming.store(false, Ordering::Release);
}

/// The hold-time clock of one host request: it starts when the request first finds no serving
/// primary, and it fails the request only for a definite reason.
struct Hold {
    unserved_since: Option<Instant>,
    backoff: Duration,
    version: watch::Receiver<u64>,
    /// When the last attempt began: a failure is reported no sooner than
    /// [`PROXIED_WRITE_ADMIT_MAX`] + [`PROXY_FENCE_MARGIN`] after it, so that the attempt can
    /// no longer take effect at a primary once the host is told it failed.
    last_attempt: Option<Instant>,
}

impl Hold {
    fn new<S: BlockStore>(inner: &Arc<Inner<S>>) -> Hold {
        Hold {
            unserved_since: None,
            backoff: Duration::from_millis(20),
            version: inner.version.subscribe(),
            last_attempt: None,
        }
    }

    /// After an attempt found no serving primary (`why`): waits for the configuration to change
    /// or a short backoff, or fails the request when this node has been cut off from the
    /// metadata majority for the hold time, or the request went unserved for that long.
    async fn wait<S: BlockStore>(&mut self, inner: &Arc<Inner<S>>, why: String) -> Result<(), IoFail> {
        let now = Instant::now();
        let hold = inner.config.hold_time;
        if let Some(cut) = inner.cut_off_for(now).filter(|d| *d >= hold) {
            self.fence().await;
            return Err(IoFail::CutOff(format!(
                "node {} has had no lease for {:.1} s (hold time {:.0} s); last attempt: {why}",
                inner.me,
                cut.as_secs_f64(),
                hold.as_secs_f64()
            )));
        }
        let since = *self.unserved_since.get_or_insert(now);
        let waited = now.duration_since(since);
        if waited >= hold {
            self.fence().await;
            return Err(IoFail::Unavailable(format!(
                "no primary served it for {:.1} s (hold time {:.0} s); last attempt: {why}",
                waited.as_secs_f64(),
                hold.as_secs_f64()
            )));
        }
        let wait = self.backoff.min(hold - waited);
        let _ = tokio::time::timeout(wait, self.version.changed()).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(500));
        Ok(())
    }

    /// Before a write is reported failed: waits until its last attempt can no longer be
    /// sequenced at any primary (it arrived there within [`PROXY_FENCE_MARGIN`], and a primary
    /// sequences a proxied write within [`PROXIED_WRITE_ADMIT_MAX`] of its arrival or refuses
    /// it), so it never takes effect after the host learns it failed.
    async fn fence(&self) {
        if let Some(at) = self.last_attempt {
            let until = at + PROXIED_WRITE_ADMIT_MAX + PROXY_FENCE_MARGIN;
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_space_wraps_and_waits_for_the_tail() {
        let size = REGION_BYTES as u64;
        let mut s = RegionSpace { head: 0, used: VecDeque::new() };
        let take = |s: &mut RegionSpace, len: u64| {
            let off = s.alloc(len)?;
            s.head = off + len;
            s.used.push_back((off, len, 1, 1));
            Some(off)
        };
        assert_eq!(take(&mut s, size / 2), Some(0));
        assert_eq!(take(&mut s, size / 4), Some(size / 2));
        assert_eq!(take(&mut s, size / 2), None, "no room until the oldest is freed");
        s.used.pop_front();
        assert_eq!(take(&mut s, size / 2), Some(0), "wraps to the start");
        assert_eq!(take(&mut s, 1), None, "head meets tail");
        s.used.pop_front();
        assert_eq!(take(&mut s, size / 4), Some(size / 2));
    }
}
