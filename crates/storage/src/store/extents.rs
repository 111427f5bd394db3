//! Which blocks of a range hold data, from the index alone: the allocation map that NBD's
//! `base:allocation` block status and SCSI's GET LBA STATUS report (thin provisioning a host
//! can see).

use tandem_types::VolumeId;

use super::{check_range, lock, SledStore, B};
use crate::layout::CHUNK_BLOCKS;
use crate::{Extent, StoreError};

/// Chunks looked at under one hold of the store's lock: a long range does not stall writers.
const WINDOW_CHUNKS: u64 = 1024;

impl SledStore {
    /// [`BlockStore::extents`](crate::BlockStore::extents).
    pub(super) fn extents_of(
        &self,
        vol: VolumeId,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>, StoreError> {
        let map = {
            let st = lock(&self.core().st);
            let rec = st.volume(vol)?;
            check_range(vol, rec.size_bytes, offset, len)?;
            rec.map
        };
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, len: u64, allocated: bool| match out.last_mut() {
            Some(last) if last.allocated == allocated => last.len += len,
            _ => out.push(Extent { len, allocated }),
        };
        let mut at = offset;
        while at < end && out.len() <= max {
            let st = lock(&self.core().st);
            if st.volume(vol)?.map != map {
                return Err(StoreError::UnknownVolume(vol));
            }
            let c0 = at / B / CHUNK_BLOCKS;
            let c1 = (c0 + WINDOW_CHUNKS).min(end.div_ceil(B).div_ceil(CHUNK_BLOCKS));
            // Chunks absent from the index hold no block: skipped whole.
            for c in st.chunks_in(map, c0, c1, usize::MAX)? {
                let base = c * CHUNK_BLOCKS * B;
                if base > at {
                    push(&mut out, base.min(end) - at, false);
                    at = base.min(end);
                }
                let Some(ch) = st.chunk(vol, map, c)? else { continue };
                while at < end && at < base + CHUNK_BLOCKS * B {
                    let slot = ch.slots[((at - base) / B) as usize];
                    // A partial first block counts whole: it holds data or it does not.
                    let block_end = ((at / B) + 1) * B;
                    push(&mut out, block_end.min(end) - at, slot.is_mapped());
                    at = block_end.min(end);
                }
            }
            let window_end = (c1 * CHUNK_BLOCKS * B).min(end);
            if window_end > at {
                push(&mut out, window_end - at, false);
                at = window_end;
            }
        }
        // At most `max` extents: the last one may have been merged past it, or be one too many.
        out.truncate(max.max(1));
        Ok(out)
    }
}
