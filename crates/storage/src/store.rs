//! [`SledStore`]: block data in append-only segment files, the index in sled, group commit
//! through a journal in the segment files.
//!
//! # Layers of the index
//! The index as the store sees it is layered, newest first: the *active* generation (an
//! in-memory overlay of every index change since the last freeze), the committed generations
//! not yet applied to sled (at most [`APPLY_QUEUE_MAX`] + 1), and sled. Overlays hold whole
//! values (a chunk's full map, an extent's full reference counts), so a lookup takes the first
//! layer that has the key; nothing is merged.
//!
//! # Durability order
//! Commit thread, one generation at a time:
//! 1. Freeze: the active generation becomes frozen (a pointer swap under the lock). Every write
//!    in it has already written its data to the segment files.
//! 2. Journal: write the record — header at the block the previous record reserved, body (the
//!    generation's sled changes and the crc32c of each new data block) — into the open segment.
//! 3. `fdatasync` the segment files the generation's data and record are in (usually one), and
//!    the segments directory if files were created. One sync makes data and index durable.
//! 4. Publish: advance the durable position, wake the waiters.
//!
//! Checkpoint thread:
//! 5. Apply the committed generations to sled in order, those that arrive within
//!    [`APPLY_GATHER`] of each other as one atomic batch; they then leave the layers.
//! 6. Every [`CHECKPOINT_INTERVAL`]: `flush` sled and `fdatasync` its `db` file (sled's flush
//!    uses `sync_file_range` only). Now the journal records before the checkpoint are no longer
//!    needed, and their blocks, the blocks that lost their last reference before it, and unused
//!    segment files are released — not earlier, because until then recovery may replay a
//!    record and check the blocks it names.
//!
//! Recovery (open): replay the records after sled's checkpoint in order, each only if its
//! header and body checksums match and every data block it names matches its crc32c — a crash
//! inside step 3 can leave a record durable and its data not; that record was never published,
//! nor was anything after it, so replay stops there. sled never holds an entry whose data was
//! not synced first: it is only written in step 5, after step 3.
//!
//! Writes arriving during a commit go to the new active generation and share the next one:
//! that is the group commit.
//!
//! # Concurrency
//! One mutex guards the in-memory state; it is held for index work only. An aligned write
//! computes checksums and writes its data outside it (reserve space, write, then apply the
//! index change); unaligned writes, trims and clones run entirely under it, which makes
//! read-modify-write atomic. Reads look up the index under the mutex and read data outside it,
//! holding a read guard on a "reclaim gate" that hole punching takes exclusively, so a block a
//! read has looked up cannot be punched under it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tandem_types::{VolumeId, BLOCK_BYTES, VOLUME_BYTES_MAX};
use tokio::sync::watch;

use crate::layout::{
    self, block_in_segment, chunk_key, chunk_of_key, decode_refs, encode_refs, grave_key, pba, refs_key, segment_of,
    segment_offset, volume_key, Chunk, Slot, VolumeRec, CHUNK_BLOCKS, EXTENT_BLOCKS_MAX, SEGMENT_BLOCKS_MAX,
};
use crate::segments;
use crate::{zero_block_crc, Admission, BlockStore, Lsn, SpaceStats, StoreError};

/// Changes not yet durable, in bytes: data written plus the in-memory index overlay. It bounds
/// the overlay's memory and the dirty data one `fdatasync` must write; writers wait when it is
/// reached. 64 MiB is a few hundred milliseconds of a fast disk.
pub const PENDING_BYTES_MAX: u64 = 64 << 20;

/// The commit thread commits on its own once this much is pending, so that writers rarely wait.
const FLUSH_TRIGGER_BYTES: u64 = 16 << 20;

/// Changes nobody waits for are made durable (and freed space reclaimed) at least this often.
const FLUSH_INTERVAL: Duration = Duration::from_millis(1000);

/// Trims and clones of large ranges are applied in steps of this many blocks (1 GiB): one
/// step's index overlay stays within a few MiB.
const STEP_BLOCKS: u64 = 1 << 18;

/// Chunks of a deleted volume's map released per commit.
const REAP_CHUNKS_STEP: usize = 1024;

/// sled's page cache. The index of a fully written 1 TiB volume is about 1.3 GiB; the hot part
/// is what matters.
const INDEX_CACHE_BYTES: u64 = 128 << 20;

/// The largest range [`BlockStore::block_checksums`] answers in one call: 4 GiB, i.e. 4 MiB
/// of checksums, below the network frame limit.
pub const CHECKSUM_RANGE_BYTES_MAX: u64 = 4 << 30;

/// What overlay entries count against [`PENDING_BYTES_MAX`] (their memory, roughly).
const CHUNK_COST: u64 = CHUNK_BLOCKS * 16 + 64;
const REFS_COST: u64 = 4 * EXTENT_BLOCKS_MAX + 64;
const FREE_COST: u64 = 8;
const NEW_BLOCK_COST: u64 = 12;

/// The checkpointer applies the committed generations that arrive within this long of each
/// other as one sled batch, at most [`APPLY_GATHER_MAX`] of them (well below
/// [`APPLY_QUEUE_MAX`], so the committer never waits for the gathering).
const APPLY_GATHER: Duration = Duration::from_millis(5);
const APPLY_GATHER_MAX: usize = 16;

/// Committed generations waiting to be applied to sled. Each is also an index layer that reads
/// consult, so the bound keeps lookups short; full means the committer waits.
const APPLY_QUEUE_MAX: usize = 32;

/// sled is made durable (a checkpoint: journal records before it are no longer needed, and
/// space freed before it can be reclaimed) at least this often while changes arrive. It bounds
/// the journal replayed at open.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// Freed blocks are punched a share at a time (see `punch_some`): at least this many per step,
/// or 1/[`PUNCH_SHARE_DIVISOR`] of the backlog, after each applied generation or
/// [`PUNCH_IDLE_WAIT`] of quiet.
const PUNCH_BATCH_MIN: usize = 32;
const PUNCH_SHARE_DIVISOR: usize = 64;
const PUNCH_IDLE_WAIT: Duration = Duration::from_millis(2);

/// A checkpoint is also taken once this many generations wait for one.
const CHECKPOINT_GENERATIONS_MAX: usize = 512;

/// A journal body larger than this is not trusted at recovery (a generation is bounded by
/// [`PENDING_BYTES_MAX`]; its index changes are a fraction of that).
const JOURNAL_BODY_BYTES_MAX: u64 = 256 << 20;

const B: u64 = BLOCK_BYTES;
const BLOCK: usize = BLOCK_BYTES as usize;

fn sled_err(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(e) => StoreError::Io(e),
        other => StoreError::Io(io::Error::other(other.to_string())),
    }
}

fn corrupt_index(what: impl Into<String>) -> StoreError {
    StoreError::CorruptIndex(what.into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug that already crashed a thread; the state itself
    // is only changed by infallible code after validation, so keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A block store in a directory: `index/` (sled) and `segments/` (segment files with the
/// journal). Cheap to clone; all clones are one store. Dropping the last clone stops its
/// threads *without* flushing: changes not yet [`durable`](BlockStore::durable) are lost, as
/// in a crash. Call `durable(last_lsn())` first for a clean shutdown.
#[derive(Clone)]
pub struct SledStore {
    handle: Arc<Handle>,
}

struct Handle {
    core: Arc<Core>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.core.st);
            st.shutdown = true;
        }
        self.core.commit_cv.notify_all();
        self.core.budget_freed();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

struct Core {
    segment_dir: PathBuf,
    db: sled::Db,
    /// sled's data file, for the `fdatasync` sled's own flush does not do.
    db_file: File,
    st: Mutex<State>,
    /// Writers waiting for budget.
    budget_cv: Condvar,
    /// The same wake-up for async admissions ([`BlockStore::admit`]): bumped with every
    /// `budget_cv` notification.
    room_tx: watch::Sender<u64>,
    /// The commit thread waiting for work.
    commit_cv: Condvar,
    /// Reads hold it shared from index lookup to the end of their data reads; hole punching
    /// holds it exclusively.
    gate: RwLock<()>,
    durable_tx: watch::Sender<Durable>,
}

impl Core {
    /// Wakes the writers and admissions that wait for budget.
    fn budget_freed(&self) {
        self.budget_cv.notify_all();
        self.room_tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[derive(Clone, Debug)]
struct Durable {
    lsn: u64,
    failed: Option<String>,
}

/// A segment file and its accounting.
struct Segment {
    file: Arc<File>,
    /// Blocks handed out so far (the append position).
    used_blocks: u64,
    /// Blocks with a non-zero reference count.
    live_blocks: u64,
    /// Reservations whose data is being written and not yet in the index.
    inflight: u32,
    /// No more extents will be put here.
    sealed: bool,
}

impl Segment {
    fn dead(&self) -> bool {
        self.sealed && self.live_blocks == 0 && self.inflight == 0
    }
}

/// Space reserved for one extent.
struct Piece {
    extent: u64,
    blocks: u64,
    file: Arc<File>,
}

/// One generation of index changes (see the module docs).
#[derive(Default)]
struct Gen {
    /// Full chunk maps; an empty chunk means "remove the key".
    chunks: BTreeMap<(u64, u64), Box<Chunk>>,
    /// Full reference counts; all zeros means "remove the key".
    refs: HashMap<u64, Vec<u32>>,
    volumes: BTreeMap<VolumeId, Option<VolumeRec>>,
    /// Graveyard changes: `true` adds a dead map, `false` removes it (fully released).
    graves: BTreeMap<u64, bool>,
    /// Segment files written by this generation's extents.
    written: BTreeSet<u32>,
    /// The new data blocks and their checksums (journal recovery checks them).
    new_blocks: Vec<(u64, u32)>,
    /// Physical blocks that lost their last reference (or were reserved and never used).
    frees: Vec<u64>,
    /// Segments that became unused; deleted once this generation is durable, if still unused.
    dead_segments: Vec<u32>,
    cost: u64,
    /// Set when frozen: the position of its last change, and the store's counters then.
    lsn: u64,
    next_map: u64,
    next_segment: u32,
}

/// Reclaim a checkpoint releases: a generation's freed blocks and dead segments, and the blocks
/// of its journal record.
#[derive(Default)]
struct Reclaim {
    frees: Vec<u64>,
    dead_segments: Vec<u32>,
    journal: Vec<(u64, u64)>,
}

/// A generation whose journal record is durable, on its way to sled.
struct Committed {
    gen: Arc<Gen>,
    ops: Vec<layout::Op>,
    journal: Vec<(u64, u64)>,
}

struct State {
    db: sled::Db,
    segment_dir: PathBuf,
    volumes: BTreeMap<VolumeId, VolumeRec>,
    /// Maps of deleted volumes not yet released.
    graves: BTreeSet<u64>,
    next_map: u64,
    next_segment: u32,
    lsn: u64,
    durable_lsn: u64,
    requested_lsn: u64,
    active: Gen,
    /// Frozen generations being made durable, newest first (at most two: one in its data
    /// sync, one in its index sync).
    flushing: VecDeque<Arc<Gen>>,
    /// The position of the newest frozen generation.
    frozen_lsn: u64,
    segments: BTreeMap<u32, Segment>,
    /// Where new extents go; 0 before the first write after open.
    open_segment: u32,
    /// Blocks after which a segment is sealed.
    segment_blocks: u64,
    /// A segment file was created since the segments directory was last synced.
    dir_dirty: bool,
    /// The reserved block for the next journal record's header, and that record's number.
    journal_next: u64,
    journal_seq: u64,
    live_blocks: u64,
    flushes: u64,
    failed: Option<String>,
    shutdown: bool,
    /// Room reserved by admissions ([`BlockStore::admit`]) not used yet.
    admitted: u64,
}

/// Tuning for [`SledStore::open_with`].
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// Size at which a segment file is sealed and a new one started: a multiple of
    /// `BLOCK_BYTES`, at most [`SEGMENT_BLOCKS_MAX`] blocks (the default). Small segments are
    /// for tests that want to see segment files come and go.
    pub segment_bytes: u64,
    /// How often sled is made durable while changes arrive (see [`CHECKPOINT_INTERVAL`]).
    /// Tests stretch it to make reopening replay the journal.
    pub checkpoint_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { segment_bytes: SEGMENT_BLOCKS_MAX * B, checkpoint_interval: CHECKPOINT_INTERVAL }
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with default options; see
    /// [`SledStore::open_with`].
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with(dir, StoreOptions::default())
    }

    /// Opens (or creates) the store in `dir`: replays the journal, releases space that no
    /// durable index entry uses (data written but never made durable before a crash), and
    /// starts the commit and checkpoint threads.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<SledStore, StoreError> {
        let segment_blocks = options.segment_bytes / B;
        if !options.segment_bytes.is_multiple_of(B) || segment_blocks == 0 || segment_blocks > SEGMENT_BLOCKS_MAX {
            return Err(StoreError::Invalid(format!("segment size {} bytes", options.segment_bytes)));
        }
        let segment_dir = dir.join("segments");
        let index_dir = dir.join("index");
        std::fs::create_dir_all(&segment_dir)?;
        let db = open_index(&index_dir)?;
        let db_file = File::open(index_dir.join("db"))?;

        let mut segments = BTreeMap::new();
        for (no, file) in segments::open_all(&segment_dir)? {
            let len = file.metadata()?.len();
            segments.insert(
                no,
                Segment {
                    file: Arc::new(file),
                    used_blocks: len.div_ceil(B),
                    live_blocks: 0,
                    inflight: 0,
                    sealed: true,
                },
            );
        }
        replay_journal(&db, &db_file, &segments)?;

        let counter = |key: &[u8], default: u64| -> Result<u64, StoreError> {
            match db.get(key).map_err(sled_err)? {
                Some(v) => layout::decode_u64(&v).map_err(|e| corrupt_index(format!("counter: {}", e.0))),
                None => Ok(default),
            }
        };
        let lsn = counter(layout::STATE_LSN, 0)?;
        let next_map = counter(layout::STATE_NEXT_MAP, 1)?;
        let journal_seq = counter(layout::STATE_JOURNAL_SEQ, 0)?;
        let next_segment = u32::try_from(counter(layout::STATE_NEXT_SEGMENT, 1)?)
            .map_err(|_| corrupt_index("segment counter out of range"))?
            .max(segments.keys().next_back().map_or(1, |no| no.saturating_add(1)));

        let mut volumes = BTreeMap::new();
        for kv in db.scan_prefix(layout::volume_prefix()) {
            let (k, v) = kv.map_err(sled_err)?;
            let id = layout::key_id(&k).map_err(|e| corrupt_index(format!("volume key: {}", e.0)))?;
            let rec = VolumeRec::decode(&v).map_err(|e| corrupt_index(format!("volume {id}: {}", e.0)))?;
            volumes.insert(VolumeId(id), rec);
        }
        let mut graves = BTreeSet::new();
        for kv in db.scan_prefix(layout::grave_prefix()) {
            let (k, _) = kv.map_err(sled_err)?;
            graves.insert(layout::key_id(&k).map_err(|e| corrupt_index(format!("grave key: {}", e.0)))?);
        }
        let live_blocks = reclaim_orphans(&db, &segment_dir, &mut segments)?;

        let st = State {
            db: db.clone(),
            segment_dir: segment_dir.clone(),
            volumes,
            graves,
            next_map,
            next_segment,
            lsn,
            durable_lsn: lsn,
            requested_lsn: lsn,
            active: Gen::default(),
            flushing: VecDeque::new(),
            frozen_lsn: lsn,
            segments,
            open_segment: 0,
            segment_blocks,
            dir_dirty: false,
            journal_next: 0,
            journal_seq,
            live_blocks,
            flushes: 0,
            failed: None,
            shutdown: false,
            admitted: 0,
        };
        let mut st = st;
        // The first journal record goes in a fresh segment; where, must be durable before it is.
        let header = st.reserve(1)?;
        st.journal_next = header[0].extent;
        segments::sync_dir(&st.segment_dir)?;
        st.dir_dirty = false;
        db.insert(layout::STATE_JOURNAL_NEXT, &layout::encode_u64(st.journal_next)[..]).map_err(sled_err)?;
        db.insert(layout::STATE_NEXT_SEGMENT, &layout::encode_u64(u64::from(st.next_segment))[..]).map_err(sled_err)?;
        db.flush().map_err(sled_err)?;
        db_file.sync_data()?;
        let (durable_tx, _) = watch::channel(Durable { lsn, failed: None });
        let core = Arc::new(Core {
            segment_dir,
            db,
            db_file,
            st: Mutex::new(st),
            budget_cv: Condvar::new(),
            room_tx: watch::channel(0).0,
            commit_cv: Condvar::new(),
            gate: RwLock::new(()),
            durable_tx,
        });
        let (to_apply, from_commit) = std::sync::mpsc::sync_channel(APPLY_QUEUE_MAX);
        let (c1, c2) = (core.clone(), core.clone());
        let interval = options.checkpoint_interval;
        let commit = std::thread::Builder::new().name("store-commit".into()).spawn(move || committer(c1, to_apply))?;
        let apply = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpointer(c2, from_commit, interval))?;
        Ok(SledStore { handle: Arc::new(Handle { core, threads: Mutex::new(vec![commit, apply]) }) })
    }

    fn core(&self) -> &Core {
        &self.handle.core
    }

    /// Takes the lock for a change: waits while the pending budget is used up, refuses if the
    /// store failed.
    /// With an admission, the room it reserved is taken and nothing waits. Room reserved by
    /// admissions not yet used counts as used for everyone else.
    fn lock_for_change(&self, admission: Option<Admission>) -> Result<MutexGuard<'_, State>, StoreError> {
        let core = self.core();
        let mut st = lock(&core.st);
        let admitted_now = admission.is_some();
        if let Some(a) = admission {
            st.admitted -= a.consume();
            // Room given back (an admission reserves an estimate) may let others in.
            core.budget_freed();
        }
        loop {
            if let Some(f) = &st.failed {
                return Err(StoreError::Failed(f.clone()));
            }
            if st.shutdown {
                return Err(StoreError::Failed("the store is closed".into()));
            }
            if admitted_now || st.pending_cost() + st.admitted < PENDING_BYTES_MAX {
                return Ok(st);
            }
            core.commit_cv.notify_one();
            st = core.budget_cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// [`BlockStore::write`], with or without an admission.
    fn write_with(
        &self,
        vol: VolumeId,
        offset: u64,
        data: &[u8],
        admission: Option<Admission>,
    ) -> Result<Lsn, StoreError> {
        let len = data.len() as u64;
        if len > 0 && offset.is_multiple_of(B) && len.is_multiple_of(B) {
            return self.write_aligned(vol, offset, data, admission);
        }
        let mut st = self.lock_for_change(admission)?;
        let rec = st.volume(vol)?;
        check_range(vol, rec.size_bytes, offset, len)?;
        if len == 0 {
            return Ok(Lsn(st.lsn));
        }
        self.write_locked(&mut st, vol, rec, offset, data)?;
        Ok(st.bump())
    }

    /// [`BlockStore::write_zeroes`], with or without an admission.
    fn write_zeroes_with(
        &self,
        vol: VolumeId,
        offset: u64,
        len: u64,
        admission: Option<Admission>,
    ) -> Result<Lsn, StoreError> {
        let mut st = self.lock_for_change(admission)?;
        let rec = st.volume(vol)?;
        check_range(vol, rec.size_bytes, offset, len)?;
        if len == 0 {
            return Ok(Lsn(st.lsn));
        }
        let end = offset + len;
        let (w0, w1) = (offset.div_ceil(B), end / B);
        if w0 >= w1 {
            // Within one block, or across one boundary without a whole block.
            let zeros = vec![0u8; len as usize];
            self.write_locked(&mut st, vol, rec, offset, &zeros)?;
            return Ok(st.bump());
        }
        // A step that fails leaves the steps before it applied; they still get a position.
        let mut changed = false;
        let fail = |st: &mut State, changed: bool, e: StoreError| {
            if changed {
                st.bump();
            }
            Err(e)
        };
        if !offset.is_multiple_of(B) {
            if let Err(e) = self.write_locked(&mut st, vol, rec, offset, &vec![0u8; (w0 * B - offset) as usize]) {
                return fail(&mut st, changed, e);
            }
            changed = true;
        }
        if !end.is_multiple_of(B) {
            if let Err(e) = self.write_locked(&mut st, vol, rec, w1 * B, &vec![0u8; (end - w1 * B) as usize]) {
                return fail(&mut st, changed, e);
            }
            changed = true;
        }
        let mut b = w0;
        loop {
            let step_end = w1.min(b + STEP_BLOCKS);
            if let Err(e) = st.unmap(vol, rec.map, b, step_end) {
                return fail(&mut st, changed, e);
            }
            let lsn = st.bump();
            b = step_end;
            if b == w1 {
                return Ok(lsn);
            }
            drop(st);
            st = self.lock_for_change(None)?;
            if st.volume(vol)?.map != rec.map {
                return Err(StoreError::UnknownVolume(vol));
            }
        }
    }

    fn write_aligned(
        &self,
        vol: VolumeId,
        offset: u64,
        data: &[u8],
        admission: Option<Admission>,
    ) -> Result<Lsn, StoreError> {
        let crcs: Vec<u32> = data.chunks(BLOCK).map(crc32c::crc32c).collect();
        let blocks = data.len() as u64 / B;
        let (map, pieces) = {
            let mut st = self.lock_for_change(admission)?;
            let rec = st.volume(vol)?;
            check_range(vol, rec.size_bytes, offset, data.len() as u64)?;
            let pieces = st.reserve(blocks)?;
            st.active.cost += data.len() as u64;
            (rec.map, pieces)
        };
        let written = write_pieces(&pieces, data);
        let mut st = lock(&self.core().st);
        let result = written.and_then(|()| {
            if st.volume(vol)?.map != map {
                return Err(StoreError::UnknownVolume(vol));
            }
            st.apply_write(vol, map, offset / B, &pieces, &crcs)
        });
        st.release(&pieces, result.is_ok());
        result?;
        Ok(st.bump())
    }

    /// Unaligned writes: read-modify-write of the partial blocks, all under the lock.
    fn write_locked(
        &self,
        st: &mut State,
        vol: VolumeId,
        rec: VolumeRec,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let end = offset + data.len() as u64;
        let b0 = offset / B;
        let b1 = end.div_ceil(B);
        let mut buf = vec![0u8; ((b1 - b0) * B) as usize];
        if !offset.is_multiple_of(B) {
            st.read_block(vol, rec.map, b0, &mut buf[..BLOCK])?;
        }
        if !end.is_multiple_of(B) && (b1 - 1 != b0 || offset.is_multiple_of(B)) {
            let at = buf.len() - BLOCK;
            st.read_block(vol, rec.map, b1 - 1, &mut buf[at..])?;
        }
        let at = (offset - b0 * B) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        let crcs: Vec<u32> = buf.chunks(BLOCK).map(crc32c::crc32c).collect();
        let pieces = st.reserve(b1 - b0)?;
        st.active.cost += buf.len() as u64;
        let result = write_pieces(&pieces, &buf).and_then(|()| st.apply_write(vol, rec.map, b0, &pieces, &crcs));
        st.release(&pieces, result.is_ok());
        result
    }
}

/// Opens sled. A store dropped a moment ago in this process may still hold sled's file lock
/// (sled finishes buffered writes on background threads): retry for a while.
fn open_index(dir: &Path) -> Result<sled::Db, StoreError> {
    const LOCK_TRIES_MAX: u32 = 100;
    let mut tries = 0;
    loop {
        match sled::Config::new().path(dir).cache_capacity(INDEX_CACHE_BYTES).open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") && tries < LOCK_TRIES_MAX => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map_err(sled_err),
        }
    }
}

/// Writes each piece's share of `data` to its segment.
fn write_pieces(pieces: &[Piece], data: &[u8]) -> Result<(), StoreError> {
    let mut at = 0usize;
    for p in pieces {
        let n = (p.blocks * B) as usize;
        p.file.write_all_at(&data[at..at + n], segment_offset(p.extent))?;
        at += n;
    }
    Ok(())
}

fn check_range(vol: VolumeId, size_bytes: u64, offset: u64, len: u64) -> Result<(), StoreError> {
    match offset.checked_add(len) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(StoreError::OutOfRange { vol, offset, len, size_bytes }),
    }
}

fn check_aligned(what: &str, offset: u64, len: u64) -> Result<(), StoreError> {
    if !offset.is_multiple_of(B) || !len.is_multiple_of(B) {
        return Err(StoreError::Invalid(format!("{what}: offset {offset} and length {len} must be multiples of {B}")));
    }
    Ok(())
}

impl State {
    /// Changes not yet durable (see [`PENDING_BYTES_MAX`]).
    fn pending_cost(&self) -> u64 {
        self.active.cost + self.flushing.iter().map(|g| g.cost).sum::<u64>()
    }

    fn bump(&mut self) -> Lsn {
        self.lsn += 1;
        Lsn(self.lsn)
    }

    fn volume(&self, vol: VolumeId) -> Result<VolumeRec, StoreError> {
        self.volumes.get(&vol).copied().ok_or(StoreError::UnknownVolume(vol))
    }

    /// A chunk as of now, read-only; `None` if it has no entry.
    fn chunk(&self, vol: VolumeId, map: u64, c: u64) -> Result<Option<Cow<'_, Chunk>>, StoreError> {
        if let Some(ch) = self.active.chunks.get(&(map, c)) {
            return Ok(Some(Cow::Borrowed(&**ch)));
        }
        if let Some(ch) = self.flushing.iter().find_map(|g| g.chunks.get(&(map, c))) {
            return Ok(Some(Cow::Borrowed(&**ch)));
        }
        match self.db.get(chunk_key(map, c)).map_err(sled_err)? {
            None => Ok(None),
            Some(v) => Chunk::decode(&v)
                .map(|ch| Some(Cow::Owned(ch)))
                .map_err(|_| StoreError::Corrupt { vol, block: c * CHUNK_BLOCKS }),
        }
    }

    /// The chunk in the active generation, loaded there if needed.
    fn chunk_mut(&mut self, vol: VolumeId, map: u64, c: u64) -> Result<&mut Chunk, StoreError> {
        if !self.active.chunks.contains_key(&(map, c)) {
            let base = match self.chunk(vol, map, c)? {
                Some(ch) => Box::new(ch.into_owned()),
                None => Box::default(),
            };
            self.active.chunks.insert((map, c), base);
            self.active.cost += CHUNK_COST;
        }
        Ok(self.active.chunks.get_mut(&(map, c)).expect("chunk loaded above"))
    }

    /// An extent's reference counts in the active generation, loaded there if needed.
    fn refs_mut(&mut self, extent: u64) -> Result<&mut Vec<u32>, StoreError> {
        if !self.active.refs.contains_key(&extent) {
            let base = if let Some(r) = self.flushing.iter().find_map(|g| g.refs.get(&extent)) {
                r.clone()
            } else {
                let v = self
                    .db
                    .get(refs_key(extent))
                    .map_err(sled_err)?
                    .ok_or_else(|| corrupt_index(format!("extent {extent:#x} has no reference counts")))?;
                decode_refs(&v).map_err(|e| corrupt_index(format!("extent {extent:#x}: {}", e.0)))?
            };
            self.active.refs.insert(extent, base);
            self.active.cost += REFS_COST;
        }
        Ok(self.active.refs.get_mut(&extent).expect("refs loaded above"))
    }

    /// Chunk numbers in `[c0, c1)` that may have entries (some may be empty). Overlay keys are
    /// all taken; at most `sled_limit` come from sled.
    fn chunks_in(&self, map: u64, c0: u64, c1: u64, sled_limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut set = BTreeSet::new();
        set.extend(self.active.chunks.range((map, c0)..(map, c1)).map(|(k, _)| k.1));
        for g in &self.flushing {
            set.extend(g.chunks.range((map, c0)..(map, c1)).map(|(k, _)| k.1));
        }
        for k in self.db.range(chunk_key(map, c0)..chunk_key(map, c1)).keys().take(sled_limit) {
            let k = k.map_err(sled_err)?;
            set.insert(chunk_of_key(&k).map_err(|e| corrupt_index(format!("map key: {}", e.0)))?);
        }
        Ok(set.into_iter().collect())
    }

    /// The slots of blocks `[b0, b1)`.
    fn slots(&self, vol: VolumeId, map: u64, b0: u64, b1: u64) -> Result<Vec<Slot>, StoreError> {
        let mut out = Vec::with_capacity((b1 - b0) as usize);
        let mut b = b0;
        while b < b1 {
            let c = b / CHUNK_BLOCKS;
            let end = b1.min((c + 1) * CHUNK_BLOCKS);
            let base = c * CHUNK_BLOCKS;
            match self.chunk(vol, map, c)? {
                Some(ch) => out.extend_from_slice(&ch.slots[(b - base) as usize..(end - base) as usize]),
                None => out.resize(out.len() + (end - b) as usize, Slot::default()),
            }
            b = end;
        }
        Ok(out)
    }

    fn file(&self, segment: u32) -> Option<Arc<File>> {
        self.segments.get(&segment).map(|s| s.file.clone())
    }

    /// Reads and verifies one block (for read-modify-write).
    fn read_block(&self, vol: VolumeId, map: u64, block: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let slot = self.slots(vol, map, block, block + 1)?[0];
        if !slot.is_mapped() {
            out.fill(0);
            return Ok(());
        }
        let file = self.file(segment_of(slot.pba())).ok_or(StoreError::Corrupt { vol, block })?;
        read_verified(&file, vol, block, &[slot], out)
    }

    /// Hands out space for `blocks` blocks as extents of at most [`EXTENT_BLOCKS_MAX`], rolling
    /// to a new segment file when one is full. Each piece counts as in flight until
    /// [`State::release`].
    fn reserve(&mut self, mut blocks: u64) -> Result<Vec<Piece>, StoreError> {
        let mut pieces = Vec::new();
        while blocks > 0 {
            let limit = self.segment_blocks;
            let full = self.segments.get(&self.open_segment).is_none_or(|s| s.used_blocks >= limit);
            if full {
                if let Err(e) = self.open_new_segment() {
                    self.release(&pieces, false);
                    return Err(e);
                }
            }
            let no = self.open_segment;
            let seg = self.segments.get_mut(&no).expect("open segment exists");
            let n = blocks.min(EXTENT_BLOCKS_MAX).min(limit - seg.used_blocks);
            pieces.push(Piece { extent: pba(no, seg.used_blocks), blocks: n, file: seg.file.clone() });
            seg.used_blocks += n;
            seg.inflight += 1;
            blocks -= n;
        }
        Ok(pieces)
    }

    fn open_new_segment(&mut self) -> Result<(), StoreError> {
        let no = self.next_segment;
        let file = segments::create(&self.segment_dir, no)?;
        self.next_segment = no.checked_add(1).ok_or_else(|| StoreError::Invalid("segment numbers exhausted".into()))?;
        if let Some(old) = self.segments.get_mut(&self.open_segment) {
            old.sealed = true;
            if old.dead() {
                self.active.dead_segments.push(self.open_segment);
            }
        }
        self.segments
            .insert(no, Segment { file: Arc::new(file), used_blocks: 0, live_blocks: 0, inflight: 0, sealed: false });
        self.open_segment = no;
        self.dir_dirty = true;
        Ok(())
    }

    /// Ends the reservations; space of pieces never put in the index is freed after the next
    /// flush.
    fn release(&mut self, pieces: &[Piece], applied: bool) {
        for p in pieces {
            let no = segment_of(p.extent);
            if !applied {
                self.active.frees.extend(p.extent..p.extent + p.blocks);
                self.active.cost += FREE_COST * p.blocks;
            }
            if let Some(seg) = self.segments.get_mut(&no) {
                seg.inflight -= 1;
                if seg.dead() {
                    self.active.dead_segments.push(no);
                }
            }
        }
    }

    /// Loads the reference counts a change needs and checks that it is possible: every slot in
    /// `gain` and `lose` is one reference that exists now (`gain` slots are about to be shared,
    /// `lose` slots dropped). Nothing is changed but loading.
    fn check_refs(&mut self, gain: &[Slot], lose: &[Slot]) -> Result<(), StoreError> {
        let mut need: HashMap<(u64, u32), u64> = HashMap::new();
        for s in gain.iter().chain(lose).filter(|s| s.is_mapped()) {
            *need.entry((s.extent, s.block)).or_default() += 1;
        }
        for ((extent, block), n) in need {
            let refs = self.refs_mut(extent)?;
            let r = refs
                .get(block as usize)
                .copied()
                .ok_or_else(|| corrupt_index(format!("extent {extent:#x} has no block {block}")))?;
            if r != u32::MAX && u64::from(r) < n {
                return Err(corrupt_index(format!("extent {extent:#x} block {block}: {r} references, {n} in use")));
            }
        }
        Ok(())
    }

    /// One more reference (checked by [`State::check_refs`]). Counts saturate: a block at
    /// `u32::MAX` is never freed.
    fn add_ref(&mut self, s: Slot) {
        let r = &mut self.active.refs.get_mut(&s.extent).expect("checked refs")[s.block as usize];
        *r = r.saturating_add(1);
    }

    /// One reference fewer (checked by [`State::check_refs`]); the last one frees the block once
    /// this generation is durable.
    fn drop_ref(&mut self, s: Slot) {
        let r = &mut self.active.refs.get_mut(&s.extent).expect("checked refs")[s.block as usize];
        if *r == u32::MAX {
            return;
        }
        assert!(*r > 0, "reference count underflow: check_refs was skipped");
        *r -= 1;
        if *r == 0 {
            self.active.frees.push(s.pba());
            self.active.cost += FREE_COST;
            self.live_blocks -= 1;
            let no = segment_of(s.pba());
            if let Some(seg) = self.segments.get_mut(&no) {
                seg.live_blocks = seg.live_blocks.saturating_sub(1);
                if seg.dead() {
                    self.active.dead_segments.push(no);
                }
            }
        }
    }

    /// Points blocks `b0..` at the reserved pieces (in order), dropping the old references.
    fn apply_write(
        &mut self,
        vol: VolumeId,
        map: u64,
        b0: u64,
        pieces: &[Piece],
        crcs: &[u32],
    ) -> Result<(), StoreError> {
        let b1 = b0 + crcs.len() as u64;
        let (c0, c1) = (b0 / CHUNK_BLOCKS, (b1 - 1) / CHUNK_BLOCKS);
        let mut old = Vec::new();
        for c in c0..=c1 {
            let base = c * CHUNK_BLOCKS;
            let (lo, hi) = (b0.max(base) - base, b1.min(base + CHUNK_BLOCKS) - base);
            let ch = self.chunk_mut(vol, map, c)?;
            old.extend(ch.slots[lo as usize..hi as usize].iter().filter(|s| s.is_mapped()));
        }
        self.check_refs(&[], &old)?;
        // Nothing below fails.
        let mut b = b0;
        for p in pieces {
            self.active.refs.insert(p.extent, vec![1; p.blocks as usize]);
            self.active.cost += REFS_COST;
            self.active.written.insert(segment_of(p.extent));
            self.active.new_blocks.extend((0..p.blocks).map(|k| (p.extent + k, crcs[(b - b0 + k) as usize])));
            self.active.cost += NEW_BLOCK_COST * p.blocks;
            self.live_blocks += p.blocks;
            if let Some(seg) = self.segments.get_mut(&segment_of(p.extent)) {
                seg.live_blocks += p.blocks;
            }
            for k in 0..p.blocks {
                let c = b / CHUNK_BLOCKS;
                let ch = self.active.chunks.get_mut(&(map, c)).expect("chunk loaded");
                ch.slots[(b - c * CHUNK_BLOCKS) as usize] =
                    Slot { extent: p.extent, block: k as u32, crc: crcs[(b - b0) as usize] };
                b += 1;
            }
        }
        for s in old {
            self.drop_ref(s);
        }
        Ok(())
    }

    /// Unmaps whole blocks `[b0, b1)` (at most [`STEP_BLOCKS`]).
    fn unmap(&mut self, vol: VolumeId, map: u64, b0: u64, b1: u64) -> Result<(), StoreError> {
        let chunks = self.chunks_in(map, b0 / CHUNK_BLOCKS, b1.div_ceil(CHUNK_BLOCKS), usize::MAX)?;
        let mut old = Vec::new();
        for &c in &chunks {
            let base = c * CHUNK_BLOCKS;
            let (lo, hi) = (b0.max(base) - base, b1.min(base + CHUNK_BLOCKS) - base);
            let ch = self.chunk_mut(vol, map, c)?;
            old.extend(ch.slots[lo as usize..hi as usize].iter().filter(|s| s.is_mapped()));
        }
        self.check_refs(&[], &old)?;
        for &c in &chunks {
            let base = c * CHUNK_BLOCKS;
            let (lo, hi) = (b0.max(base) - base, b1.min(base + CHUNK_BLOCKS) - base);
            let ch = self.active.chunks.get_mut(&(map, c)).expect("chunk loaded");
            ch.slots[lo as usize..hi as usize].fill(Slot::default());
        }
        for s in old {
            self.drop_ref(s);
        }
        Ok(())
    }

    /// Makes dst blocks `[d0, d0 + n)` share src blocks `[s0, s0 + n)` (n at most
    /// [`STEP_BLOCKS`]; the ranges do not overlap).
    fn clone_step(
        &mut self,
        src: (VolumeId, u64),
        s0: u64,
        dst: (VolumeId, u64),
        d0: u64,
        n: u64,
    ) -> Result<(), StoreError> {
        let ((svol, smap), (dvol, dmap)) = (src, dst);
        let mut gain: Vec<(u64, Slot)> = Vec::new();
        for c in self.chunks_in(smap, s0 / CHUNK_BLOCKS, (s0 + n).div_ceil(CHUNK_BLOCKS), usize::MAX)? {
            let base = c * CHUNK_BLOCKS;
            let (lo, hi) = (s0.max(base), (s0 + n).min(base + CHUNK_BLOCKS));
            if let Some(ch) = self.chunk(svol, smap, c)? {
                for b in lo..hi {
                    let s = ch.slots[(b - base) as usize];
                    if s.is_mapped() {
                        gain.push((b - s0 + d0, s));
                    }
                }
            }
        }
        let mut dchunks: BTreeSet<u64> =
            self.chunks_in(dmap, d0 / CHUNK_BLOCKS, (d0 + n).div_ceil(CHUNK_BLOCKS), usize::MAX)?.into_iter().collect();
        dchunks.extend(gain.iter().map(|(b, _)| b / CHUNK_BLOCKS));
        let mut lose = Vec::new();
        for &c in &dchunks {
            let base = c * CHUNK_BLOCKS;
            let (lo, hi) = (d0.max(base) - base, (d0 + n).min(base + CHUNK_BLOCKS) - base);
            let ch = self.chunk_mut(dvol, dmap, c)?;
            lose.extend(ch.slots[lo as usize..hi as usize].iter().filter(|s| s.is_mapped()));
        }
        let gain_slots: Vec<Slot> = gain.iter().map(|(_, s)| *s).collect();
        self.check_refs(&gain_slots, &lose)?;
        // Nothing below fails. References are added before any is dropped, so a block shared
        // by the old and the new mapping never passes through zero.
        for &c in &dchunks {
            let base = c * CHUNK_BLOCKS;
            let (lo, hi) = (d0.max(base) - base, (d0 + n).min(base + CHUNK_BLOCKS) - base);
            let ch = self.active.chunks.get_mut(&(dmap, c)).expect("chunk loaded");
            ch.slots[lo as usize..hi as usize].fill(Slot::default());
        }
        for &(b, s) in &gain {
            let c = b / CHUNK_BLOCKS;
            self.active.chunks.get_mut(&(dmap, c)).expect("chunk loaded").slots[(b - c * CHUNK_BLOCKS) as usize] = s;
            self.add_ref(s);
        }
        for s in lose {
            self.drop_ref(s);
        }
        Ok(())
    }

    /// Releases up to [`REAP_CHUNKS_STEP`] chunks of the first deleted volume's map; when none
    /// are left, forgets the map. Damaged entries are skipped (their space leaks, logged).
    fn reap_step(&mut self) {
        let Some(&map) = self.graves.first() else { return };
        let chunks = match self.live_chunks(map, REAP_CHUNKS_STEP) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(map, error = %e, "cannot list a deleted volume's map; leaking it");
                Vec::new()
            }
        };
        if chunks.is_empty() {
            self.graves.remove(&map);
            self.active.graves.insert(map, false);
        }
        for c in chunks {
            let old: Vec<Slot> = match self.chunk_mut(VolumeId(0), map, c) {
                Ok(ch) => {
                    let old = ch.slots.iter().copied().filter(Slot::is_mapped).collect();
                    ch.slots.fill(Slot::default());
                    old
                }
                Err(e) => {
                    tracing::error!(map, chunk = c, error = %e, "damaged chunk of a deleted volume; leaking it");
                    self.active.chunks.insert((map, c), Box::default());
                    Vec::new()
                }
            };
            for s in old {
                match self.check_refs(&[], &[s]) {
                    Ok(()) => self.drop_ref(s),
                    Err(e) => tracing::error!(map, chunk = c, error = %e, "bad reference in a deleted volume"),
                }
            }
        }
        self.bump();
    }

    /// Up to `limit` chunks of `map` that are not empty in the newest layer that has them
    /// (entries emptied in an overlay but still in sled are skipped). A damaged entry counts as
    /// not empty.
    fn live_chunks(&self, map: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut out = BTreeSet::new();
        let layers = std::iter::once(&self.active).chain(self.flushing.iter().map(|g| &**g));
        for g in layers {
            for (&(_, c), _) in g.chunks.range((map, 0)..=(map, u64::MAX)) {
                if out.len() < limit
                    && !self.chunk(VolumeId(0), map, c).map(|ch| ch.is_none_or(|ch| ch.is_empty())).unwrap_or(false)
                {
                    out.insert(c);
                }
            }
        }
        for k in self.db.range(chunk_key(map, 0)..=chunk_key(map, u64::MAX)).keys() {
            if out.len() >= limit {
                break;
            }
            let c = chunk_of_key(&k.map_err(sled_err)?).map_err(|e| corrupt_index(format!("map key: {}", e.0)))?;
            if !self.chunk(VolumeId(0), map, c).map(|ch| ch.is_none_or(|ch| ch.is_empty())).unwrap_or(false) {
                out.insert(c);
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// Reads blocks that are contiguous on disk into `out` and checks each against its slot.
fn read_verified(file: &File, vol: VolumeId, block0: u64, slots: &[Slot], out: &mut [u8]) -> Result<(), StoreError> {
    match file.read_exact_at(out, segment_offset(slots[0].pba())) {
        Ok(()) => {}
        // A segment shorter than the index says: the data is not there.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(StoreError::Corrupt { vol, block: block0 }),
        Err(e) => return Err(e.into()),
    }
    for (k, (s, data)) in slots.iter().zip(out.chunks(BLOCK)).enumerate() {
        if crc32c::crc32c(data) != s.crc {
            return Err(StoreError::Corrupt { vol, block: block0 + k as u64 });
        }
    }
    Ok(())
}

/// At open: counts live blocks per segment from the reference records and gives back all
/// other space (data written but never indexed durably, frees a crash interrupted). Segment
/// files with no live block are deleted. Returns the live block total.
fn reclaim_orphans(db: &sled::Db, dir: &Path, segments: &mut BTreeMap<u32, Segment>) -> Result<u64, StoreError> {
    // Reference records are keyed by physical address, so they come in segment order and
    // the dead ranges of each segment can be punched in one pass.
    struct Cursor {
        segment: u32,
        next_block: u64,
    }
    let punch = |segments: &BTreeMap<u32, Segment>, no: u32, from: u64, to: u64| {
        if let Some(seg) = segments.get(&no) {
            let to = to.min(seg.used_blocks);
            if from < to {
                if let Err(e) = segments::punch(&seg.file, from * B, (to - from) * B) {
                    tracing::warn!(segment = no, error = %e, "cannot punch a hole at open");
                }
            }
        }
    };
    let mut live_total = 0;
    let mut cur: Option<Cursor> = None;
    for kv in db.scan_prefix(layout::refs_prefix()) {
        let (k, v) = kv.map_err(sled_err)?;
        let extent = layout::key_id(&k).map_err(|e| corrupt_index(format!("reference key: {}", e.0)))?;
        let refs = decode_refs(&v).map_err(|e| corrupt_index(format!("extent {extent:#x}: {}", e.0)))?;
        let no = segment_of(extent);
        let first = block_in_segment(extent);
        match &mut cur {
            Some(c) if c.segment == no => {}
            _ => {
                if let Some(c) = cur.take() {
                    punch(segments, c.segment, c.next_block, u64::MAX);
                }
                cur = Some(Cursor { segment: no, next_block: 0 });
            }
        }
        let c = cur.as_mut().expect("cursor set above");
        punch(segments, no, c.next_block, first);
        let mut dead_from = None;
        for (i, r) in refs.iter().enumerate() {
            let b = first + i as u64;
            if *r > 0 {
                if let Some(d) = dead_from.take() {
                    punch(segments, no, d, b);
                }
                live_total += 1;
                if let Some(seg) = segments.get_mut(&no) {
                    seg.live_blocks += 1;
                }
            } else if dead_from.is_none() {
                dead_from = Some(b);
            }
        }
        let end = first + refs.len() as u64;
        if let Some(d) = dead_from {
            punch(segments, no, d, end);
        }
        c.next_block = c.next_block.max(end);
        if !segments.contains_key(&no) {
            tracing::error!(segment = no, extent, "the index references a missing segment file");
        }
    }
    if let Some(c) = cur.take() {
        punch(segments, c.segment, c.next_block, u64::MAX);
    }
    let dead: Vec<u32> = segments.iter().filter(|(_, s)| s.live_blocks == 0).map(|(no, _)| *no).collect();
    for no in dead {
        segments.remove(&no);
        if let Err(e) = segments::remove(dir, no) {
            tracing::warn!(segment = no, error = %e, "cannot remove an unused segment");
        }
    }
    Ok(live_total)
}

/// Marks the store failed and wakes everyone.
fn fail(core: &Core, e: &io::Error) {
    tracing::error!(error = %e, "flush failed; the store refuses changes until reopened");
    let msg = e.to_string();
    lock(&core.st).failed = Some(msg.clone());
    core.budget_freed();
    core.commit_cv.notify_all();
    core.durable_tx.send_modify(|d| {
        d.failed.get_or_insert(msg);
    });
}

/// The sled changes of a generation, ending with the store counters and the journal position
/// of the record after it.
fn gen_ops(gen: &Gen, journal_next: u64, journal_seq: u64) -> Vec<layout::Op> {
    let mut ops: Vec<layout::Op> = Vec::with_capacity(gen.chunks.len() + gen.refs.len() + 8);
    for (vol, rec) in &gen.volumes {
        ops.push((volume_key(*vol).to_vec(), rec.map(|r| r.encode().to_vec())));
    }
    for (map, add) in &gen.graves {
        ops.push((grave_key(*map).to_vec(), add.then(Vec::new)));
    }
    for ((map, c), ch) in &gen.chunks {
        ops.push((chunk_key(*map, *c).to_vec(), (!ch.is_empty()).then(|| ch.encode())));
    }
    for (extent, refs) in &gen.refs {
        ops.push((refs_key(*extent).to_vec(), refs.iter().any(|r| *r > 0).then(|| encode_refs(refs))));
    }
    let counters = [
        (layout::STATE_LSN, gen.lsn),
        (layout::STATE_NEXT_MAP, gen.next_map),
        (layout::STATE_NEXT_SEGMENT, u64::from(gen.next_segment)),
        (layout::STATE_JOURNAL_NEXT, journal_next),
        (layout::STATE_JOURNAL_SEQ, journal_seq),
    ];
    for (k, v) in counters {
        ops.push((k.to_vec(), Some(layout::encode_u64(v).to_vec())));
    }
    ops
}

/// Applies `ops` in order as one atomic sled batch (a later op on a key replaces an earlier one).
fn apply_ops<'a>(db: &sled::Db, ops: impl IntoIterator<Item = &'a layout::Op>) -> sled::Result<()> {
    let mut batch = sled::Batch::default();
    for (k, v) in ops {
        match v {
            Some(v) => batch.insert(&k[..], &v[..]),
            None => batch.remove(&k[..]),
        }
    }
    db.apply_batch(batch)
}

/// Group commit, on a thread of its own: waits until a flush is due, freezes the active
/// generation, writes its journal record (the index changes, and the new blocks' checksums)
/// into the open segment, makes the segments durable with one `fdatasync` each — usually one
/// file — and publishes the new durable position. The generation then goes to the
/// [`checkpointer`]. Ends when the store is dropped or a flush fails.
fn committer(core: Arc<Core>, to_apply: std::sync::mpsc::SyncSender<Committed>) {
    let mut last_flush = Instant::now();
    loop {
        let gen = {
            let mut st = lock(&core.st);
            loop {
                if st.shutdown || st.failed.is_some() {
                    return;
                }
                if !st.graves.is_empty() {
                    // One step of releasing deleted volumes per generation.
                    st.reap_step();
                    break;
                }
                let dirty =
                    st.lsn > st.frozen_lsn || !st.active.frees.is_empty() || !st.active.dead_segments.is_empty();
                let due = st.requested_lsn > st.frozen_lsn
                    || st.active.cost >= FLUSH_TRIGGER_BYTES
                    || last_flush.elapsed() >= FLUSH_INTERVAL;
                if dirty && due {
                    break;
                }
                let wait = if dirty { FLUSH_INTERVAL.saturating_sub(last_flush.elapsed()) } else { FLUSH_INTERVAL };
                st = core.commit_cv.wait_timeout(st, wait).unwrap_or_else(PoisonError::into_inner).0;
            }
            let mut gen = std::mem::take(&mut st.active);
            gen.lsn = st.lsn;
            gen.next_map = st.next_map;
            gen.next_segment = st.next_segment;
            st.frozen_lsn = st.lsn;
            let gen = Arc::new(gen);
            st.flushing.push_front(gen.clone());
            gen
        };
        last_flush = Instant::now();
        match commit(&core, gen) {
            Ok(c) => {
                if to_apply.send(c).is_err() {
                    return;
                }
            }
            Err(e) => {
                fail(&core, &e);
                return;
            }
        }
    }
}

/// Writes and syncs one generation's journal record; see [`committer`].
fn commit(core: &Core, gen: Arc<Gen>) -> io::Result<Committed> {
    // Reserve the next record's header first: this record names it.
    let (header_at, seq, next, header_file) = {
        let mut st = lock(&core.st);
        let next = st.reserve(1).map_err(io::Error::other)?[0].extent;
        let header_at = std::mem::replace(&mut st.journal_next, next);
        let seq = st.journal_seq;
        st.journal_seq += 1;
        let file = st.file(segment_of(header_at)).ok_or_else(|| io::Error::other("journal segment vanished"))?;
        (header_at, seq, next, file)
    };
    let ops = gen_ops(&gen, next, seq + 1);
    let mut body = layout::encode_body(&ops, &gen.new_blocks);
    let body_len = body.len() as u64;
    let body_crc = crc32c::crc32c(&body);
    body.resize(body.len().div_ceil(BLOCK) * BLOCK, 0);
    let (pieces, files, sync_dir) = {
        let mut st = lock(&core.st);
        let pieces = st.reserve(body.len() as u64 / B).map_err(io::Error::other)?;
        let mut segs: BTreeSet<u32> = gen.written.clone();
        segs.extend(pieces.iter().map(|p| segment_of(p.extent)));
        segs.remove(&segment_of(header_at));
        let mut files: Vec<Arc<File>> = segs.iter().filter_map(|no| st.file(*no)).collect();
        files.push(header_file.clone());
        (pieces, files, std::mem::take(&mut st.dir_dirty))
    };
    if pieces.len() > layout::JOURNAL_PIECES_MAX {
        return Err(io::Error::other("journal record too fragmented"));
    }
    write_pieces(&pieces, &body).map_err(io::Error::other)?;
    let header = layout::JournalHeader {
        seq,
        lsn: gen.lsn,
        next,
        body_len,
        body_crc,
        pieces: pieces.iter().map(|p| (p.extent, p.blocks as u32)).collect(),
    };
    header_file.write_all_at(&header.encode(), segment_offset(header_at))?;
    for f in &files {
        f.sync_data()?;
    }
    if sync_dir {
        segments::sync_dir(&core.segment_dir)?;
    }
    {
        let mut st = lock(&core.st);
        st.durable_lsn = gen.lsn;
        st.flushes += 1;
    }
    core.durable_tx.send_modify(|d| d.lsn = gen.lsn);
    let mut journal: Vec<(u64, u64)> = vec![(header_at, 1)];
    journal.extend(pieces.iter().map(|p| (p.extent, p.blocks)));
    Ok(Committed { gen, ops, journal })
}

/// Applies committed generations to sled in order (each leaves the index layers once sled has
/// it), and takes a checkpoint — sled flushed and its file synced — every
/// `interval` ([`CHECKPOINT_INTERVAL`] by default). After a checkpoint the journal records before it are released, and
/// so is the space the generations before it freed: only then, because until sled is durable,
/// recovery replays those records and checks their blocks.
fn checkpointer(core: Arc<Core>, from_commit: std::sync::mpsc::Receiver<Committed>, interval: Duration) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut waiting: Vec<Reclaim> = Vec::new();
    // Checkpointed blocks not punched yet, sorted; see `punch_some`.
    let mut backlog: VecDeque<u64> = VecDeque::new();
    let mut last_checkpoint = Instant::now();
    loop {
        let received = if !backlog.is_empty() {
            from_commit.recv_timeout(PUNCH_IDLE_WAIT)
        } else if waiting.is_empty() {
            from_commit.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            from_commit.recv_timeout(interval.saturating_sub(last_checkpoint.elapsed()))
        };
        match received {
            Ok(first) => {
                // Gather the generations that follow closely and apply them as one sled batch:
                // sled's cost is mostly per batch, and at queue depth 1 every write is its own
                // generation.
                let mut gathered = vec![first];
                let until = Instant::now() + APPLY_GATHER;
                while gathered.len() < APPLY_GATHER_MAX {
                    match from_commit.recv_timeout(until.saturating_duration_since(Instant::now())) {
                        Ok(c) => gathered.push(c),
                        Err(_) => break,
                    }
                }
                if let Err(e) = apply_ops(&core.db, gathered.iter().flat_map(|c| c.ops.iter())) {
                    fail(&core, &io::Error::other(e.to_string()));
                    break;
                }
                {
                    let mut st = lock(&core.st);
                    for c in &gathered {
                        let oldest = st.flushing.pop_back().expect("the applied generation is a layer");
                        assert!(Arc::ptr_eq(&oldest, &c.gen), "generations are applied in order");
                    }
                }
                core.budget_freed();
                for c in gathered {
                    waiting.push(Reclaim {
                        frees: c.gen.frees.clone(),
                        dead_segments: c.gen.dead_segments.clone(),
                        journal: c.journal,
                    });
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if !waiting.is_empty() && (last_checkpoint.elapsed() >= interval || waiting.len() >= CHECKPOINT_GENERATIONS_MAX)
        {
            let synced =
                core.db.flush().map_err(|e| io::Error::other(e.to_string())).and_then(|_| core.db_file.sync_data());
            if let Err(e) = synced {
                fail(&core, &e);
                break;
            }
            last_checkpoint = Instant::now();
            let mut frees = release_checkpointed(&core, waiting.drain(..));
            frees.extend(backlog.drain(..));
            frees.sort_unstable();
            backlog = frees.into();
        }
        punch_some(&core, &mut backlog);
    }
    core.durable_tx.send_modify(|d| {
        d.failed.get_or_insert_with(|| "the store is closed".into());
    });
}

/// Releases what checkpointed generations held: their journal records' reservations, and the
/// segment files that became unused (deleted now). Returns the blocks to punch.
fn release_checkpointed(core: &Core, items: impl Iterator<Item = Reclaim>) -> Vec<u64> {
    let mut frees = Vec::new();
    let mut dead = Vec::new();
    let mut journal = Vec::new();
    for r in items {
        frees.extend(r.frees);
        dead.extend(r.dead_segments);
        journal.extend(r.journal);
    }
    let _gate = core.gate.write().unwrap_or_else(PoisonError::into_inner);
    let removed = {
        let mut st = lock(&core.st);
        // Journal blocks held their segments alive (as reservations) until now.
        for &(pba, blocks) in &journal {
            frees.extend(pba..pba + blocks);
            let no = segment_of(pba);
            if let Some(seg) = st.segments.get_mut(&no) {
                seg.inflight -= 1;
                if seg.dead() {
                    st.active.dead_segments.push(no);
                }
            }
        }
        let mut removed = BTreeSet::new();
        for no in &dead {
            if st.segments.get(no).is_some_and(Segment::dead) {
                st.segments.remove(no);
                removed.insert(*no);
            }
        }
        removed
    };
    for no in &removed {
        if let Err(e) = segments::remove(&core.segment_dir, *no) {
            tracing::warn!(segment = no, error = %e, "cannot remove an unused segment");
        }
    }
    frees.retain(|p| !removed.contains(&segment_of(*p)));
    frees
}

/// Punches part of the backlog of freed blocks (runs of adjacent blocks in one call). Holes
/// are spread over the following commits instead of punched all at a checkpoint: each hole is
/// file-system metadata (and, with online discard, a discard) that the next journal commit
/// must carry, and a burst of thousands made commit latency spike (p99 4 KiB write latency
/// 20-25 ms against 3 ms without punching, measured with `examples/store_bench.rs`). The share
/// grows with the backlog, so it cannot grow without bound.
fn punch_some(core: &Core, backlog: &mut VecDeque<u64>) {
    if backlog.is_empty() {
        return;
    }
    let n = (backlog.len() / PUNCH_SHARE_DIVISOR).max(PUNCH_BATCH_MIN).min(backlog.len());
    let batch: Vec<u64> = backlog.drain(..n).collect();
    let _gate = core.gate.write().unwrap_or_else(PoisonError::into_inner);
    let files: HashMap<u32, Arc<File>> = {
        let st = lock(&core.st);
        batch.iter().map(|p| segment_of(*p)).filter_map(|no| st.file(no).map(|f| (no, f))).collect()
    };
    let mut i = 0;
    while i < batch.len() {
        let mut j = i + 1;
        while j < batch.len() && batch[j] == batch[j - 1] + 1 && segment_of(batch[j]) == segment_of(batch[i]) {
            j += 1;
        }
        if let Some(f) = files.get(&segment_of(batch[i])) {
            if let Err(e) = segments::punch(f, segment_offset(batch[i]), (j - i) as u64 * B) {
                tracing::warn!(error = %e, "cannot punch a hole; the space stays in use");
            }
        }
        i = j;
    }
}

/// At open: applies the journal records written after sled's last checkpoint, in order, up to
/// the first one that is missing, damaged, or whose data blocks do not match their checksums
/// (a crash during its commit: it was never reported durable, nor was anything after it).
fn replay_journal(db: &sled::Db, db_file: &File, segments: &BTreeMap<u32, Segment>) -> Result<(), StoreError> {
    let counter = |key: &[u8]| -> Result<Option<u64>, StoreError> {
        db.get(key)
            .map_err(sled_err)?
            .map(|v| layout::decode_u64(&v).map_err(|e| corrupt_index(format!("journal counter: {}", e.0))))
            .transpose()
    };
    let Some(mut at) = counter(layout::STATE_JOURNAL_NEXT)? else { return Ok(()) };
    let mut seq = counter(layout::STATE_JOURNAL_SEQ)?.unwrap_or(0);
    let read = |pba: u64, blocks: u64| -> Option<Vec<u8>> {
        let seg = segments.get(&segment_of(pba))?;
        if block_in_segment(pba) + blocks > seg.used_blocks {
            return None;
        }
        let mut buf = vec![0u8; (blocks * B) as usize];
        seg.file.read_exact_at(&mut buf, segment_offset(pba)).ok()?;
        Some(buf)
    };
    let mut replayed = 0u64;
    while let Some(header) = read(at, 1).and_then(|b| layout::JournalHeader::decode(&b).ok()) {
        if header.seq != seq || header.body_len > JOURNAL_BODY_BYTES_MAX {
            break;
        }
        let mut body = Vec::new();
        for &(pba, n) in &header.pieces {
            match read(pba, u64::from(n)) {
                Some(b) => body.extend_from_slice(&b),
                None => break,
            }
            if body.len() as u64 > JOURNAL_BODY_BYTES_MAX + B {
                break;
            }
        }
        if (body.len() as u64) < header.body_len {
            break;
        }
        body.truncate(header.body_len as usize);
        if crc32c::crc32c(&body) != header.body_crc {
            break;
        }
        let Ok((ops, new_blocks)) = layout::decode_body(&body) else { break };
        let intact = new_blocks.iter().all(|&(pba, crc)| read(pba, 1).is_some_and(|b| crc32c::crc32c(&b) == crc));
        if !intact {
            tracing::warn!(seq, "journal record with incomplete data: the crash came during its commit");
            break;
        }
        let mut ops = ops;
        ops.push((layout::STATE_JOURNAL_NEXT.to_vec(), Some(layout::encode_u64(header.next).to_vec())));
        ops.push((layout::STATE_JOURNAL_SEQ.to_vec(), Some(layout::encode_u64(seq + 1).to_vec())));
        apply_ops(db, &ops).map_err(sled_err)?;
        at = header.next;
        seq += 1;
        replayed += 1;
    }
    if replayed > 0 {
        tracing::info!(records = replayed, "replayed the journal");
        db.flush().map_err(sled_err)?;
        db_file.sync_data()?;
    }
    Ok(())
}

impl BlockStore for SledStore {
    fn create_volume(&self, vol: VolumeId, size_bytes: u64) -> Result<(), StoreError> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(B) || size_bytes > VOLUME_BYTES_MAX {
            return Err(StoreError::Invalid(format!(
                "volume size {size_bytes} must be a non-zero multiple of {B} up to {VOLUME_BYTES_MAX}"
            )));
        }
        let mut st = self.lock_for_change(None)?;
        if let Some(rec) = st.volumes.get(&vol) {
            if rec.size_bytes == size_bytes {
                return Ok(());
            }
            return Err(StoreError::VolumeExists { vol, existing_bytes: rec.size_bytes, requested_bytes: size_bytes });
        }
        let rec = VolumeRec { size_bytes, map: st.next_map };
        st.next_map += 1;
        st.volumes.insert(vol, rec);
        st.active.volumes.insert(vol, Some(rec));
        st.bump();
        Ok(())
    }

    fn delete_volume(&self, vol: VolumeId) -> Result<(), StoreError> {
        let mut st = self.lock_for_change(None)?;
        let rec = st.volumes.remove(&vol).ok_or(StoreError::UnknownVolume(vol))?;
        st.active.volumes.insert(vol, None);
        st.graves.insert(rec.map);
        st.active.graves.insert(rec.map, true);
        st.bump();
        drop(st);
        self.core().commit_cv.notify_one();
        Ok(())
    }

    fn volumes(&self) -> Vec<(VolumeId, u64)> {
        lock(&self.core().st).volumes.iter().map(|(v, r)| (*v, r.size_bytes)).collect()
    }

    fn write(&self, vol: VolumeId, offset: u64, data: &[u8]) -> Result<Lsn, StoreError> {
        self.write_with(vol, offset, data, None)
    }

    fn write_zeroes(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Lsn, StoreError> {
        self.write_zeroes_with(vol, offset, len, None)
    }

    fn admit(&self, bytes: u64) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        let core = self.handle.core.clone();
        async move {
            let mut room = core.room_tx.subscribe();
            loop {
                {
                    let mut st = lock(&core.st);
                    if let Some(f) = &st.failed {
                        return Err(StoreError::Failed(f.clone()));
                    }
                    if st.shutdown {
                        return Err(StoreError::Failed("the store is closed".into()));
                    }
                    if st.pending_cost() + st.admitted < PENDING_BYTES_MAX {
                        st.admitted += bytes;
                        let c = core.clone();
                        return Ok(Admission::new(
                            bytes,
                            Box::new(move |b| {
                                lock(&c.st).admitted -= b;
                                c.budget_freed();
                            }),
                        ));
                    }
                    core.commit_cv.notify_one();
                }
                room.changed().await.map_err(|_| StoreError::Failed("the store is closed".into()))?;
            }
        }
    }

    fn write_admitted(&self, admission: Admission, vol: VolumeId, offset: u64, data: &[u8]) -> Result<Lsn, StoreError> {
        self.write_with(vol, offset, data, Some(admission))
    }

    fn write_zeroes_admitted(
        &self,
        admission: Admission,
        vol: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<Lsn, StoreError> {
        self.write_zeroes_with(vol, offset, len, Some(admission))
    }

    fn read(&self, vol: VolumeId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let len = buf.len() as u64;
        let _gate = self.core().gate.read().unwrap_or_else(PoisonError::into_inner);
        let (b0, slots, files) = {
            let st = lock(&self.core().st);
            let rec = st.volume(vol)?;
            check_range(vol, rec.size_bytes, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            let (b0, b1) = (offset / B, (offset + len).div_ceil(B));
            let slots = st.slots(vol, rec.map, b0, b1)?;
            let mut files: HashMap<u32, Option<Arc<File>>> = HashMap::new();
            for s in slots.iter().filter(|s| s.is_mapped()) {
                let no = segment_of(s.pba());
                files.entry(no).or_insert_with(|| st.file(no));
            }
            (b0, slots, files)
        };
        let end = offset + len;
        let mut tmp = Vec::new();
        let mut i = 0;
        while i < slots.len() {
            let block = b0 + i as u64;
            let start = block * B;
            let (lo, hi) = (offset.max(start), end.min(start + B));
            let s = slots[i];
            if !s.is_mapped() {
                buf[(lo - offset) as usize..(hi - offset) as usize].fill(0);
                i += 1;
                continue;
            }
            let file = files.get(&segment_of(s.pba())).cloned().flatten().ok_or(StoreError::Corrupt { vol, block })?;
            if hi - lo < B {
                tmp.resize(BLOCK, 0);
                read_verified(&file, vol, block, &slots[i..=i], &mut tmp)?;
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&tmp[(lo - start) as usize..(hi - start) as usize]);
                i += 1;
                continue;
            }
            // A run of whole blocks that are contiguous in one segment: one read.
            let mut j = i + 1;
            while j < slots.len()
                && slots[j].is_mapped()
                && slots[j].pba() == s.pba() + (j - i) as u64
                && segment_of(slots[j].pba()) == segment_of(s.pba())
                && (b0 + j as u64 + 1) * B <= end
            {
                j += 1;
            }
            let at = (lo - offset) as usize;
            read_verified(&file, vol, block, &slots[i..j], &mut buf[at..at + (j - i) * BLOCK])?;
            i = j;
        }
        Ok(())
    }

    fn durable(&self, lsn: Lsn) -> impl Future<Output = Result<(), StoreError>> + Send {
        let core = self.handle.core.clone();
        async move {
            let mut rx = core.durable_tx.subscribe();
            let target = {
                let mut st = lock(&core.st);
                if let Some(f) = &st.failed {
                    return Err(StoreError::Failed(f.clone()));
                }
                let target = lsn.0.min(st.lsn);
                if st.durable_lsn >= target {
                    return Ok(());
                }
                if st.requested_lsn < target {
                    st.requested_lsn = target;
                    core.commit_cv.notify_one();
                }
                target
            };
            let d = rx
                .wait_for(|d| d.lsn >= target || d.failed.is_some())
                .await
                .map_err(|_| StoreError::Failed("the store is closed".into()))?
                .clone();
            match d.failed {
                Some(f) if d.lsn < target => Err(StoreError::Failed(f)),
                _ => Ok(()),
            }
        }
    }

    fn last_lsn(&self) -> Lsn {
        Lsn(lock(&self.core().st).lsn)
    }

    fn block_checksums(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Vec<u32>, StoreError> {
        check_aligned("block_checksums", offset, len)?;
        if len > CHECKSUM_RANGE_BYTES_MAX {
            return Err(StoreError::Invalid(format!(
                "checksums of {len} bytes asked, at most {CHECKSUM_RANGE_BYTES_MAX}"
            )));
        }
        let map = {
            let st = lock(&self.core().st);
            let rec = st.volume(vol)?;
            check_range(vol, rec.size_bytes, offset, len)?;
            rec.map
        };
        let zero = zero_block_crc();
        let (b0, b1) = (offset / B, (offset + len) / B);
        let mut out = Vec::with_capacity((b1 - b0) as usize);
        let mut b = b0;
        while b < b1 {
            // The lock is taken per window of chunks so that a large range does not stall writers.
            let st = lock(&self.core().st);
            if st.volume(vol)?.map != map {
                return Err(StoreError::UnknownVolume(vol));
            }
            let window_end = b1.min(b + 1024 * CHUNK_BLOCKS);
            while b < window_end {
                let c = b / CHUNK_BLOCKS;
                let (base, end) = (c * CHUNK_BLOCKS, window_end.min((c + 1) * CHUNK_BLOCKS));
                match st.chunk(vol, map, c)? {
                    Some(ch) => out.extend(ch.slots[(b - base) as usize..(end - base) as usize].iter().map(|s| {
                        if s.is_mapped() {
                            s.crc
                        } else {
                            zero
                        }
                    })),
                    None => out.resize(out.len() + (end - b) as usize, zero),
                }
                b = end;
            }
        }
        Ok(out)
    }

    fn clone_range(
        &self,
        src: VolumeId,
        src_offset: u64,
        dst: VolumeId,
        dst_offset: u64,
        len: u64,
    ) -> Result<Lsn, StoreError> {
        check_aligned("clone_range source", src_offset, len)?;
        check_aligned("clone_range target", dst_offset, len)?;
        let mut st = self.lock_for_change(None)?;
        let (srec, drec) = (st.volume(src)?, st.volume(dst)?);
        check_range(src, srec.size_bytes, src_offset, len)?;
        check_range(dst, drec.size_bytes, dst_offset, len)?;
        if src == dst && src_offset < dst_offset + len && dst_offset < src_offset + len && len > 0 {
            return Err(StoreError::Invalid(format!(
                "clone within volume {src}: ranges {src_offset}+{len} and {dst_offset}+{len} overlap"
            )));
        }
        if len == 0 {
            return Ok(Lsn(st.lsn));
        }
        let (s0, d0, n) = (src_offset / B, dst_offset / B, len / B);
        let mut done = 0;
        loop {
            let step = (n - done).min(STEP_BLOCKS);
            st.clone_step((src, srec.map), s0 + done, (dst, drec.map), d0 + done, step)?;
            let lsn = st.bump();
            done += step;
            if done == n {
                return Ok(lsn);
            }
            drop(st);
            st = self.lock_for_change(None)?;
            if st.volume(src)?.map != srec.map || st.volume(dst)?.map != drec.map {
                return Err(StoreError::Invalid("a volume was deleted during clone_range".into()));
            }
        }
    }

    fn space(&self) -> SpaceStats {
        let (mut stats, files) = {
            let st = lock(&self.core().st);
            let files: Vec<Arc<File>> = st.segments.values().map(|s| s.file.clone()).collect();
            (
                SpaceStats {
                    live_bytes: st.live_blocks * B,
                    segment_disk_bytes: 0,
                    segment_files: files.len() as u64,
                    flushes: st.flushes,
                    pending_bytes: st.pending_cost(),
                    durable_lsn: st.durable_lsn,
                    volumes_releasing: st.graves.len() as u64,
                },
                files,
            )
        };
        stats.segment_disk_bytes = files.iter().filter_map(|f| segments::disk_bytes(f).ok()).sum();
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment holding one data block and one journal record that names it, with sled
    /// pointing at the record. Returns the data block's address.
    fn journal_fixture(dir: &Path, db: &sled::Db, data: &[u8], crc: u32) -> u64 {
        let file = segments::create(dir, 1).unwrap();
        let (header_at, data_at, body_at, next) = (pba(1, 0), pba(1, 1), pba(1, 2), pba(1, 9));
        file.write_all_at(data, segment_offset(data_at)).unwrap();
        let ops: Vec<layout::Op> = vec![(b"Xtest".to_vec(), Some(vec![1]))];
        let mut body = layout::encode_body(&ops, &[(data_at, crc)]);
        let header = layout::JournalHeader {
            seq: 0,
            lsn: 1,
            next,
            body_len: body.len() as u64,
            body_crc: crc32c::crc32c(&body),
            pieces: vec![(body_at, 1)],
        };
        body.resize(BLOCK, 0);
        file.write_all_at(&body, segment_offset(body_at)).unwrap();
        file.write_all_at(&header.encode(), segment_offset(header_at)).unwrap();
        db.insert(layout::STATE_JOURNAL_NEXT, &layout::encode_u64(header_at)[..]).unwrap();
        data_at
    }

    fn open_segments(dir: &Path) -> BTreeMap<u32, Segment> {
        segments::open_all(dir)
            .unwrap()
            .into_iter()
            .map(|(no, f)| {
                let used_blocks = f.metadata().unwrap().len().div_ceil(B);
                (no, Segment { file: Arc::new(f), used_blocks, live_blocks: 0, inflight: 0, sealed: true })
            })
            .collect()
    }

    #[test]
    fn the_journal_is_replayed_only_when_its_data_is_intact() {
        for intact in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::open(dir.path().join("index")).unwrap();
            let db_file = File::open(dir.path().join("index").join("db")).unwrap();
            let data = vec![7u8; BLOCK];
            let crc = crc32c::crc32c(&data);
            journal_fixture(dir.path(), &db, if intact { &data } else { &[0u8; BLOCK] }, crc);
            replay_journal(&db, &db_file, &open_segments(dir.path())).unwrap();
            assert_eq!(db.get(b"Xtest").unwrap().is_some(), intact, "intact data: {intact}");
            let next = db.get(layout::STATE_JOURNAL_NEXT).unwrap().unwrap();
            let want = if intact { pba(1, 9) } else { pba(1, 0) };
            assert_eq!(layout::decode_u64(&next), Ok(want));
        }
    }

    #[test]
    fn a_damaged_journal_header_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("index")).unwrap();
        let db_file = File::open(dir.path().join("index").join("db")).unwrap();
        let data = vec![9u8; BLOCK];
        journal_fixture(dir.path(), &db, &data, crc32c::crc32c(&data));
        let f = std::fs::OpenOptions::new().write(true).open(segments::path(dir.path(), 1)).unwrap();
        f.write_all_at(&[0xff], 100).unwrap();
        replay_journal(&db, &db_file, &open_segments(dir.path())).unwrap();
        assert!(db.get(b"Xtest").unwrap().is_none());
    }
}
