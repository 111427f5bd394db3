//! Group commit: the commit thread freezes the active generation, writes its journal record
//! into the open segment, makes data and record durable with one `fdatasync` per file, and
//! publishes the durable position that [`BlockStore::durable`](crate::BlockStore::durable)
//! waits for. A failed flush fails the store.

use std::collections::BTreeSet;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::write::write_pieces;
use super::{lock, Core, Gen, SledStore, B, BLOCK};
use crate::layout::{self, chunk_key, encode_refs, grave_key, refs_key, segment_of, segment_offset, volume_key};
use crate::segments;
use crate::{Lsn, StoreError};

/// The commit thread commits on its own once this much is pending, so that writers rarely wait.
const FLUSH_TRIGGER_BYTES: u64 = 16 << 20;

/// Changes nobody waits for are made durable (and freed space reclaimed) at least this often.
const FLUSH_INTERVAL: Duration = Duration::from_millis(1000);

/// A generation whose journal record is durable, on its way to sled.
pub(super) struct Committed {
    pub(super) gen: Arc<Gen>,
    pub(super) ops: Vec<layout::Op>,
    pub(super) journal: Vec<(u64, u64)>,
}

/// Marks the store failed and wakes everyone.
pub(super) fn fail(core: &Core, e: &io::Error) {
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

/// Group commit, on a thread of its own: waits until a flush is due, freezes the active
/// generation, writes its journal record (the index changes, and the new blocks' checksums)
/// into the open segment, makes the segments durable with one `fdatasync` each — usually one
/// file — and publishes the new durable position. The generation then goes to the
/// [`checkpointer`](super::checkpoint::checkpointer). Ends when the store is dropped or a flush
/// fails.
pub(super) fn committer(core: Arc<Core>, to_apply: std::sync::mpsc::SyncSender<Committed>) {
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
    #[cfg(feature = "failpoints")]
    failpoint(crate::failpoints::JOURNAL_BEFORE_FSYNC)?;
    for f in &files {
        f.sync_data()?;
    }
    if sync_dir {
        segments::sync_dir(&core.segment_dir)?;
    }
    #[cfg(feature = "failpoints")]
    failpoint(crate::failpoints::JOURNAL_AFTER_FSYNC)?;
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

/// A failpoint of the flush: its `return` action is the flush's I/O error.
#[cfg(feature = "failpoints")]
fn failpoint(name: &str) -> io::Result<()> {
    match crate::failpoints::eval(name) {
        Some(arg) => Err(io::Error::other(format!("failpoint {name}: {arg}"))),
        None => Ok(()),
    }
}

impl SledStore {
    /// [`BlockStore::durable`](crate::BlockStore::durable).
    pub(super) fn wait_durable(&self, lsn: Lsn) -> impl Future<Output = Result<(), StoreError>> + Send {
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
}
