//! The block index as the store sees it: the active generation over the committed ones over
//! sled (see the layers in `mod.rs`). Lookups of chunks and slots, loading entries into the
//! active generation for a change, and the per-block reference counts of extents.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use tandem_types::VolumeId;

use super::{corrupt_index, sled_err, State, CHUNK_COST, FREE_COST, REFS_COST};
use crate::layout::{chunk_key, chunk_of_key, decode_refs, refs_key, segment_of, Chunk, Slot, CHUNK_BLOCKS};
use crate::StoreError;

impl State {
    /// A chunk as of now, read-only; `None` if it has no entry.
    pub(super) fn chunk(&self, vol: VolumeId, map: u64, c: u64) -> Result<Option<Cow<'_, Chunk>>, StoreError> {
        if let Some(ch) = self.active.chunks.get(&(map, c)) {
            return Ok(Some(Cow::Borrowed(&**ch)));
        }
        if let Some(ch) = self.flushing.iter().find_map(|g| g.chunks.get(&(map, c))) {
            return Ok(Some(Cow::Borrowed(&**ch)));
        }
        match self.db.get(chunk_key(map, c)).map_err(sled_err)? {
            None => Ok(None),
            Some(v) => Chunk::decode(&v)
                .map(|ch| Some(Cow::Owned(ch)))
                .map_err(|_| StoreError::Corrupt { vol, block: c * CHUNK_BLOCKS }),
        }
    }

    /// The chunk in the active generation, loaded there if needed.
    pub(super) fn chunk_mut(&mut self, vol: VolumeId, map: u64, c: u64) -> Result<&mut Chunk, StoreError> {
        if !self.active.chunks.contains_key(&(map, c)) {
            let base = match self.chunk(vol, map, c)? {
                Some(ch) => Box::new(ch.into_owned()),
                None => Box::default(),
            };
            self.active.chunks.insert((map, c), base);
            self.active.cost += CHUNK_COST;
        }
        Ok(self.active.chunks.get_mut(&(map, c)).expect("chunk loaded above"))
    }

    /// An extent's reference counts in the active generation, loaded there if needed.
    fn refs_mut(&mut self, extent: u64) -> Result<&mut Vec<u32>, StoreError> {
        if !self.active.refs.contains_key(&extent) {
            let base = if let Some(r) = self.flushing.iter().find_map(|g| g.refs.get(&extent)) {
                r.clone()
            } else {
                let v = self
                    .db
                    .get(refs_key(extent))
                    .map_err(sled_err)?
                    .ok_or_else(|| corrupt_index(format!("extent {extent:#x} has no reference counts")))?;
                decode_refs(&v).map_err(|e| corrupt_index(format!("extent {extent:#x}: {}", e.0)))?
            };
            self.active.refs.insert(extent, base);
            self.active.cost += REFS_COST;
        }
        Ok(self.active.refs.get_mut(&extent).expect("refs loaded above"))
    }

    /// Chunk numbers in `[c0, c1)` that may have entries (some may be empty). Overlay keys are
    /// all taken; at most `sled_limit` come from sled.
    pub(super) fn chunks_in(&self, map: u64, c0: u64, c1: u64, sled_limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut set = BTreeSet::new();
        set.extend(self.active.chunks.range((map, c0)..(map, c1)).map(|(k, _)| k.1));
        for g in &self.flushing {
            set.extend(g.chunks.range((map, c0)..(map, c1)).map(|(k, _)| k.1));
        }
        for k in self.db.range(chunk_key(map, c0)..chunk_key(map, c1)).keys().take(sled_limit) {
            let k = k.map_err(sled_err)?;
            set.insert(chunk_of_key(&k).map_err(|e| corrupt_index(format!("map key: {}", e.0)))?);
        }
        Ok(set.into_iter().collect())
    }

    /// The slots of blocks `[b0, b1)`.
    pub(super) fn slots(&self, vol: VolumeId, map: u64, b0: u64, b1: u64) -> Result<Vec<Slot>, StoreError> {
        let mut out = Vec::with_capacity((b1 - b0) as usize);
        let mut b = b0;
        while b < b1 {
            let c = b / CHUNK_BLOCKS;
            let end = b1.min((c + 1) * CHUNK_BLOCKS);
            let base = c * CHUNK_BLOCKS;
            match self.chunk(vol, map, c)? {
                Some(ch) => out.extend_from_slice(&ch.slots[(b - base) as usize..(end - base) as usize]),
                None => out.resize(out.len() + (end - b) as usize, Slot::default()),
            }
            b = end;
        }
        Ok(out)
    }

    /// Loads the reference counts a change needs and checks that it is possible: every slot in
    /// `gain` and `lose` is one reference that exists now (`gain` slots are about to be shared,
    /// `lose` slots dropped). Nothing is changed but loading.
    pub(super) fn check_refs(&mut self, gain: &[Slot], lose: &[Slot]) -> Result<(), StoreError> {
        let mut need: HashMap<(u64, u32), u64> = HashMap::new();
        for s in gain.iter().chain(lose).filter(|s| s.is_mapped()) {
            *need.entry((s.extent, s.block)).or_default() += 1;
        }
        for ((extent, block), n) in need {
            let refs = self.refs_mut(extent)?;
            let r = refs
                .get(block as usize)
                .copied()
                .ok_or_else(|| corrupt_index(format!("extent {extent:#x} has no block {block}")))?;
            if r != u32::MAX && u64::from(r) < n {
                return Err(corrupt_index(format!("extent {extent:#x} block {block}: {r} references, {n} in use")));
            }
        }
        Ok(())
    }

    /// One more reference (checked by [`State::check_refs`]). Counts saturate: a block at
    /// `u32::MAX` is never freed.
    pub(super) fn add_ref(&mut self, s: Slot) {
        let r = &mut self.active.refs.get_mut(&s.extent).expect("checked refs")[s.block as usize];
        *r = r.saturating_add(1);
    }

    /// One reference fewer (checked by [`State::check_refs`]); the last one frees the block once
    /// this generation is durable.
    pub(super) fn drop_ref(&mut self, s: Slot) {
        let r = &mut self.active.refs.get_mut(&s.extent).expect("checked refs")[s.block as usize];
        if *r == u32::MAX {
            return;
        }
        assert!(*r > 0, "reference count underflow: check_refs was skipped");
        *r -= 1;
        if *r == 0 {
            self.active.frees.push(s.pba());
            self.active.cost += FREE_COST;
            self.live_blocks -= 1;
            let no = segment_of(s.pba());
            if let Some(seg) = self.segments.get_mut(&no) {
                seg.live_blocks = seg.live_blocks.saturating_sub(1);
                if seg.dead() {
                    self.active.dead_segments.push(no);
                }
            }
        }
    }
}
