//! The Raft log on sled, with group commit.
//!
//! Layout (trees of one `sled::Db`): `raft_log` maps an index (u64 big-endian, so byte order is
//! log order) to an encoded entry; `raft_state` holds the vote, the committed log id and the
//! last purged log id.
//!
//! Durability: `append` writes the entries into sled's in-memory log at once and hands
//! openraft's flush callback to one flusher task. The flusher takes every callback waiting,
//! makes one `flush_async` (an fsync) for all of them, then fires them in order: entries that
//! arrive while a flush runs share the next one (group commit). A callback never fires before
//! the flush that covers its entries has returned. Votes are flushed before `save_vote`
//! returns, since a vote forgotten in a crash can elect two leaders in one term.
//!
//! A "flush" here is [`DiskSync::flush`]: sled's own flush, which on Linux writes its log with
//! `sync_file_range` (that neither empties the drive's write cache nor persists file
//! metadata), followed by an `fdatasync` of sled's file, so that flushed means on stable
//! storage, also across a power loss. sled leaves its large values (blobs, in files of their
//! own) unsynced; [`DiskSync`] syncs them too.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogId, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;

use crate::raft_types::TypeConfig;
use tandem_types::NodeId;

/// Callbacks waiting for the flusher. openraft has a bounded number of appends in flight, so
/// this bound is only reached when the disk stalls; then `append` waits (backpressure).
const FLUSH_QUEUE_MAX: usize = 4096;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

fn io_err(e: impl ToString) -> io::Error {
    io::Error::other(e.to_string())
}

pub(crate) fn read_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::read(&io_err(e)).into()
}

pub(crate) fn write_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write(&io_err(e)).into()
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError<NodeId>> {
    tandem_wire::encode(v).map_err(write_err)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError<NodeId>> {
    tandem_wire::decode(bytes).map_err(read_err)
}

/// Makes everything written to a sled database durable. Cheap to clone.
///
/// sled keeps a value larger than a quarter of its segment size (128 KiB with the default
/// 512 KiB segments: snapshots, large batches of commands, large path maps) in a file of its
/// own under `blobs/`, and never syncs that file: its flush makes only the pointer in the main
/// file durable. So a flush here also syncs every blob file it has not synced at its current
/// length, and the `blobs` directory when one was new.
#[derive(Clone)]
pub struct DiskSync {
    db: sled::Db,
    file: Arc<std::fs::File>,
    blobs: Arc<std::sync::Mutex<BlobSync>>,
}

/// The blob files synced so far, with the length each was synced at.
struct BlobSync {
    dir: std::path::PathBuf,
    synced: std::collections::HashMap<std::ffi::OsString, u64>,
}

impl BlobSync {
    /// Syncs every blob file not yet synced at its current length (a blob being written while
    /// this runs is synced again once it has grown), then the directory if any was new.
    /// Returns how many files it synced. Blobs that sled removed are forgotten.
    fn sync(&mut self) -> io::Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut present = std::collections::HashSet::new();
        let mut synced = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                // Removed by sled's blob collection meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            present.insert(name.clone());
            if self.synced.get(&name) == Some(&len) {
                continue;
            }
            match std::fs::File::open(entry.path()) {
                Ok(f) => f.sync_data()?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            self.synced.insert(name, len);
            synced += 1;
        }
        self.synced.retain(|name, _| present.contains(name));
        if synced > 0 {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(synced)
    }
}

impl DiskSync {
    /// `dir` is the folder the database was opened in; sled keeps its data in `dir/db` and its
    /// large values in `dir/blobs/`.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<DiskSync, StorageError<NodeId>> {
        let file = std::fs::File::open(dir.join("db")).map_err(read_err)?;
        let blobs = BlobSync { dir: dir.join("blobs"), synced: Default::default() };
        Ok(DiskSync { db: db.clone(), file: Arc::new(file), blobs: Arc::new(std::sync::Mutex::new(blobs)) })
    }

    /// Flushes from a thread that may block.
    pub fn flush_blocking(&self) -> io::Result<()> {
        self.db.flush().map_err(io_err)?;
        self.file.sync_data()?;
        self.blobs.lock().expect("blobs lock").sync().map(|_| ())
    }

    pub async fn flush(&self) -> io::Result<()> {
        // Every step blocks on the disk; one trip to the blocking pool does them all.
        let sync = self.clone();
        tokio::task::spawn_blocking(move || sync.flush_blocking()).await.map_err(io_err)?
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Reads log entries; cheap to clone (sled trees are shared handles).
#[derive(Clone)]
pub struct LogReader {
    log: sled::Tree,
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for kv in self.log.range::<[u8; 8], _>((start, end)) {
            let (_, v) = kv.map_err(read_err)?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }
}

pub struct LogStore {
    sync: DiskSync,
    reader: LogReader,
    state: sled::Tree,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    /// The state machine's durable snapshot ([`LogStore::follow_snapshots`]).
    snapshot_floor: Option<tokio::sync::watch::Receiver<u64>>,
}

/// How long a purge waits for the state machine's snapshot to cover it (a snapshot install
/// queued just before it) before it fails, which stops Raft with nothing purged.
const PURGE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl LogStore {
    /// Opens the log in `db` (opened in `dir`); starts the flusher task on the current tokio
    /// runtime.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<LogStore, StorageError<NodeId>> {
        let log = db.open_tree("raft_log").map_err(read_err)?;
        let state = db.open_tree("raft_state").map_err(read_err)?;
        let sync = DiskSync::open(db, dir)?;
        let (tx, rx) = mpsc::channel(FLUSH_QUEUE_MAX);
        let thread_sync = sync.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(thread_sync, rx))
            .map_err(write_err)?;
        Ok(LogStore { sync, reader: LogReader { log }, state, flusher: tx, snapshot_floor: None })
    }

    /// Purges wait until the state machine's durable snapshot covers them
    /// ([`crate::state_machine::StateMachine::snapshot_floor`]): a follower's purge that
    /// openraft queues behind a snapshot install is persisted only once the install is, and
    /// never if it fails.
    pub fn follow_snapshots(&mut self, floor: tokio::sync::watch::Receiver<u64>) {
        self.snapshot_floor = Some(floor);
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        match self.state.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    async fn put_durable<T: Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError<NodeId>> {
        self.state.insert(key, encode(v)?).map_err(write_err)?;
        self.sync.flush().await.map_err(write_err)?;
        Ok(())
    }
}

/// The group-commit loop, on a thread of its own: flushing blocks on the disk, and a dedicated
/// thread saves the hops through the async runtime's blocking pool on every commit. It ends
/// when the log store (the sender) is dropped.
fn flusher(sync: DiskSync, mut rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while let Ok(cb) = rx.try_recv() {
            batch.push(cb);
        }
        let result = sync.flush_blocking();
        for cb in batch.drain(..) {
            cb.log_io_completed(result.as_ref().map(|_| ()).map_err(io_err));
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        self.reader.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.get(KEY_PURGED)?;
        let last = match self.reader.log.last().map_err(read_err)? {
            Some((_, v)) => Some(*decode::<Entry<TypeConfig>>(&v)?.get_log_id()),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_durable(KEY_VOTE, vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Not flushed: a committed index that is lost in a crash is learned again from the
        // leader; it only lets a restarted node re-apply sooner. A node restored as leader learns
        // it from nobody, so its read index never goes below its restored log
        // (`MetaStore::local_read_index`).
        self.state.insert(KEY_COMMITTED, encode(&committed)?).map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&index_key(entry.get_log_id().index), encode(&entry)?);
        }
        self.reader.log.apply_batch(batch).map_err(write_err)?;
        self.flusher.send(callback).await.map_err(|_| write_err("log flusher stopped"))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = sled::Batch::default();
        for kv in self.reader.log.range(index_key(log_id.index)..) {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        self.reader.log.apply_batch(batch).map_err(write_err)?;
        self.sync.flush().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        if let Some(floor) = &mut self.snapshot_floor {
            let covered = tokio::time::timeout(PURGE_WAIT_MAX, floor.wait_for(|f| *f >= log_id.index))
                .await
                .is_ok_and(|r| r.is_ok());
            if !covered {
                let have = *floor.borrow();
                return Err(write_err(format!(
                    "purge up to {} asked while the durable snapshot covers only up to {have} \
                     (a snapshot install that failed?): nothing purged",
                    log_id.index
                )));
            }
        }
        // Record the purge point first: a crash in between leaves entries that are merely
        // unreachable, never a gap that openraft would read as missing log.
        self.put_durable(KEY_PURGED, &log_id).await?;
        let mut batch = sled::Batch::default();
        for kv in self.reader.log.range(..=index_key(log_id.index)) {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        self.reader.log.apply_batch(batch).map_err(write_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A purge waits for the state machine's durable snapshot to cover it; if that never comes
    /// (a failed install), it fails and purges nothing (chaos `fail-snapshot-install`: a purge
    /// persisted past a failed install left a state openraft refused at the next start).
    #[tokio::test]
    async fn a_purge_waits_for_the_snapshot_that_covers_it_and_fails_without_one() {
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let mut log = LogStore::open(&db, dir.path()).expect("log");
        let (floor, rx) = tokio::sync::watch::channel(10u64);
        log.follow_snapshots(rx);
        let at = |i| LogId::new(openraft::CommittedLeaderId::new(1, NodeId(1)), i);
        log.purge(at(10)).await.expect("covered: purged at once");
        assert_eq!(log.get_log_state().await.expect("state").last_purged_log_id, Some(at(10)));

        let waiting = tokio::spawn(async move {
            let r = log.purge(at(20)).await;
            (log, r)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the purge waits for the snapshot");
        floor.send_replace(20);
        let (mut log, purged) = waiting.await.expect("task");
        purged.expect("purged once the snapshot covers it");
        assert_eq!(log.get_log_state().await.expect("state").last_purged_log_id, Some(at(20)));

        drop(floor);
        log.purge(at(30)).await.expect_err("no snapshot will cover it");
        assert_eq!(log.get_log_state().await.expect("state").last_purged_log_id, Some(at(20)), "nothing purged");
    }

    /// A value too large for sled's log goes to a blob file, which sled never syncs; a flush
    /// syncs it once (and again only if it grows), and forgets it once sled removed it.
    #[test]
    fn a_flush_syncs_the_blob_files_sled_leaves_unsynced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let sync = DiskSync::open(&db, dir.path()).expect("disk sync");
        let tree = db.open_tree("t").expect("tree");
        tree.insert(b"small", vec![1u8; 100]).expect("insert");
        sync.flush_blocking().expect("flush");
        assert!(sync.blobs.lock().expect("lock").synced.is_empty(), "a small value makes no blob");

        tree.insert(b"big", vec![2u8; 1 << 20]).expect("insert");
        sync.flush_blocking().expect("flush");
        let blobs: Vec<u64> = sync.blobs.lock().expect("lock").synced.values().copied().collect();
        assert_eq!(blobs.len(), 1, "the 1 MiB value's blob was synced");
        assert!(blobs[0] > 1 << 20, "synced at its full length: {blobs:?}");
        assert_eq!(sync.blobs.lock().expect("lock").sync().expect("sync"), 0, "nothing new to sync");

        tree.insert(b"big2", vec![3u8; 1 << 20]).expect("insert");
        db.flush().expect("sled flush");
        assert_eq!(sync.blobs.lock().expect("lock").sync().expect("sync"), 1, "only the new blob");

        // A blob file sled no longer has is forgotten.
        let first = std::fs::read_dir(dir.path().join("blobs")).expect("blobs").next().expect("a blob").expect("entry");
        std::fs::remove_file(first.path()).expect("remove");
        sync.blobs.lock().expect("lock").sync().expect("sync");
        assert_eq!(sync.blobs.lock().expect("lock").synced.len(), 1);
    }
}
