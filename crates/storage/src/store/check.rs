//! The store's consistency check of its index: every reference count equals the number of
//! block-map slots (of live volumes and of deleted volumes not yet released) that point at that
//! block. A count too low would free a block still in use; a count too high leaks it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use tandem_types::VolumeId;

use super::{corrupt_index, lock, sled_err, SledStore, State};
use crate::layout::{decode_refs, key_id, refs_key, refs_prefix};
use crate::StoreError;

/// What [`SledStore::check`] looked at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Block maps walked: the volumes' and those of deleted volumes still being released.
    pub maps: u64,
    /// Mapped slots found in them.
    pub mapped_blocks: u64,
    /// Extents with reference counts.
    pub extents: u64,
    /// Blocks with a non-zero count (shared blocks once).
    pub referenced_blocks: u64,
}

impl SledStore {
    /// Checks the index as it stands (the in-memory layers over sled): every block's reference
    /// count equals the number of slots that map it, in every volume's block map and every
    /// deleted volume's map not yet released; every mapped slot names an extent with counts.
    /// [`StoreError::CorruptIndex`] names the first block that disagrees.
    ///
    /// It walks the whole index under the store's lock, blocking every change meanwhile: for
    /// tests and offline checks (after a crash and a reopen, say), not for a serving node.
    pub fn check(&self) -> Result<CheckStats, StoreError> {
        let st = lock(&self.core().st);
        st.check()
    }
}

impl State {
    fn check(&self) -> Result<CheckStats, StoreError> {
        let mut stats = CheckStats::default();
        // (extent, block) -> slots that map it.
        let mut used: BTreeMap<(u64, u32), u64> = BTreeMap::new();
        let maps: Vec<(Option<VolumeId>, u64)> =
            self.volumes.iter().map(|(v, r)| (Some(*v), r.map)).chain(self.graves.iter().map(|m| (None, *m))).collect();
        for (vol, map) in maps {
            stats.maps += 1;
            // A deleted volume's map has no volume id; 0 only names it in a corruption error.
            let vol = vol.unwrap_or(VolumeId(0));
            for c in self.chunks_in(map, 0, u64::MAX, usize::MAX)? {
                let Some(ch) = self.chunk(vol, map, c)? else { continue };
                for s in ch.slots.iter().filter(|s| s.is_mapped()) {
                    *used.entry((s.extent, s.block)).or_default() += 1;
                    stats.mapped_blocks += 1;
                }
            }
        }
        let refs = self.all_refs()?;
        stats.extents = refs.len() as u64;
        for (&extent, counts) in &refs {
            for (block, &count) in counts.iter().enumerate() {
                let n = used.remove(&(extent, block as u32)).unwrap_or(0);
                if count > 0 {
                    stats.referenced_blocks += 1;
                }
                // A saturated count is never decremented (a leak by design, never a loss).
                if count != u32::MAX && u64::from(count) != n {
                    return Err(corrupt_index(format!(
                        "extent {extent:#x} block {block}: {count} references counted, {n} slots map it"
                    )));
                }
            }
        }
        if let Some(((extent, block), n)) = used.into_iter().next() {
            return Err(corrupt_index(format!(
                "extent {extent:#x} block {block}: {n} slots map it, and it has no reference count"
            )));
        }
        Ok(stats)
    }

    /// Every extent's reference counts, each from the newest layer that has it (an overlay's
    /// all-zero counts are a removal).
    fn all_refs(&self) -> Result<BTreeMap<u64, Cow<'_, [u32]>>, StoreError> {
        let mut extents = BTreeSet::new();
        extents.extend(self.active.refs.keys().copied());
        for g in &self.flushing {
            extents.extend(g.refs.keys().copied());
        }
        for k in self.db.scan_prefix(refs_prefix()).keys() {
            let k = k.map_err(sled_err)?;
            extents.insert(key_id(&k).map_err(|e| corrupt_index(format!("reference key: {}", e.0)))?);
        }
        let mut out = BTreeMap::new();
        for extent in extents {
            let counts: Cow<'_, [u32]> = if let Some(r) = self.active.refs.get(&extent) {
                Cow::Borrowed(r.as_slice())
            } else if let Some(r) = self.flushing.iter().find_map(|g| g.refs.get(&extent)) {
                Cow::Borrowed(r.as_slice())
            } else {
                match self.db.get(refs_key(extent)).map_err(sled_err)? {
                    Some(v) => {
                        Cow::Owned(decode_refs(&v).map_err(|e| corrupt_index(format!("extent {extent:#x}: {}", e.0)))?)
                    }
                    None => continue,
                }
            };
            if counts.iter().all(|c| *c == 0) {
                continue;
            }
            out.insert(extent, counts);
        }
        Ok(out)
    }
}
