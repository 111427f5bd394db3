//! Checkpoints: the checkpoint thread applies committed generations to sled in order, makes
//! sled durable every [`CHECKPOINT_INTERVAL`](super::CHECKPOINT_INTERVAL), and only then
//! releases what the generations before it freed: their journal records, unused segment files,
//! and freed blocks, which are punched out a share at a time.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::commit::{fail, Committed};
use super::{lock, Core, Segment, B};
use crate::layout::{self, segment_of, segment_offset};
use crate::segments;

/// The checkpointer applies the committed generations that arrive within this long of each
/// other as one sled batch, at most [`APPLY_GATHER_MAX`] of them (well below
/// [`APPLY_QUEUE_MAX`](super::APPLY_QUEUE_MAX), so the committer never waits for the
/// gathering).
pub(super) const APPLY_GATHER: Duration = Duration::from_millis(5);
const APPLY_GATHER_MAX: usize = 16;

/// Freed blocks are punched a share at a time (see `punch_some`): at least this many per step,
/// or 1/[`PUNCH_SHARE_DIVISOR`] of the backlog, after each applied generation or
/// [`PUNCH_IDLE_WAIT`] of quiet.
const PUNCH_BATCH_MIN: usize = 32;
const PUNCH_SHARE_DIVISOR: usize = 64;
const PUNCH_IDLE_WAIT: Duration = Duration::from_millis(2);

/// A checkpoint is also taken once this many generations wait for one.
const CHECKPOINT_GENERATIONS_MAX: usize = 512;

/// Reclaim a checkpoint releases: a generation's freed blocks and dead segments, and the blocks
/// of its journal record.
#[derive(Default)]
struct Reclaim {
    frees: Vec<u64>,
    dead_segments: Vec<u32>,
    journal: Vec<(u64, u64)>,
}

/// Applies `ops` in order as one atomic sled batch (a later op on a key replaces an earlier one).
pub(super) fn apply_ops<'a>(db: &sled::Db, ops: impl IntoIterator<Item = &'a layout::Op>) -> sled::Result<()> {
    let mut batch = sled::Batch::default();
    for (k, v) in ops {
        match v {
            Some(v) => batch.insert(&k[..], &v[..]),
            None => batch.remove(&k[..]),
        }
    }
    db.apply_batch(batch)
}

/// Applies committed generations to sled in order (each leaves the index layers once sled has
/// it), and takes a checkpoint — sled flushed and its file synced — every `interval`
/// ([`CHECKPOINT_INTERVAL`](super::CHECKPOINT_INTERVAL) by default). After a checkpoint the
/// journal records before it are released, and so is the space the generations before it
/// freed: only then, because until sled is durable, recovery replays those records and checks
/// their blocks.
pub(super) fn checkpointer(core: Arc<Core>, from_commit: std::sync::mpsc::Receiver<Committed>, interval: Duration) {
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
