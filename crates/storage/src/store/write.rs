//! The write path: byte-granular writes and trims. Aligned writes compute checksums and write
//! their data outside the lock, then point the index at it; unaligned writes read-modify-write
//! their partial blocks under the lock; trims unmap whole blocks in bounded steps.

use std::os::unix::fs::FileExt;

use tandem_types::VolumeId;

use super::space::Piece;
use super::{check_range, lock, SledStore, State, B, BLOCK, NEW_BLOCK_COST, REFS_COST, STEP_BLOCKS};
use crate::layout::{segment_of, segment_offset, Slot, VolumeRec, CHUNK_BLOCKS};
use crate::{Admission, Lsn, StoreError};

impl SledStore {
    /// [`BlockStore::write`](crate::BlockStore::write), with or without an admission.
    pub(super) fn write_with(
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

    /// [`BlockStore::write_zeroes`](crate::BlockStore::write_zeroes), with or without an admission.
    pub(super) fn write_zeroes_with(
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

/// Writes each piece's share of `data` to its segment.
pub(super) fn write_pieces(pieces: &[Piece], data: &[u8]) -> Result<(), StoreError> {
    let mut at = 0usize;
    for p in pieces {
        let n = (p.blocks * B) as usize;
        p.file.write_all_at(&data[at..at + n], segment_offset(p.extent))?;
        at += n;
    }
    Ok(())
}

impl State {
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
}
