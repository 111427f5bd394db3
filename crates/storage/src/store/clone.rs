//! Copies by reference: a destination range comes to share the source's extents, in steps of
//! [`CLONE_STEP_BLOCKS`], each adding the new references before dropping the old ones.

use std::collections::BTreeSet;

use tandem_types::VolumeId;

use super::{check_aligned, check_range, SledStore, State, B, CLONE_STEP_BLOCKS};
use crate::layout::{Slot, CHUNK_BLOCKS};
use crate::{Lsn, StoreError};

impl SledStore {
    /// [`BlockStore::clone_range`](crate::BlockStore::clone_range).
    pub(super) fn clone_blocks(
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
            let step = (n - done).min(CLONE_STEP_BLOCKS);
            st.clone_step((src, srec.map), s0 + done, (dst, drec.map), d0 + done, step)?;
            let lsn = st.bump();
            done += step;
            if done == n {
                return Ok(lsn);
            }
            drop(st);
            #[cfg(feature = "failpoints")]
            if let Some(arg) = crate::failpoints::eval(crate::failpoints::CLONE_BETWEEN_STEPS) {
                let name = crate::failpoints::CLONE_BETWEEN_STEPS;
                return Err(StoreError::Io(std::io::Error::other(format!("failpoint {name}: {arg}"))));
            }
            st = self.lock_for_change(None)?;
            if st.volume(src)?.map != srec.map || st.volume(dst)?.map != drec.map {
                return Err(StoreError::Invalid("a volume was deleted during clone_range".into()));
            }
        }
    }
}

impl State {
    /// Makes dst blocks `[d0, d0 + n)` share src blocks `[s0, s0 + n)` (n at most
    /// [`CLONE_STEP_BLOCKS`]; the ranges do not overlap).
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
}
