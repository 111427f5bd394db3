//! Space: extents are reserved in the open segment file (a new one is started when it is
//! full), given back if never put in the index, and counted per segment. At open, space that no
//! durable index entry uses is given back; [`SpaceStats`] reports the accounting.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use super::{corrupt_index, lock, sled_err, Segment, SledStore, State, B, FREE_COST};
use crate::layout::{self, block_in_segment, decode_refs, pba, segment_of, EXTENT_BLOCKS_MAX};
use crate::segments;
use crate::{SpaceStats, StoreError};

/// Space reserved for one extent.
pub(super) struct Piece {
    pub(super) extent: u64,
    pub(super) blocks: u64,
    pub(super) file: Arc<File>,
}

impl State {
    pub(super) fn file(&self, segment: u32) -> Option<Arc<File>> {
        self.segments.get(&segment).map(|s| s.file.clone())
    }

    /// Hands out space for `blocks` blocks as extents of at most [`EXTENT_BLOCKS_MAX`], rolling
    /// to a new segment file when one is full. Each piece counts as in flight until
    /// [`State::release`].
    pub(super) fn reserve(&mut self, mut blocks: u64) -> Result<Vec<Piece>, StoreError> {
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
    pub(super) fn release(&mut self, pieces: &[Piece], applied: bool) {
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
}

/// At open: counts live blocks per segment from the reference records and gives back all
/// other space (data written but never indexed durably, frees a crash interrupted). Segment
/// files with no live block are deleted. Returns the live block total.
pub(super) fn reclaim_orphans(
    db: &sled::Db,
    dir: &Path,
    segments: &mut BTreeMap<u32, Segment>,
) -> Result<u64, StoreError> {
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

impl SledStore {
    /// [`BlockStore::space`](crate::BlockStore::space).
    pub(super) fn space_stats(&self) -> SpaceStats {
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
