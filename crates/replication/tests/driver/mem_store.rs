//! An in-memory [`BlockStore`] whose durability a test can hold back (writes apply at once,
//! `durable` waits while the store is held) and that a test can fail (as after a failed
//! `fdatasync`: every change and every durability wait fails from then on).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_storage::{BlockStore, Extent, Lsn, SpaceStats, StoreError};
use tandem_types::{VolumeId, BLOCK_BYTES};
use tokio::sync::watch;

/// Clones share the store (the data plane's handle is `Clone`).
#[derive(Clone)]
pub struct MemStore {
    volumes: Arc<Mutex<HashMap<VolumeId, Vec<u8>>>>,
    last: Arc<AtomicU64>,
    /// True while durability is held back.
    held: Arc<watch::Sender<bool>>,
    /// Why the store failed, once it did ([`MemStore::fail`]).
    failed: Arc<Mutex<Option<String>>>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            volumes: Arc::default(),
            last: Arc::default(),
            held: Arc::new(watch::channel(false).0),
            failed: Arc::default(),
        }
    }
}

impl MemStore {
    /// Holds back (`true`) or lets through (`false`) every `durable` wait.
    pub fn hold_durability(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Fails the store for good, as a failed flush does: changes and durability waits fail
    /// with [`StoreError::Failed`] (also a wait already under way), reads still work.
    pub fn fail(&self, why: &str) {
        *self.failed.lock().expect("store lock") = Some(why.to_string());
        // Wakes waits held back, which then see the failure.
        self.held.send_replace(false);
    }

    fn check(&self) -> Result<(), StoreError> {
        match &*self.failed.lock().expect("store lock") {
            Some(why) => Err(StoreError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    fn change(&self) -> Lsn {
        Lsn(self.last.fetch_add(1, Ordering::SeqCst) + 1)
    }

    fn range(v: &mut [u8], vol: VolumeId, offset: u64, len: u64) -> Result<&mut [u8], StoreError> {
        let size_bytes = v.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size_bytes => Ok(&mut v[offset as usize..end as usize]),
            _ => Err(StoreError::OutOfRange { vol, offset, len, size_bytes }),
        }
    }
}

impl BlockStore for MemStore {
    fn create_volume(&self, vol: VolumeId, size_bytes: u64) -> Result<(), StoreError> {
        self.volumes.lock().expect("store lock").entry(vol).or_insert_with(|| vec![0; size_bytes as usize]);
        self.change();
        Ok(())
    }

    fn delete_volume(&self, vol: VolumeId) -> Result<(), StoreError> {
        self.volumes.lock().expect("store lock").remove(&vol);
        self.change();
        Ok(())
    }

    fn volumes(&self) -> Vec<(VolumeId, u64)> {
        self.volumes.lock().expect("store lock").iter().map(|(id, v)| (*id, v.len() as u64)).collect()
    }

    fn write(&self, vol: VolumeId, offset: u64, data: &[u8]) -> Result<Lsn, StoreError> {
        self.check()?;
        let mut vols = self.volumes.lock().expect("store lock");
        let v = vols.get_mut(&vol).ok_or(StoreError::UnknownVolume(vol))?;
        Self::range(v, vol, offset, data.len() as u64)?.copy_from_slice(data);
        Ok(self.change())
    }

    fn write_zeroes(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Lsn, StoreError> {
        self.check()?;
        let mut vols = self.volumes.lock().expect("store lock");
        let v = vols.get_mut(&vol).ok_or(StoreError::UnknownVolume(vol))?;
        Self::range(v, vol, offset, len)?.fill(0);
        Ok(self.change())
    }

    /// A block holding a byte other than zero is allocated (as if zeroes were never stored).
    fn extents(&self, vol: VolumeId, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, StoreError> {
        let mut vols = self.volumes.lock().expect("store lock");
        let v = vols.get_mut(&vol).ok_or(StoreError::UnknownVolume(vol))?;
        Self::range(v, vol, offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < offset + len && out.len() <= max {
            let block = at / BLOCK_BYTES * BLOCK_BYTES;
            let block_end = (block + BLOCK_BYTES).min(v.len() as u64);
            let allocated = v[block as usize..block_end as usize].iter().any(|b| *b != 0);
            let piece = block_end.min(offset + len) - at;
            match out.last_mut() {
                Some(last) if last.allocated == allocated => last.len += piece,
                _ => out.push(Extent { len: piece, allocated }),
            }
            at += piece;
        }
        out.truncate(max.max(1));
        Ok(out)
    }

    fn read(&self, vol: VolumeId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let mut vols = self.volumes.lock().expect("store lock");
        let v = vols.get_mut(&vol).ok_or(StoreError::UnknownVolume(vol))?;
        buf.copy_from_slice(Self::range(v, vol, offset, buf.len() as u64)?);
        Ok(())
    }

    fn durable(&self, _lsn: Lsn) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut held = self.held.subscribe();
        let store = self.clone();
        async move {
            let _ = held.wait_for(|h| !*h).await;
            store.check()
        }
    }

    fn failed(&self) -> Option<String> {
        self.failed.lock().expect("store lock").clone()
    }

    fn last_lsn(&self) -> Lsn {
        Lsn(self.last.load(Ordering::SeqCst))
    }

    fn block_checksums(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Vec<u32>, StoreError> {
        let mut vols = self.volumes.lock().expect("store lock");
        let v = vols.get_mut(&vol).ok_or(StoreError::UnknownVolume(vol))?;
        Ok(Self::range(v, vol, offset, len)?.chunks(BLOCK_BYTES as usize).map(crc32c::crc32c).collect())
    }

    /// A copy of the bytes: the same effect as the real store's copy by reference.
    fn clone_range(
        &self,
        src: VolumeId,
        src_offset: u64,
        dst: VolumeId,
        dst_offset: u64,
        len: u64,
    ) -> Result<Lsn, StoreError> {
        self.check()?;
        let mut vols = self.volumes.lock().expect("store lock");
        let s = vols.get_mut(&src).ok_or(StoreError::UnknownVolume(src))?;
        let bytes = Self::range(s, src, src_offset, len)?.to_vec();
        let d = vols.get_mut(&dst).ok_or(StoreError::UnknownVolume(dst))?;
        Self::range(d, dst, dst_offset, len)?.copy_from_slice(&bytes);
        Ok(self.change())
    }

    fn space(&self) -> SpaceStats {
        SpaceStats::default()
    }
}
