//! Opening a store: sled and the segment files are opened, the journal records written after
//! sled's last checkpoint are replayed (recovery), space that no durable index entry uses is
//! given back, and the commit and checkpoint threads are started.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tandem_types::VolumeId;
use tokio::sync::watch;

use super::checkpoint::{apply_ops, checkpointer};
use super::commit::committer;
use super::space::reclaim_orphans;
use super::{
    corrupt_index, sled_err, Core, Durable, Gen, Handle, Segment, SledStore, State, StoreOptions, APPLY_QUEUE_MAX, B,
    SEGMENT_BLOCKS_MAX,
};
use crate::layout::{self, block_in_segment, segment_of, segment_offset, VolumeRec};
use crate::segments;
use crate::StoreError;

/// sled's page cache. The index of a fully written 1 TiB volume is about 1.3 GiB; the hot part
/// is what matters.
const INDEX_CACHE_BYTES: u64 = 128 << 20;

/// A journal body larger than this is not trusted at recovery (a generation is bounded by
/// [`PENDING_BYTES_MAX`](super::PENDING_BYTES_MAX); its index changes are a fraction of that).
const JOURNAL_BODY_BYTES_MAX: u64 = 256 << 20;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::pba;
    use crate::store::BLOCK;

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
