//! The primary side of the driver: [`PrimaryDriver`] holds a volume's protocol core for one
//! epoch beside what the driver keeps for it (host writes in flight, room, the phase); this
//! file starts and stops it (`reconcile_role`, epoch claims), lets it begin once earlier
//! primaries' store accesses are done, takes host writes and reads into it, and feeds it local
//! durability and lease confirmations. Its outputs are carried out in `outputs.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use tandem_reservations::{Access, Op, Outcome, Refusal};
use tandem_storage::{Admission, BlockStore, Lsn};
use tandem_types::chaos_bugs::{self, Bug, Bugs};
use tandem_types::{Epoch, NodeId, Seq, VolumeId};
use tandem_wire::data::{Requester, WriteId, WriteKind};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::applier::{Apply, ApplyQueue};
#[cfg(doc)]
use super::Coordinator;
use super::{
    check_compare_and_write, Inner, IoFail, ProposeError, Vol, CLONE_PIECE_BYTES_MAX, OUTPUT_TASKS_MAX,
    PROXIED_WRITE_ADMIT_MAX, READS_QUEUED_MAX, WRITE_PIECE_BYTES_MAX, ZEROES_PIECE_BYTES_MAX,
};
use tandem_replication_core::recent::WritePiece;
use tandem_replication_core::{Phase, Primary, PrimaryConfig, Token, INFLIGHT_WRITES_MAX};

/// A claim of an epoch for the next start of this node's primary.
#[derive(Default)]
pub(super) struct Claim {
    /// The nonce proposed, kept until a primary is built with it (a proposal whose outcome is
    /// unknown is repeated with the same nonce).
    pub(super) nonce: Option<u64>,
    /// A proposal is under way.
    pub(super) proposing: bool,
}

/// A value no other start of a primary on this node has used: the time, the process and a
/// counter, mixed.
pub(super) fn new_nonce() -> u64 {
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
pub(super) struct PrimaryDriver {
    pub(super) volume: VolumeId,
    pub(super) epoch: Epoch,
    pub(super) st: Mutex<CoreState>,
    /// In-flight host writes ([`tandem_replication_core::INFLIGHT_WRITES_MAX`]). A permit lives with
    /// the sequenced write (in its [`HostWrite`]) until the core completes or fails it, not
    /// with the host's request: a host that gives up on a request does not free its room
    /// while the write is still in flight.
    pub(super) room: Arc<Semaphore>,
    /// Host reads queued for the local applier ([`READS_QUEUED_MAX`]).
    pub(super) reads: Semaphore,
    /// Host writes are sequenced holding it shared; a compare and write holds it alone from
    /// before its read until its write is sequenced, so no other write comes between them.
    pub(super) sequencing: tokio::sync::RwLock<()>,
    pub(super) phase: watch::Sender<Phase>,
    /// Local durability waits, in sequence order: at most [`INFLIGHT_WRITES_MAX`], one per
    /// write in flight (asserted where they are sent).
    pub(super) local: mpsc::Sender<(Seq, Lsn)>,
    /// The volume's local applier (shared with this node's earlier and later primaries of the
    /// volume, so their store accesses stay in one order).
    pub(super) apply: ApplyQueue,
    /// Tasks for the core's outputs ([`OUTPUT_TASKS_MAX`]).
    pub(super) tasks: Arc<Semaphore>,
    /// An ISR proposal is under way (the core keeps at most one in flight: asserted).
    pub(super) proposing: AtomicBool,
    /// Set once every store access of earlier primaries on this node is done and the local
    /// store is durable: the core's outputs are carried out only from then on.
    pub(super) ready: AtomicBool,
    /// Set while the node has no lease, and after that until [`Coordinator::confirm_primary`]
    /// confirmed this epoch: a paused primary admits no host I/O but keeps its state.
    pub(super) paused: AtomicBool,
    /// A confirmation is under way.
    pub(super) confirming: AtomicBool,
    /// When this primary began serving, or last served again after a pause: a proxied write
    /// that arrived before then is refused (it may have waited out the pause at this node).
    pub(super) resumed_at: Mutex<Instant>,
    /// Pieces of host writes this node's copy held when this primary was built (applied here
    /// as a member of an earlier primary, or by an earlier primary on this node): in this copy,
    /// so on every member once reconciliation is done. A retry of one is answered without
    /// executing it again. At most [`tandem_replication_core::RECENT_WRITES_MAX`].
    pub(super) settled: HashSet<WritePiece>,
    /// When this primary was built, and the second since then of the last refusal it logged
    /// for a reservation conflict.
    pub(super) built_at: Instant,
    pub(super) conflict_logged_s: AtomicU64,
}

pub(super) struct CoreState {
    pub(super) core: Primary,
    pub(super) next_token: Token,
    pub(super) waiters: HashMap<Token, HostWrite>,
    /// Wire sequence number of core sequence 0.
    pub(super) seq_base: Seq,
    pub(super) resync_tried: HashMap<NodeId, Instant>,
    /// Per member, how many `Open`s this core sent it: the answer to an `Open` or a copy of an
    /// earlier one is stale (the member failed and was opened again meanwhile) and ignored.
    pub(super) opens: HashMap<NodeId, u64>,
}

pub(super) struct HostWrite {
    /// The host request this is a piece of (the same in every attempt of it).
    pub(super) write: WriteId,
    pub(super) kind: WriteKind,
    pub(super) offset: u64,
    pub(super) data: Bytes,
    pub(super) len: u64,
    /// Room in the local store's budget, taken before the core lock: the local applier then
    /// never waits for the store's budget.
    pub(super) admission: Option<Admission>,
    pub(super) reply: Option<oneshot::Sender<Result<(), IoFail>>>,
    /// The write's in-flight permit: released when the write leaves the core.
    pub(super) _room: OwnedSemaphorePermit,
    /// Reads that overlap this write and must not return before it is acknowledged: each is
    /// sent `()` when the write completes; a dropped sender means it failed.
    pub(super) watchers: Vec<oneshot::Sender<()>>,
}

impl<S: BlockStore> Inner<S> {
    /// Starts, keeps or stops this node's primary for `vol` to match its configuration and the
    /// lease.
    pub(super) fn reconcile_role(self: &Arc<Self>, id: VolumeId, vol: &Arc<Vol>) {
        let cfg = vol.cfg.lock().expect("cfg lock").clone();
        // A failed store (a flush failed: it refuses changes until the node restarts) holds no
        // primary: one built on it could never make a write durable, and each new start would
        // only claim another epoch. The node drops out instead (it stops renewing its lease)
        // and the leader fails the volume over to an in-sync backup.
        let store_failed = self.store_failed();
        let mut slot = vol.primary.lock().expect("primary lock");
        if let Some(p) = slot.as_ref() {
            let deposed = *p.phase.borrow() == Phase::Deposed;
            if cfg.primary != self.me || cfg.epoch != p.epoch || deposed || store_failed.is_some() {
                let why = match &store_failed {
                    Some(e) => format!("the local store failed: {e}"),
                    None => "the volume has a new primary".to_string(),
                };
                p.depose(self, &why);
                *slot = None;
            }
        }
        if slot.is_none() && cfg.primary == self.me && self.coord.lease_valid() && store_failed.is_none() {
            // Build only in an epoch this start claimed; claim it first otherwise.
            let mut claim = vol.claim.lock().expect("claim lock");
            // Planted (chaos-bugs): build in the epoch as the map shows it, claimed or not, by
            // this start or an earlier one (the state before one primary per epoch).
            let unclaimed = !chaos_bugs::on(Bug::LateIsrChange) && (cfg.claim.is_none() || cfg.claim != claim.nonce);
            if unclaimed {
                if !claim.proposing {
                    claim.proposing = true;
                    let nonce = *claim.nonce.get_or_insert_with(new_nonce);
                    let (inner, vol, epoch) = (self.clone(), vol.clone(), cfg.epoch);
                    tokio::spawn(async move {
                        match inner.coord.claim_primary(id, epoch, nonce).await {
                            Ok(()) => tracing::info!(volume = %id, %epoch, "claimed the epoch for a new primary"),
                            Err(e) => tracing::info!(volume = %id, %epoch, error = %e, "epoch not claimed (yet)"),
                        }
                        vol.claim.lock().expect("claim lock").proposing = false;
                    });
                }
                return;
            }
            // Used: a later start needs a claim of its own.
            claim.nonce = None;
            drop(claim);
            let (recent, settled) = {
                let log = vol.recent.lock().expect("recent lock");
                (log.ranges(), log.applied_writes())
            };
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
                PrimaryConfig { ack_timeout: self.config.ack_timeout, bugs: Bugs::current() },
            );
            let (local, local_rx) = mpsc::channel(INFLIGHT_WRITES_MAX);
            let (phase, _) = watch::channel(Phase::Reconciling);
            let p = Arc::new(PrimaryDriver {
                volume: id,
                epoch: cfg.epoch,
                st: Mutex::new(CoreState {
                    core,
                    next_token: 1,
                    waiters: HashMap::new(),
                    seq_base: Seq(seq_base),
                    resync_tried: HashMap::new(),
                    opens: HashMap::new(),
                }),
                room: Arc::new(Semaphore::new(INFLIGHT_WRITES_MAX)),
                reads: Semaphore::new(READS_QUEUED_MAX),
                sequencing: tokio::sync::RwLock::new(()),
                phase,
                local,
                apply: vol.apply.clone(),
                tasks: Arc::new(Semaphore::new(OUTPUT_TASKS_MAX)),
                proposing: AtomicBool::new(false),
                ready: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                confirming: AtomicBool::new(false),
                resumed_at: Mutex::new(Instant::now()),
                settled,
                built_at: Instant::now(),
                conflict_logged_s: AtomicU64::new(0),
            });
            tokio::spawn(local_durability(Arc::downgrade(self), p.clone(), local_rx));
            tracing::info!(volume = %id, epoch = %cfg.epoch, "taking over as primary; reconciling");
            tokio::spawn(start_core(self.clone(), p.clone()));
            *slot = Some(p);
        }
    }

    /// Why the local store failed, if it did; logged once.
    pub(super) fn store_failed(&self) -> Option<String> {
        let failed = self.store.failed()?;
        if !self.store_failure_logged.swap(true, Ordering::AcqRel) {
            tracing::error!(
                error = %failed,
                "the local store failed: this node holds no primary until it restarts (its lease lapses and \
                 its volumes fail over)"
            );
        }
        Some(failed)
    }

    pub(super) fn member_failed(self: &Arc<Self>, volume: VolumeId, epoch: Epoch, member: NodeId) {
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
pub(super) async fn start_core<S: BlockStore>(inner: Arc<Inner<S>>, p: Arc<PrimaryDriver>) {
    let (tx, rx) = oneshot::channel();
    let drained = p.apply.send(Apply::Barrier { reply: tx }).is_ok() && rx.await.is_ok();
    let durable = if drained {
        inner.store.durable(inner.store.last_lsn()).await.map_err(|e| e.to_string())
    } else {
        Err("the local applier stopped".to_string())
    };
    let mut st = p.st.lock().expect("core lock");
    if let Err(e) = durable {
        tracing::error!(volume = %p.volume, error = %e, "cannot make the local copy durable; not taking over");
        st.core.depose(&format!("local store: {e}"));
    }
    p.ready.store(true, Ordering::Release);
    p.pump(&inner, &mut st);
}

/// What [`PrimaryDriver::earlier_attempt`] found.
enum Earlier {
    None,
    Applied,
    InFlight(oneshot::Receiver<()>),
}

/// The pieces of one host write once sequenced: the answers it waits for.
pub(super) struct Sequenced {
    /// One per piece sequenced by this attempt.
    waits: Vec<oneshot::Receiver<Result<(), IoFail>>>,
    /// One per piece an earlier attempt of the same write has in flight.
    earlier: Vec<oneshot::Receiver<()>>,
}

impl Sequenced {
    /// Waits until every piece is acknowledged (durable on every member of the ISR).
    async fn settle(self) -> Result<(), IoFail> {
        for rx in self.waits {
            match rx.await {
                Ok(r) => r?,
                Err(_) => return Err(IoFail::Unavailable("the primary stopped".into())),
            }
        }
        for rx in self.earlier {
            if rx.await.is_err() {
                return Err(IoFail::Unavailable("an earlier attempt of this write was not acknowledged".into()));
            }
        }
        Ok(())
    }
}

impl PrimaryDriver {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        requester: Option<&Requester>,
        write: WriteId,
        kind: WriteKind,
        offset: u64,
        len: u64,
        data: Bytes,
    ) -> Result<(), IoFail> {
        let sequenced = {
            // Checked under `sequencing`: a reservation command takes it whole, so every write
            // is checked against the state before it or after it, never in between.
            let _shared = self.sequencing.read().await;
            self.check_reservations(inner, requester, Access::Write, offset, len).await?;
            self.sequence(inner, write, kind, offset, len, data).await?
        };
        sequenced.settle().await
    }

    /// Whether the volume's reservations let `requester` (`None`: the node itself) make
    /// `access` to `len` bytes at `offset`, by this node's map once it has applied this
    /// primary's epoch.
    pub(super) async fn check_reservations<S: BlockStore>(
        &self,
        inner: &Arc<Inner<S>>,
        requester: Option<&Requester>,
        access: Access,
        offset: u64,
        len: u64,
    ) -> Result<(), IoFail> {
        let Some(requester) = requester else {
            return Ok(());
        };
        for first in [true, false] {
            match inner.coord.check_reservations(self.volume, self.epoch, &requester.nexus, access, offset, len) {
                Some(Ok(())) => return Ok(()),
                Some(Err(conflict)) => {
                    self.log_conflict(&conflict.reason);
                    return Err(IoFail::Conflict(conflict.to_string()));
                }
                None if first => inner.coord.wait_epoch_applied(self.volume, self.epoch).await,
                None => {}
            }
        }
        Err(IoFail::Unavailable(format!(
            "node {}'s map has not applied epoch {} of volume {} yet",
            inner.me, self.epoch, self.volume
        )))
    }

    /// Logs a refused request, at most once a second per primary: a fenced host that keeps
    /// writing must not flood the log.
    fn log_conflict(&self, reason: &str) {
        let now_s = self.built_at.elapsed().as_secs() + 1;
        if self.conflict_logged_s.swap(now_s, Ordering::Relaxed) != now_s {
            tracing::info!(volume = %self.volume, %reason, "host request refused by a reservation");
        }
    }

    /// A persistent-reservation command (see [`DataPlane::reserve`](super::DataPlane::reserve)):
    /// alone against every write, after the writes sequenced before it are acknowledged, and
    /// committed in this primary's epoch before any later write is checked.
    pub(super) async fn reserve<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        requester: &Requester,
        id: u64,
        op: Op,
    ) -> Result<Result<Outcome, Refusal>, IoFail> {
        let _alone = self.sequencing.write().await;
        self.drain_writes(inner, "the command").await?;
        let result = match inner.coord.reserve(self.volume, self.epoch, id, requester.nexus.clone(), op.clone()).await {
            Ok(result) => result,
            Err(ProposeError::Refused(why)) | Err(ProposeError::Unavailable(why)) => {
                return Err(IoFail::Unavailable(format!("reservation command not committed: {why}")));
            }
        };
        tracing::info!(
            volume = %self.volume,
            nexus = %requester.nexus,
            op = op.name(),
            result = ?result,
            "reservation command"
        );
        Ok(result)
    }

    /// Waits until every write sequenced so far is acknowledged (by every in-sync replica),
    /// then checks that this primary still serves with a lease. The caller holds `sequencing`
    /// alone, so no write comes in meanwhile: afterwards every in-sync replica holds exactly
    /// this primary's bytes. `what` names the caller for the error.
    pub(super) async fn drain_writes<S: BlockStore>(&self, inner: &Arc<Inner<S>>, what: &str) -> Result<(), IoFail> {
        let in_flight: Vec<oneshot::Receiver<()>> = {
            let mut st = self.st.lock().expect("core lock");
            if st.core.phase() != Phase::Serving {
                return Err(IoFail::Unavailable("the primary stopped serving".into()));
            }
            st.waiters
                .values_mut()
                .map(|w| {
                    let (t, r) = oneshot::channel();
                    w.watchers.push(t);
                    r
                })
                .collect()
        };
        for acked in in_flight {
            acked.await.map_err(|_| IoFail::Unavailable(format!("a write before {what} was not acknowledged")))?;
        }
        if !inner.coord.lease_valid() || self.paused.load(Ordering::Acquire) {
            return Err(IoFail::Unavailable("the primary has no lease or is confirming its epoch".into()));
        }
        Ok(())
    }

    /// SCSI COMPARE AND WRITE: writes `data` at `offset` only if the range holds `expected`
    /// (as long): `Ok(Some(i))` when byte `i` differs (nothing written). Atomic against every
    /// other write: no write is sequenced between the read it compares and its own write, and
    /// the read returns only what is acknowledged. A retry of a request whose earlier attempt
    /// took effect (`write` is in this copy or in flight) is answered as matched without a
    /// compare: compared against its own effect, it would miscompare.
    pub(super) async fn compare_and_write<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        requester: Option<&Requester>,
        write: WriteId,
        offset: u64,
        expected: Bytes,
        data: Bytes,
    ) -> Result<Option<u64>, IoFail> {
        check_compare_and_write(&expected, &data)?;
        let len = data.len() as u64;
        let alone = self.sequencing.write().await;
        self.check_reservations(inner, requester, Access::Write, offset, len).await?;
        let earlier = {
            let mut st = self.st.lock().expect("core lock");
            if st.core.phase() != Phase::Serving {
                return Err(IoFail::Unavailable("the primary stopped serving".into()));
            }
            self.earlier_attempt(inner, &mut st, write, offset)
        };
        match earlier {
            Earlier::None => {}
            Earlier::Applied => return Ok(None),
            Earlier::InFlight(r) => {
                drop(alone);
                r.await
                    .map_err(|_| IoFail::Unavailable("an earlier attempt of this write was not acknowledged".into()))?;
                return Ok(None);
            }
        }
        let current = self.read(inner, offset, len).await?;
        if let Some(at) = current.iter().zip(expected.iter()).position(|(a, b)| a != b) {
            return Ok(Some(at as u64));
        }
        let sequenced = self.sequence(inner, write, WriteKind::Data, offset, len, data).await?;
        drop(alone);
        sequenced.settle().await?;
        Ok(None)
    }

    /// Where an earlier attempt of the piece at `offset` of host write `write` stands here: in
    /// this copy (noted when this primary was built, or applied since), in flight at this
    /// primary (the receiver fires once it is acknowledged), or not seen.
    fn earlier_attempt<S: BlockStore>(
        &self,
        inner: &Arc<Inner<S>>,
        st: &mut CoreState,
        write: WriteId,
        offset: u64,
    ) -> Earlier {
        if let Some(w) = st.waiters.values_mut().find(|w| w.write == write && w.offset == offset) {
            let (t, r) = oneshot::channel();
            w.watchers.push(t);
            return Earlier::InFlight(r);
        }
        let held = self.settled.contains(&(write, offset))
            || inner
                .volume(self.volume)
                .is_some_and(|v| v.recent.lock().expect("recent lock").holds_write(write, offset));
        if held {
            Earlier::Applied
        } else {
            Earlier::None
        }
    }

    /// Sequences a host write: cut into pieces, each one record of the core. A retry is cut the
    /// same way, so its pieces are the earlier attempt's, and a piece that attempt already
    /// sequenced is not sequenced again. The caller holds `sequencing`.
    async fn sequence<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        write: WriteId,
        kind: WriteKind,
        offset: u64,
        len: u64,
        data: Bytes,
    ) -> Result<Sequenced, IoFail> {
        let mut waits = Vec::new();
        let mut earlier = Vec::new();
        let mut at = 0u64;
        while at < len {
            let piece_max = match kind {
                WriteKind::Data => WRITE_PIECE_BYTES_MAX,
                WriteKind::Zeroes => ZEROES_PIECE_BYTES_MAX,
                WriteKind::Clone { .. } => CLONE_PIECE_BYTES_MAX,
            };
            let piece = (len - at).min(piece_max);
            let room =
                self.room.clone().acquire_owned().await.map_err(|_| IoFail::Unavailable("primary stopped".into()))?;
            let cost = if kind.carries_data() { piece } else { 0 };
            let admission = match inner.store.admit(cost).await {
                Ok(a) => a,
                // The store failed (a flush failed): this primary steps down and the write,
                // never sequenced, is retried at the next one, as in any failover.
                Err(e) if inner.store_failed().is_some() => {
                    self.depose(inner, &format!("the local store failed: {e}"));
                    return Err(IoFail::Unavailable(format!("node {}: the local store failed: {e}", inner.me)));
                }
                Err(e) => return Err(IoFail::Io(format!("local store: {e}"))),
            };
            let (tx, rx) = oneshot::channel();
            {
                let mut st = self.st.lock().expect("core lock");
                if st.core.phase() != Phase::Serving {
                    return Err(IoFail::Unavailable("the primary stopped serving".into()));
                }
                // Checked again here, not only by `route`: the request may have waited for
                // room or budget while the lease ran out (or the process stood still).
                if !inner.coord.lease_valid() || self.paused.load(Ordering::Acquire) {
                    return Err(IoFail::Unavailable("the primary has no lease or is confirming its epoch".into()));
                }
                // A retry of a piece whose earlier attempt took effect in this copy is not
                // executed again: landing a second time, after writes acknowledged since,
                // would undo them (docs/PROTOCOL.md, "Retries of a write that may have taken
                // effect"). Still in flight here: it completes with that attempt.
                let at_offset = offset + at;
                // Planted (chaos-bugs): a proxied write runs whenever it reaches the primary,
                // even when an earlier attempt of it already took effect here.
                let parked_bug = chaos_bugs::on(Bug::ParkAtStoppedPrimary) && inner.net.request_received_at().is_some();
                if write != 0 && !parked_bug {
                    match self.earlier_attempt(inner, &mut st, write, at_offset) {
                        Earlier::None => {}
                        Earlier::Applied => {
                            at += piece;
                            continue;
                        }
                        Earlier::InFlight(r) => {
                            earlier.push(r);
                            at += piece;
                            continue;
                        }
                    }
                }
                if let Some(received) = inner.net.request_received_at() {
                    // Proxied: the deadline fence. The proxy reports the write failed only
                    // after this bound has passed for every attempt it sent.
                    let resumed = *self.resumed_at.lock().expect("resumed lock");
                    let late = received < resumed || received.elapsed() > PROXIED_WRITE_ADMIT_MAX;
                    // Planted (chaos-bugs): no fence; a write parked here runs whenever it comes up.
                    if late && !chaos_bugs::on(Bug::ParkAtStoppedPrimary) {
                        return Err(IoFail::Unavailable(format!(
                            "the proxied write waited {:.1} s at the primary{}; the proxy retries it",
                            received.elapsed().as_secs_f64(),
                            if received < resumed { ", across a pause" } else { "" }
                        )));
                    }
                }
                let token = st.next_token;
                st.next_token += 1;
                let bytes =
                    if kind.carries_data() { data.slice(at as usize..(at + piece) as usize) } else { Bytes::new() };
                // Each piece of a clone takes the blocks of the image from its own place on.
                let kind = match kind {
                    WriteKind::Clone { image, image_offset } => {
                        WriteKind::Clone { image, image_offset: image_offset + at }
                    }
                    other => other,
                };
                st.waiters.insert(
                    token,
                    HostWrite {
                        write,
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
        Ok(Sequenced { waits, earlier })
    }

    /// Reads `len` bytes at `offset` from the local copy, linearizably: the read is queued on
    /// the local applier behind every write sequenced before it, and it returns only once
    /// each of those writes that overlaps it is acknowledged (durable on every member of the
    /// ISR), so it never returns data that a failover could take away (I6). If one of them
    /// fails, the read fails as `Unavailable` and is retried.
    pub(super) async fn read<S: BlockStore>(
        &self,
        inner: &Arc<Inner<S>>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, IoFail> {
        let _queued = self.reads.acquire().await.map_err(|_| IoFail::Unavailable("the primary stopped".to_string()))?;
        let (tx, rx) = oneshot::channel();
        let overlapping: Vec<oneshot::Receiver<()>> = {
            let mut st = self.st.lock().expect("core lock");
            if st.core.phase() != Phase::Serving {
                return Err(IoFail::Unavailable("the primary stopped serving".into()));
            }
            let end = offset + len;
            // Planted (chaos-bugs): wait for none of them; return what the store has applied.
            let wait = !chaos_bugs::on(Bug::ReadUnacknowledged);
            let waits = st
                .waiters
                .values_mut()
                .filter(|w| wait && w.offset < end && offset < w.offset + w.len)
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

    pub(super) fn depose<S: BlockStore>(self: &Arc<Self>, inner: &Arc<Inner<S>>, reason: &str) {
        let mut st = self.st.lock().expect("core lock");
        st.core.depose(reason);
        self.pump(inner, &mut st);
    }
}

/// Waits for local durability of the primary's own writes, in order, in groups.
pub(super) async fn local_durability<S: BlockStore>(
    inner: Weak<Inner<S>>,
    p: Arc<PrimaryDriver>,
    mut rx: mpsc::Receiver<(Seq, Lsn)>,
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
                tracing::error!(volume = %p.volume, error = %e, "local flush failed; stepping down");
                st.core.depose(&format!("local flush failed: {e}"));
            }
        }
        p.pump(&inner, &mut st);
        if st.core.phase() == Phase::Deposed {
            return;
        }
    }
}

/// Ends the pause of a primary whose node has its lease again: it serves again only if the
/// committed map still names it primary of its epoch; otherwise it steps down.
pub(super) async fn confirm_primary<S: BlockStore>(inner: Arc<Inner<S>>, p: Arc<PrimaryDriver>) {
    let confirmed = inner.coord.confirm_primary(p.volume, p.epoch).await;
    match confirmed {
        Ok(true) if inner.coord.lease_valid() => {
            tracing::info!(volume = %p.volume, epoch = %p.epoch, "lease back and epoch confirmed; serving again");
            *p.resumed_at.lock().expect("resumed lock") = Instant::now();
            p.paused.store(false, Ordering::Release);
        }
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(volume = %p.volume, epoch = %p.epoch, "a newer configuration replaced this primary");
            p.depose(&inner, "a newer configuration replaced this primary while its node had no lease");
        }
        Err(e) => tracing::info!(volume = %p.volume, error = %e, "cannot confirm the epoch yet; staying paused"),
    }
    p.confirming.store(false, Ordering::Release);
}
