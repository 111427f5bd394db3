//! [`BlockStore`] for [`SledStore`]: each operation is done in the file of its job; this impl
//! only routes to them.

use std::future::Future;

use tandem_types::VolumeId;

use super::{lock, SledStore};
use crate::{Admission, BlockStore, Extent, Lsn, SpaceStats, StoreError};

impl BlockStore for SledStore {
    fn create_volume(&self, vol: VolumeId, size_bytes: u64) -> Result<(), StoreError> {
        self.add_volume(vol, size_bytes)
    }

    fn delete_volume(&self, vol: VolumeId) -> Result<(), StoreError> {
        self.remove_volume(vol)
    }

    fn volumes(&self) -> Vec<(VolumeId, u64)> {
        self.volume_sizes()
    }

    fn volume_size(&self, vol: VolumeId) -> Option<u64> {
        self.one_volume_size(vol)
    }

    fn write(&self, vol: VolumeId, offset: u64, data: &[u8]) -> Result<Lsn, StoreError> {
        self.write_with(vol, offset, data, None)
    }

    fn write_zeroes(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Lsn, StoreError> {
        self.write_zeroes_with(vol, offset, len, None)
    }

    fn admit(&self, bytes: u64) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        self.admit_room(bytes)
    }

    fn write_admitted(&self, admission: Admission, vol: VolumeId, offset: u64, data: &[u8]) -> Result<Lsn, StoreError> {
        self.write_with(vol, offset, data, Some(admission))
    }

    fn write_zeroes_admitted(
        &self,
        admission: Admission,
        vol: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<Lsn, StoreError> {
        self.write_zeroes_with(vol, offset, len, Some(admission))
    }

    fn read(&self, vol: VolumeId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.read_range(vol, offset, buf)
    }

    fn durable(&self, lsn: Lsn) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.wait_durable(lsn)
    }

    fn last_lsn(&self) -> Lsn {
        Lsn(lock(&self.core().st).lsn)
    }

    fn failed(&self) -> Option<String> {
        // From the durability watch, not the state's mutex: the node's health check (its lease
        // renewal, on an async worker) asks this every tick, and must not wait behind a long
        // change holding the mutex.
        self.core().durable_tx.borrow().failed.clone()
    }

    fn block_checksums(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Vec<u32>, StoreError> {
        self.checksums_of(vol, offset, len)
    }

    fn clone_range(
        &self,
        src: VolumeId,
        src_offset: u64,
        dst: VolumeId,
        dst_offset: u64,
        len: u64,
    ) -> Result<Lsn, StoreError> {
        self.clone_blocks(src, src_offset, dst, dst_offset, len)
    }

    fn extents(&self, vol: VolumeId, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, StoreError> {
        self.extents_of(vol, offset, len, max)
    }

    fn space(&self) -> SpaceStats {
        self.space_stats()
    }
}
