//! Volumes: creating and deleting them, and releasing the block maps of deleted volumes in
//! bounded steps (one per commit) in the background.

use std::collections::BTreeSet;

use tandem_types::{VolumeId, VOLUME_BYTES_MAX};

use super::{corrupt_index, lock, sled_err, SledStore, State, B};
use crate::layout::{chunk_key, chunk_of_key, Slot, VolumeRec};
use crate::StoreError;

/// Chunks of a deleted volume's map released per commit.
const REAP_CHUNKS_STEP: usize = 1024;

impl SledStore {
    /// [`BlockStore::create_volume`](crate::BlockStore::create_volume).
    pub(super) fn add_volume(&self, vol: VolumeId, size_bytes: u64) -> Result<(), StoreError> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(B) || size_bytes > VOLUME_BYTES_MAX {
            return Err(StoreError::Invalid(format!(
                "volume size {size_bytes} must be a non-zero multiple of {B} up to {VOLUME_BYTES_MAX}"
            )));
        }
        let mut st = self.lock_for_change(None)?;
        if let Some(rec) = st.volumes.get(&vol) {
            if rec.size_bytes == size_bytes {
                return Ok(());
            }
            return Err(StoreError::VolumeExists { vol, existing_bytes: rec.size_bytes, requested_bytes: size_bytes });
        }
        let rec = VolumeRec { size_bytes, map: st.next_map };
        st.next_map += 1;
        st.volumes.insert(vol, rec);
        st.active.volumes.insert(vol, Some(rec));
        st.bump();
        Ok(())
    }

    /// [`BlockStore::delete_volume`](crate::BlockStore::delete_volume).
    pub(super) fn remove_volume(&self, vol: VolumeId) -> Result<(), StoreError> {
        let mut st = self.lock_for_change(None)?;
        let rec = st.volumes.remove(&vol).ok_or(StoreError::UnknownVolume(vol))?;
        st.active.volumes.insert(vol, None);
        st.graves.insert(rec.map);
        st.active.graves.insert(rec.map, true);
        st.bump();
        drop(st);
        self.core().commit_cv.notify_one();
        Ok(())
    }

    /// [`BlockStore::volumes`](crate::BlockStore::volumes).
    pub(super) fn volume_sizes(&self) -> Vec<(VolumeId, u64)> {
        lock(&self.core().st).volumes.iter().map(|(v, r)| (*v, r.size_bytes)).collect()
    }

    pub(super) fn one_volume_size(&self, vol: VolumeId) -> Option<u64> {
        lock(&self.core().st).volumes.get(&vol).map(|r| r.size_bytes)
    }
}

impl State {
    /// Releases up to [`REAP_CHUNKS_STEP`] chunks of the first deleted volume's map; when none
    /// are left, forgets the map. Damaged entries are skipped (their space leaks, logged).
    pub(super) fn reap_step(&mut self) {
        let Some(&map) = self.graves.first() else { return };
        let chunks = match self.live_chunks(map, REAP_CHUNKS_STEP) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(map, error = %e, "cannot list a deleted volume's map; leaking it");
                Vec::new()
            }
        };
        if chunks.is_empty() {
            self.graves.remove(&map);
            self.active.graves.insert(map, false);
        }
        for c in chunks {
            let old: Vec<Slot> = match self.chunk_mut(VolumeId(0), map, c) {
                Ok(ch) => {
                    let old = ch.slots.iter().copied().filter(Slot::is_mapped).collect();
                    ch.slots.fill(Slot::default());
                    old
                }
                Err(e) => {
                    tracing::error!(map, chunk = c, error = %e, "damaged chunk of a deleted volume; leaking it");
                    self.active.chunks.insert((map, c), Box::default());
                    Vec::new()
                }
            };
            for s in old {
                match self.check_refs(&[], &[s]) {
                    Ok(()) => self.drop_ref(s),
                    Err(e) => tracing::error!(map, chunk = c, error = %e, "bad reference in a deleted volume"),
                }
            }
        }
        self.bump();
    }

    /// Up to `limit` chunks of `map` that are not empty in the newest layer that has them
    /// (entries emptied in an overlay but still in sled are skipped). A damaged entry counts as
    /// not empty.
    fn live_chunks(&self, map: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut out = BTreeSet::new();
        let layers = std::iter::once(&self.active).chain(self.flushing.iter().map(|g| &**g));
        for g in layers {
            for (&(_, c), _) in g.chunks.range((map, 0)..=(map, u64::MAX)) {
                if out.len() < limit
                    && !self.chunk(VolumeId(0), map, c).map(|ch| ch.is_none_or(|ch| ch.is_empty())).unwrap_or(false)
                {
                    out.insert(c);
                }
            }
        }
        for k in self.db.range(chunk_key(map, 0)..=chunk_key(map, u64::MAX)).keys() {
            if out.len() >= limit {
                break;
            }
            let c = chunk_of_key(&k.map_err(sled_err)?).map_err(|e| corrupt_index(format!("map key: {}", e.0)))?;
            if !self.chunk(VolumeId(0), map, c).map(|ch| ch.is_none_or(|ch| ch.is_empty())).unwrap_or(false) {
                out.insert(c);
            }
        }
        Ok(out.into_iter().collect())
    }
}
