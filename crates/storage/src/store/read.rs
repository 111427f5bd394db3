//! Reads: the index is looked up under the lock, the data read outside it (under the reclaim
//! gate, so nothing looked up is punched meanwhile), and every block is checked against its
//! crc32c; a mismatch is [`StoreError::Corrupt`], never wrong data.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, PoisonError};

use tandem_types::VolumeId;

use super::{check_range, lock, SledStore, State, B, BLOCK};
use crate::layout::{segment_of, segment_offset, Slot};
use crate::StoreError;

impl State {
    /// Reads and verifies one block (for read-modify-write).
    pub(super) fn read_block(&self, vol: VolumeId, map: u64, block: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let slot = self.slots(vol, map, block, block + 1)?[0];
        if !slot.is_mapped() {
            out.fill(0);
            return Ok(());
        }
        let file = self.file(segment_of(slot.pba())).ok_or(StoreError::Corrupt { vol, block })?;
        read_verified(&file, vol, block, &[slot], out)
    }
}

impl SledStore {
    /// [`BlockStore::read`](crate::BlockStore::read).
    pub(super) fn read_range(&self, vol: VolumeId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let len = buf.len() as u64;
        let _gate = self.core().gate.read().unwrap_or_else(PoisonError::into_inner);
        let (b0, slots, files) = {
            let st = lock(&self.core().st);
            let rec = st.volume(vol)?;
            check_range(vol, rec.size_bytes, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            let (b0, b1) = (offset / B, (offset + len).div_ceil(B));
            let slots = st.slots(vol, rec.map, b0, b1)?;
            let mut files: HashMap<u32, Option<Arc<File>>> = HashMap::new();
            for s in slots.iter().filter(|s| s.is_mapped()) {
                let no = segment_of(s.pba());
                files.entry(no).or_insert_with(|| st.file(no));
            }
            (b0, slots, files)
        };
        let end = offset + len;
        let mut tmp = Vec::new();
        let mut i = 0;
        while i < slots.len() {
            let block = b0 + i as u64;
            let start = block * B;
            let (lo, hi) = (offset.max(start), end.min(start + B));
            let s = slots[i];
            if !s.is_mapped() {
                buf[(lo - offset) as usize..(hi - offset) as usize].fill(0);
                i += 1;
                continue;
            }
            let file = files.get(&segment_of(s.pba())).cloned().flatten().ok_or(StoreError::Corrupt { vol, block })?;
            if hi - lo < B {
                tmp.resize(BLOCK, 0);
                read_verified(&file, vol, block, &slots[i..=i], &mut tmp)?;
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&tmp[(lo - start) as usize..(hi - start) as usize]);
                i += 1;
                continue;
            }
            // A run of whole blocks that are contiguous in one segment: one read.
            let mut j = i + 1;
            while j < slots.len()
                && slots[j].is_mapped()
                && slots[j].pba() == s.pba() + (j - i) as u64
                && segment_of(slots[j].pba()) == segment_of(s.pba())
                && (b0 + j as u64 + 1) * B <= end
            {
                j += 1;
            }
            let at = (lo - offset) as usize;
            read_verified(&file, vol, block, &slots[i..j], &mut buf[at..at + (j - i) * BLOCK])?;
            i = j;
        }
        Ok(())
    }
}

/// Reads blocks that are contiguous on disk into `out` and checks each against its slot.
fn read_verified(file: &File, vol: VolumeId, block0: u64, slots: &[Slot], out: &mut [u8]) -> Result<(), StoreError> {
    match file.read_exact_at(out, segment_offset(slots[0].pba())) {
        Ok(()) => {}
        // A segment shorter than the index says: the data is not there.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(StoreError::Corrupt { vol, block: block0 }),
        Err(e) => return Err(e.into()),
    }
    for (k, (s, data)) in slots.iter().zip(out.chunks(BLOCK)).enumerate() {
        if crc32c::crc32c(data) != s.crc {
            return Err(StoreError::Corrupt { vol, block: block0 + k as u64 });
        }
    }
    Ok(())
}
