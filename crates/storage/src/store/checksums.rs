//! Block checksums of a range from the index alone (no data is read), for resync and
//! reconciliation to find differing regions.

use tandem_types::VolumeId;

use super::{check_aligned, check_range, lock, SledStore, B, CHECKSUM_RANGE_BYTES_MAX};
use crate::layout::CHUNK_BLOCKS;
use crate::{zero_block_crc, StoreError};

impl SledStore {
    /// [`BlockStore::block_checksums`](crate::BlockStore::block_checksums).
    pub(super) fn checksums_of(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Vec<u32>, StoreError> {
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
}
