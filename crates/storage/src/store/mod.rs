//! [`SledStore`]: block data in append-only segment files, the index in sled, group commit
//! through a journal in the segment files.
//!
//! This file holds the store's types (`SledStore`, its shared `Core`, the in-memory `State` and
//! its generations, [`StoreOptions`]), the limits shared by several files, and the design of
//! the whole (below). The work is done in:
//! - `open.rs`: opening, and recovery by journal replay;
//! - `budget.rs`: the budget of pending changes (writers wait, async callers are admitted);
//! - `write.rs`: the write path (writes and trims, aligned and read-modify-write);
//! - `index.rs`: the layered block index: lookups, loading into the overlay, reference counts;
//! - `space.rs`: space: reserving extents in segment files, releasing them, accounting;
//! - `commit.rs`: group commit (the journal record and its sync) and waiting for durability;
//! - `checkpoint.rs`: applying committed generations to sled, checkpoints, hole punching;
//! - `volumes.rs`: creating and deleting volumes, releasing deleted volumes' maps;
//! - `read.rs`: verified reads; `checksums.rs`: block checksums from the index;
//! - `clone.rs`: copies by reference;
//! - `check.rs`: the consistency check of the reference counts against the block maps;
//! - `block_store.rs`: the [`BlockStore`](crate::BlockStore) impl, routing to the above.
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
//!    [`APPLY_GATHER`](checkpoint::APPLY_GATHER) of each other as one atomic batch; they then
//!    leave the layers.
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

mod block_store;
mod budget;
mod check;
mod checkpoint;
mod checksums;
mod clone;
mod commit;
mod extents;
mod index;
mod open;
mod read;
mod space;
mod volumes;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tandem_types::{VolumeId, BLOCK_BYTES};
use tokio::sync::watch;

use crate::layout::{Chunk, VolumeRec, CHUNK_BLOCKS, EXTENT_BLOCKS_MAX, SEGMENT_BLOCKS_MAX};
use crate::{Lsn, StoreError};

pub use check::CheckStats;

/// Changes not yet durable, in bytes: data written plus the in-memory index overlay. It bounds
/// the overlay's memory and the dirty data one `fdatasync` must write; writers wait when it is
/// reached. 64 MiB is a few hundred milliseconds of a fast disk.
pub const PENDING_BYTES_MAX: u64 = 64 << 20;

/// Trims of large ranges are applied in steps of this many blocks (1 GiB): one step's index
/// overlay stays within a few MiB.
const STEP_BLOCKS: u64 = 1 << 18;

/// Clones are applied in steps of this many blocks (16 MiB, 128 chunks). A clone step copies
/// every chunk map and loads every extent's counts of its range under the store's mutex; a
/// 1 GiB step of a written range held it for seconds on a loaded machine, stalling everything
/// else that takes it (reads, writes, and the node's health check, whose stalled lease renewal
/// made volumes fail over in the middle of `bench copy`). 16 MiB steps hold it for tens of
/// milliseconds at most.
const CLONE_STEP_BLOCKS: u64 = 1 << 12;

/// The largest range [`BlockStore::block_checksums`](crate::BlockStore::block_checksums) answers
/// in one call: 4 GiB, i.e. 4 MiB of checksums, below the network frame limit.
pub const CHECKSUM_RANGE_BYTES_MAX: u64 = 4 << 30;

/// What overlay entries count against [`PENDING_BYTES_MAX`] (their memory, roughly).
const CHUNK_COST: u64 = CHUNK_BLOCKS * 16 + 64;
const REFS_COST: u64 = 4 * EXTENT_BLOCKS_MAX + 64;
const FREE_COST: u64 = 8;
const NEW_BLOCK_COST: u64 = 12;

/// Committed generations waiting to be applied to sled. Each is also an index layer that reads
/// consult, so the bound keeps lookups short; full means the committer waits.
const APPLY_QUEUE_MAX: usize = 32;

/// sled is made durable (a checkpoint: journal records before it are no longer needed, and
/// space freed before it can be reclaimed) at least this often while changes arrive. It bounds
/// the journal replayed at open.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

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
/// threads *without* flushing: changes not yet [`durable`](crate::BlockStore::durable) are lost, as
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
    /// The same wake-up for async admissions ([`BlockStore::admit`](crate::BlockStore::admit)):
    /// bumped with every `budget_cv` notification.
    room_tx: watch::Sender<u64>,
    /// The commit thread waiting for work.
    commit_cv: Condvar,
    /// Reads hold it shared from index lookup to the end of their data reads; hole punching
    /// holds it exclusively.
    gate: RwLock<()>,
    durable_tx: watch::Sender<Durable>,
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
    /// Room reserved by admissions ([`BlockStore::admit`](crate::BlockStore::admit)) not used yet.
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
    fn core(&self) -> &Core {
        &self.handle.core
    }
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
    fn bump(&mut self) -> Lsn {
        self.lsn += 1;
        Lsn(self.lsn)
    }

    fn volume(&self, vol: VolumeId) -> Result<VolumeRec, StoreError> {
        self.volumes.get(&vol).copied().ok_or(StoreError::UnknownVolume(vol))
    }
}
