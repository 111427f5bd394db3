//! The node-local block store: volumes of 4 KiB blocks, kept in reference-counted extents.
//!
//! This crate is the [`BlockStore`] trait and its one implementation, [`SledStore`]: block data
//! in append-only segment files, the index (each volume's block map with per-block crc32c, each
//! extent's per-block reference counts) in sled, and a journal in the segment files that makes
//! a group commit one `fdatasync`. It knows nothing of replication, epochs, hosts or the
//! network: the replication layer decides *what* to write; this crate makes it durable, reads
//! it back verified, and copies ranges by reference. It holds no cluster state and does no Raft.
//!
//! Architecture invariants:
//! - A change is reported durable only once its data and its index change are on stable
//!   storage; sled never holds an index entry whose data was not synced first (see
//!   `store/mod.rs`).
//! - Every block read is checked against the crc32c recorded when it was written; a mismatch is
//!   [`StoreError::Corrupt`], never wrong data. After a crash each block holds a whole value it
//!   had, never a torn or foreign one.
//! - Memory is bounded: changes not yet durable are limited to [`PENDING_BYTES_MAX`] and writers
//!   wait when it is reached; large trims and clones are applied in bounded steps.
//!
//! Layout: `layout.rs` (key, value and journal formats; pure), `segments.rs` (segment files),
//! `store/` (the store: write paths, reads, group commit, checkpoints, recovery; one file per
//! job, listed in `store/mod.rs`).

#[cfg(feature = "failpoints")]
pub mod failpoints;
mod layout;
mod segments;
mod store;

use std::future::Future;

use tandem_types::VolumeId;

pub use layout::{CHUNK_BLOCKS, EXTENT_BLOCKS_MAX, SEGMENT_BLOCKS_MAX};
pub use store::{
    CheckStats, SledStore, StoreOptions, CHECKPOINT_INTERVAL, CHECKSUM_RANGE_BYTES_MAX, PENDING_BYTES_MAX,
};

/// A position in the store's order of changes. Every change (write, trim, clone, volume create
/// or delete) gets the next one; [`BlockStore::durable`] waits for a position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// Why a store operation failed. Input errors leave the store unchanged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("volume {0} does not exist")]
    UnknownVolume(VolumeId),
    #[error("volume {vol} exists with {existing_bytes} bytes, not {requested_bytes}")]
    VolumeExists { vol: VolumeId, existing_bytes: u64, requested_bytes: u64 },
    #[error("range {offset}+{len} is outside volume {vol} of {size_bytes} bytes")]
    OutOfRange { vol: VolumeId, offset: u64, len: u64, size_bytes: u64 },
    /// Bad sizes, misaligned ranges, overlapping clone ranges.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A block's data does not match its checksum, or the index entry for it is damaged.
    #[error("block {block} of volume {vol} is corrupt")]
    Corrupt { vol: VolumeId, block: u64 },
    /// An index entry not tied to one volume block (reference counts, volume records) is damaged.
    #[error("the index is corrupt: {0}")]
    CorruptIndex(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A flush failed earlier. After a failed `fdatasync` the kernel may have dropped the dirty
    /// pages, so retrying could report success for lost data: the store refuses further
    /// changes until it is reopened.
    #[error("the store failed and must be reopened: {0}")]
    Failed(String),
}

/// Space and flush accounting, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// Bytes of extent blocks referenced by at least one volume block (a block shared by
    /// clones counts once).
    pub live_bytes: u64,
    /// Bytes the segment files occupy on disk (holes excluded).
    pub segment_disk_bytes: u64,
    pub segment_files: u64,
    /// Group-commit cycles (one data sync + one index sync each) since the store was opened.
    pub flushes: u64,
    /// Budget used by changes not yet durable (see [`PENDING_BYTES_MAX`]).
    pub pending_bytes: u64,
    pub durable_lsn: u64,
    /// Deleted volumes whose block maps are still being released.
    pub volumes_releasing: u64,
}

/// A node's block storage: volumes of [`tandem_types::BLOCK_BYTES`] blocks, written in place
/// from the caller's point of view, durable on request.
pub trait BlockStore: Send + Sync + 'static {
    /// Creates an empty volume (reads as zeros). Creating an existing volume with the same size
    /// succeeds and changes nothing; another size is [`StoreError::VolumeExists`]. The size is a
    /// non-zero multiple of `BLOCK_BYTES`, at most `VOLUME_BYTES_MAX`.
    fn create_volume(&self, vol: VolumeId, size_bytes: u64) -> Result<(), StoreError>;

    /// Deletes a volume at once; its blocks are released in the background and their space
    /// returns as the releases become durable.
    fn delete_volume(&self, vol: VolumeId) -> Result<(), StoreError>;

    /// The volumes and their sizes, by id.
    fn volumes(&self) -> Vec<(VolumeId, u64)>;

    /// The size of one volume, if the store holds it.
    fn volume_size(&self, vol: VolumeId) -> Option<u64> {
        self.volumes().into_iter().find(|(v, _)| *v == vol).map(|(_, size)| size)
    }

    /// Writes `data` at any byte offset within the volume. Applied at once, in call order: a
    /// read that starts after `write` returns sees the data. Durable only once
    /// [`BlockStore::durable`] of the returned position resolves. Partial blocks are
    /// read-modify-written inside the store, atomically with respect to other calls.
    fn write(&self, vol: VolumeId, offset: u64, data: &[u8]) -> Result<Lsn, StoreError>;

    /// Zeroes a byte range: whole blocks become unallocated (read as zeros, space freed),
    /// partial blocks are zero-filled. Ranges over 1 GiB are applied in 1 GiB steps.
    fn write_zeroes(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Lsn, StoreError>;

    /// `write` and `write_zeroes` block the calling thread while the store's budget of pending
    /// changes is used up. An async caller must not block its worker (nor hold a lock that
    /// others need while it waits), so it first waits here, without blocking, for room for a
    /// change of up to `bytes` of data; the room is its own until the [`Admission`] is used by
    /// [`BlockStore::write_admitted`] / [`BlockStore::write_zeroes_admitted`] (which then never
    /// wait) or dropped.
    fn admit(&self, bytes: u64) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        let _ = bytes;
        std::future::ready(Ok(Admission::unlimited()))
    }

    /// [`BlockStore::write`] with room reserved by [`BlockStore::admit`]: never waits for budget.
    fn write_admitted(&self, admission: Admission, vol: VolumeId, offset: u64, data: &[u8]) -> Result<Lsn, StoreError> {
        drop(admission);
        self.write(vol, offset, data)
    }

    /// [`BlockStore::write_zeroes`] with room reserved by [`BlockStore::admit`]: never waits
    /// for budget (a range over 1 GiB may still wait between its steps).
    fn write_zeroes_admitted(
        &self,
        admission: Admission,
        vol: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<Lsn, StoreError> {
        drop(admission);
        self.write_zeroes(vol, offset, len)
    }

    /// Reads `buf.len()` bytes at `offset`. Unwritten blocks read as zeros; every block is
    /// checked against its checksum, and a mismatch is [`StoreError::Corrupt`].
    fn read(&self, vol: VolumeId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError>;

    /// Resolves when every change up to `lsn` is on stable storage. Concurrent callers share one
    /// flush (group commit): one `fdatasync` of the data and one index sync serve them all.
    fn durable(&self, lsn: Lsn) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The position of the latest change.
    fn last_lsn(&self) -> Lsn;

    /// Why the store failed, if it did ([`StoreError::Failed`]: a flush failed and the store
    /// refuses changes until it is reopened). A node whose store failed can hold no replica:
    /// the data plane builds no primary on it and the node stops renewing its lease, so the
    /// volumes it served fail over (docs/ARCHITECTURE.md, "Failure handling").
    fn failed(&self) -> Option<String> {
        None
    }

    /// The crc32c of each block of a block-aligned range, from the index alone (no data is
    /// read); an unallocated block gives the checksum of a zero block. Resync and
    /// reconciliation compare these to find differing regions. At most
    /// [`CHECKSUM_RANGE_BYTES_MAX`] per call.
    fn block_checksums(&self, vol: VolumeId, offset: u64, len: u64) -> Result<Vec<u32>, StoreError>;

    /// Copies by reference: dst's block-aligned range comes to share src's extents. The cost
    /// depends on the number of index chunks (128 KiB each) and extents involved, not on the bytes; a later
    /// overwrite of either side gets new extents for the overwritten blocks only. `src` and
    /// `dst` may be the same volume if the ranges do not overlap. Ranges over 16 MiB are applied
    /// in 16 MiB steps, each a change of its own (a crash may leave the first steps done).
    fn clone_range(
        &self,
        src: VolumeId,
        src_offset: u64,
        dst: VolumeId,
        dst_offset: u64,
        len: u64,
    ) -> Result<Lsn, StoreError>;

    /// Space and flush accounting.
    fn space(&self) -> SpaceStats;

    /// Which parts of a range hold data (thin provisioning): consecutive extents from `offset`,
    /// each wholly allocated or wholly not (reads as zeros, holds no space), at most `max` of
    /// them (at least one), so they may end before `offset + len`. Blocks count whole: a range
    /// starting or ending inside a block reports that block's state. From the index alone.
    /// Without an index to ask, everything is reported allocated.
    fn extents(&self, vol: VolumeId, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, StoreError> {
        let _ = (vol, max);
        let _ = offset;
        Ok(if len == 0 { Vec::new() } else { vec![Extent { len, allocated: true }] })
    }
}

/// A piece of a volume's range, as [`BlockStore::extents`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Holds data (else it reads as zeros and takes no space).
    pub allocated: bool,
}

/// Room reserved in a store's budget of pending changes ([`BlockStore::admit`]); given back
/// when used by a write or dropped.
#[must_use = "an admission holds budget until it is used or dropped"]
pub struct Admission {
    bytes: u64,
    release: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl Admission {
    /// An admission of a store that has no budget to reserve.
    pub fn unlimited() -> Admission {
        Admission { bytes: 0, release: None }
    }

    /// An admission of `bytes` that calls `release(bytes)` if dropped unused.
    pub fn new(bytes: u64, release: Box<dyn FnOnce(u64) + Send + Sync>) -> Admission {
        Admission { bytes, release: Some(release) }
    }

    /// Takes the reserved bytes for the write that uses them: nothing is released on drop.
    pub fn consume(mut self) -> u64 {
        self.release = None;
        self.bytes
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release(self.bytes);
        }
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("bytes", &self.bytes).finish()
    }
}

/// The crc32c of one zero block: what [`BlockStore::block_checksums`] reports for unallocated
/// blocks.
pub fn zero_block_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; tandem_types::BLOCK_BYTES as usize]))
}
