//! Behaviour of `SledStore` through the `BlockStore` trait: reads and writes, durability across
//! reopen, checksums, copy by reference, space accounting, group commit and bad input.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use tandem_storage::{
    zero_block_crc, BlockStore, Lsn, SledStore, StoreError, StoreOptions, CHUNK_BLOCKS, PENDING_BYTES_MAX,
};
use tandem_types::{VolumeId, BLOCK_BYTES};

const B: u64 = BLOCK_BYTES;
const MIB: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).rotate_left((i / 4096) as u32 % 8)).collect()
}

fn read(store: &SledStore, vol: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len as usize];
    store.read(VolumeId(vol), offset, &mut buf).expect("read");
    buf
}

async fn sync(store: &SledStore) {
    store.durable(store.last_lsn()).await.expect("durable");
}

/// Polls `cond` until it holds, or fails after a deadline (no fixed sleeps).
async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    tandem_testkit::wait::eventually(what, Duration::from_secs(20), cond).await
}

#[tokio::test]
async fn writes_read_back_and_unwritten_blocks_are_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), 8 * MIB).unwrap();
    assert_eq!(store.volumes(), vec![(VolumeId(1), 8 * MIB)]);
    assert_eq!(read(&store, 1, 0, 3 * B), vec![0; 3 * B as usize]);

    let data = pattern(1, 3 * MIB as usize);
    let lsn = store.write(VolumeId(1), MIB - 2 * B, &data).unwrap();
    assert_eq!(read(&store, 1, MIB - 2 * B, data.len() as u64), data);
    // Unaligned reads across the written edge.
    let got = read(&store, 1, MIB - 2 * B - 100, 300);
    assert_eq!(&got[..100], &[0u8; 100][..]);
    assert_eq!(&got[100..], &data[..200]);

    // An unaligned write in the middle of a block keeps the rest of the block.
    let lsn2 = store.write(VolumeId(1), MIB + 10, b"hello").unwrap();
    assert!(lsn2 > lsn);
    let mut expect = data[2 * B as usize..3 * B as usize].to_vec();
    expect[10..15].copy_from_slice(b"hello");
    assert_eq!(read(&store, 1, MIB, B), expect);

    // Unaligned write spanning a block boundary on a fresh area.
    store.write(VolumeId(1), 6 * MIB - 3, b"abcdef").unwrap();
    assert_eq!(read(&store, 1, 6 * MIB - 4, 8), b"\0abcdef\0");
    store.durable(store.last_lsn()).await.unwrap();
}

#[tokio::test]
async fn durable_writes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(7, 2 * MIB as usize + 5000);
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.create_volume(VolumeId(3), 16 * MIB).unwrap();
        store.create_volume(VolumeId(4), 4 * MIB).unwrap();
        let lsn = store.write(VolumeId(3), 12345, &data).unwrap();
        store.durable(lsn).await.unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.volumes(), vec![(VolumeId(3), 16 * MIB), (VolumeId(4), 4 * MIB)]);
    assert_eq!(read(&store, 3, 12345, data.len() as u64), data);
    assert!(store.last_lsn() >= Lsn(3), "positions continue across reopen");
    // Writing after reopen goes to a new segment and still works.
    let lsn = store.write(VolumeId(3), 0, &pattern(9, B as usize)).unwrap();
    store.durable(lsn).await.unwrap();
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(read(&store, 3, 0, B), pattern(9, B as usize));
    assert_eq!(read(&store, 3, 12345, data.len() as u64), data);
}

#[tokio::test]
async fn a_crash_loses_only_whole_non_durable_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let old = pattern(1, 64 * B as usize);
    let new = pattern(2, 64 * B as usize);
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.create_volume(VolumeId(1), 4 * MIB).unwrap();
        let lsn = store.write(VolumeId(1), 0, &old).unwrap();
        store.durable(lsn).await.unwrap();
        for i in 0..64 {
            store.write(VolumeId(1), i * B, &new[(i * B) as usize..((i + 1) * B) as usize]).unwrap();
        }
        store.write(VolumeId(1), 2 * MIB, &new).unwrap();
        // Dropped without `durable`: as far as the index is concerned, a crash.
    }
    let store = SledStore::open(dir.path()).unwrap();
    let got = read(&store, 1, 0, 64 * B);
    for i in 0..64usize {
        let r = i * B as usize..(i + 1) * B as usize;
        assert!(got[r.clone()] == old[r.clone()] || got[r.clone()] == new[r], "block {i} is neither old nor new");
    }
    let got = read(&store, 1, 2 * MIB, 64 * B);
    for i in 0..64usize {
        let r = i * B as usize..(i + 1) * B as usize;
        assert!(got[r.clone()] == new[r.clone()] || got[r].iter().all(|b| *b == 0), "block {i} is garbage");
    }
    // Space written but never indexed durably was given back at open.
    let live = store.space().live_bytes;
    assert!((64 * B..=192 * B).contains(&live), "live bytes {live}");
}

#[tokio::test]
async fn a_flipped_byte_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), MIB).unwrap();
    let lsn = store.write(VolumeId(1), 0, &pattern(3, 4 * B as usize)).unwrap();
    store.durable(lsn).await.unwrap();

    // Find volume block 2 in the segment files (they also hold journal records) and flip a bit.
    let block2 = &pattern(3, 4 * B as usize)[2 * B as usize..3 * B as usize];
    let mut flipped = false;
    for entry in std::fs::read_dir(dir.path().join("segments")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Some(i) = bytes.chunks(B as usize).position(|b| b == block2) {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let at = i as u64 * B + 17;
            f.write_all_at(&[bytes[at as usize] ^ 0x40], at).unwrap();
            flipped = true;
        }
    }
    assert!(flipped, "block 2 not found in the segments");

    let mut buf = vec![0u8; 4 * B as usize];
    match store.read(VolumeId(1), 0, &mut buf) {
        Err(StoreError::Corrupt { vol: VolumeId(1), block: 2 }) => {}
        other => panic!("expected Corrupt at block 2, got {other:?}"),
    }
    // Blocks around it still read; a partial write over it is refused; a whole-block
    // overwrite repairs it.
    assert_eq!(read(&store, 1, B, B), pattern(3, 4 * B as usize)[B as usize..2 * B as usize]);
    assert!(matches!(
        store.write(VolumeId(1), 2 * B + 1, b"x"),
        Err(StoreError::Corrupt { vol: VolumeId(1), block: 2 })
    ));
    store.write(VolumeId(1), 2 * B, &[5u8; B as usize]).unwrap();
    assert_eq!(read(&store, 1, 2 * B, B), vec![5u8; B as usize]);
}

#[tokio::test]
async fn a_damaged_index_entry_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.create_volume(VolumeId(1), 4 * MIB).unwrap();
        store.write(VolumeId(1), 0, &pattern(1, MIB as usize)).unwrap();
        store.write(VolumeId(1), 2 * MIB, &pattern(2, MIB as usize)).unwrap();
        sync(&store).await;
    }
    // Opening replays the journal into sled; after that, sled alone holds the index.
    drop(SledStore::open(dir.path()).unwrap());
    {
        // The chunk at 2 MiB in map 1 (the first volume's map): garbage.
        let db = sled::open(dir.path().join("index")).unwrap();
        let mut key = vec![b'M'];
        key.extend_from_slice(&1u64.to_be_bytes());
        key.extend_from_slice(&(2 * MIB / B / CHUNK_BLOCKS).to_be_bytes());
        assert!(db.get(&key).unwrap().is_some(), "the key layout changed; update this test");
        db.insert(&key, &[1u8, 2, 3][..]).unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    let mut buf = vec![0u8; B as usize];
    assert!(matches!(
        store.read(VolumeId(1), 2 * MIB, &mut buf),
        Err(StoreError::Corrupt { vol: VolumeId(1), block: 512 })
    ));
    assert!(matches!(store.block_checksums(VolumeId(1), 2 * MIB, B), Err(StoreError::Corrupt { .. })));
    let before = store.last_lsn();
    assert!(matches!(store.write(VolumeId(1), 2 * MIB, &buf), Err(StoreError::Corrupt { .. })));
    assert_eq!(store.last_lsn(), before, "a refused write is not a change");
    assert_eq!(read(&store, 1, 0, MIB), pattern(1, MIB as usize));
}

#[tokio::test]
async fn block_checksums_come_from_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), 4 * MIB).unwrap();
    let data = pattern(4, 300 * B as usize);
    store.write(VolumeId(1), 100 * B, &data).unwrap();
    let sums = store.block_checksums(VolumeId(1), 0, 2 * MIB).unwrap();
    assert_eq!(sums.len(), 512);
    for (i, s) in sums.iter().enumerate() {
        let want = if (100..400).contains(&i) {
            crc32c::crc32c(&data[(i - 100) * B as usize..(i - 99) * B as usize])
        } else {
            zero_block_crc()
        };
        assert_eq!(*s, want, "block {i}");
    }
    assert!(matches!(store.block_checksums(VolumeId(1), 1, B), Err(StoreError::Invalid(_))));
}

#[tokio::test]
async fn write_zeroes_unmaps_whole_blocks_and_zero_fills_partial_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), 4 * MIB).unwrap();
    let data = pattern(5, 2 * MIB as usize);
    store.write(VolumeId(1), 0, &data).unwrap();
    sync(&store).await;
    let live_before = store.space().live_bytes;
    assert_eq!(live_before, 2 * MIB);

    store.write_zeroes(VolumeId(1), 100, MIB).unwrap();
    let got = read(&store, 1, 0, 2 * MIB);
    let mut want = data.clone();
    want[100..100 + MIB as usize].fill(0);
    assert_eq!(got, want);
    // 255 whole blocks unmapped; the 2 partial blocks were replaced by new ones.
    assert_eq!(store.space().live_bytes, live_before - 255 * B);
    assert_eq!(store.block_checksums(VolumeId(1), 4 * B, B).unwrap(), vec![zero_block_crc()]);

    // Within one block.
    store.write_zeroes(VolumeId(1), MIB + 3 * B + 7, 9).unwrap();
    want[(MIB + 3 * B + 7) as usize..(MIB + 3 * B + 16) as usize].fill(0);
    assert_eq!(read(&store, 1, 0, 2 * MIB), want);
    sync(&store).await;
}

#[tokio::test]
async fn clones_share_extents_and_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), 8 * MIB).unwrap();
    store.create_volume(VolumeId(2), 8 * MIB).unwrap();
    let data = pattern(6, 4 * MIB as usize);
    store.write(VolumeId(1), 0, &data).unwrap();
    sync(&store).await;
    let live = store.space().live_bytes;

    // Another volume, at an offset that is not chunk aligned, and within the same volume.
    store.clone_range(VolumeId(1), 0, VolumeId(2), 3 * B, 4 * MIB).unwrap();
    store.clone_range(VolumeId(1), MIB, VolumeId(1), 5 * MIB, 2 * MIB).unwrap();
    assert_eq!(store.space().live_bytes, live, "clones allocate no data");
    assert_eq!(read(&store, 2, 3 * B, 4 * MIB), data);
    assert_eq!(read(&store, 1, 5 * MIB, 2 * MIB), &data[MIB as usize..3 * MIB as usize]);
    assert_eq!(
        store.block_checksums(VolumeId(2), 3 * B, 4 * MIB).unwrap(),
        store.block_checksums(VolumeId(1), 0, 4 * MIB).unwrap()
    );

    // Overwrite one block on each side: only that block gets a new extent.
    store.write(VolumeId(2), 3 * B, &[1u8; B as usize]).unwrap();
    store.write(VolumeId(1), MIB, &[2u8; B as usize]).unwrap();
    assert_eq!(read(&store, 1, 0, B), &data[..B as usize]);
    assert_eq!(read(&store, 2, 3 * B + MIB, B), &data[MIB as usize..(MIB + B) as usize]);
    assert_eq!(read(&store, 1, 5 * MIB, B), &data[MIB as usize..(MIB + B) as usize]);
    assert_eq!(read(&store, 2, 3 * B, B), vec![1u8; B as usize]);
    assert_eq!(store.space().live_bytes, live + 2 * B);

    // Survives reopen.
    sync(&store).await;
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(read(&store, 2, 4 * B, 4 * MIB - B), &data[B as usize..]);
    assert_eq!(store.space().live_bytes, live + 2 * B);
}

#[tokio::test]
async fn the_check_counts_every_reference_against_the_block_maps() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.create_volume(VolumeId(1), 8 * MIB).unwrap();
        store.create_volume(VolumeId(2), 8 * MIB).unwrap();
        store.create_volume(VolumeId(3), 8 * MIB).unwrap();
        store.write(VolumeId(1), 0, &pattern(3, MIB as usize)).unwrap();
        store.clone_range(VolumeId(1), 0, VolumeId(2), 0, MIB).unwrap();
        store.clone_range(VolumeId(1), 0, VolumeId(3), MIB, MIB).unwrap();
        store.write(VolumeId(2), 0, &[9u8; B as usize]).unwrap();
        store.delete_volume(VolumeId(3)).unwrap();
        // In the in-memory layers: 256 blocks shared by volumes 1 and 2 (but the one volume 2
        // overwrote), and volume 3's map until it is released.
        let stats = store.check().unwrap();
        assert_eq!(stats.referenced_blocks, 257);
        sync(&store).await;
    }
    let store = SledStore::open(dir.path()).unwrap();
    eventually("volume 3's map is released", || store.space().volumes_releasing == 0).await;
    let stats = store.check().unwrap();
    assert_eq!((stats.maps, stats.mapped_blocks, stats.referenced_blocks), (2, 512, 257));
    sync(&store).await;
    drop(store);
    drop(SledStore::open(dir.path()).unwrap());
    {
        // One block's count one too high (a leak), written into sled directly.
        let db = sled::open(dir.path().join("index")).unwrap();
        let (key, value) = db.scan_prefix(b"R").next().expect("an extent").unwrap();
        let mut value = value.to_vec();
        let count = u32::from_le_bytes(value[..4].try_into().unwrap());
        value[..4].copy_from_slice(&(count + 1).to_le_bytes());
        db.insert(key, value).unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    let err = store.check().expect_err("a count that disagrees with the maps");
    assert!(matches!(err, StoreError::CorruptIndex(ref why) if why.contains("references counted")), "{err}");
}

/// Options under which the store takes no checkpoint while it runs, so that reopening replays
/// the journal (unless sled persisted the batches on its own, which it may).
fn no_checkpoints() -> StoreOptions {
    StoreOptions { checkpoint_interval: Duration::from_secs(3600), ..StoreOptions::default() }
}

#[tokio::test]
async fn reopening_replays_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(11, 3 * MIB as usize);
    {
        let store = SledStore::open_with(dir.path(), no_checkpoints()).unwrap();
        store.create_volume(VolumeId(1), 8 * MIB).unwrap();
        store.create_volume(VolumeId(2), 8 * MIB).unwrap();
        store.write(VolumeId(1), 0, &data).unwrap();
        sync(&store).await;
        store.clone_range(VolumeId(1), 0, VolumeId(2), MIB, 2 * MIB).unwrap();
        store.write_zeroes(VolumeId(1), MIB, MIB).unwrap();
        store.write(VolumeId(2), MIB + 5, b"tail").unwrap();
        sync(&store).await;
    }
    let store = SledStore::open_with(dir.path(), no_checkpoints()).unwrap();
    let mut want1 = data.clone();
    want1[MIB as usize..2 * MIB as usize].fill(0);
    assert_eq!(read(&store, 1, 0, 3 * MIB), want1);
    let mut want2 = data[..2 * MIB as usize].to_vec();
    want2[5..9].copy_from_slice(b"tail");
    assert_eq!(read(&store, 2, MIB, 2 * MIB), want2);
    // Volume 2 still shares the trimmed megabyte; "tail" replaced one shared block.
    assert_eq!(store.space().live_bytes, 3 * MIB + B);
}

fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir.join("segments")).unwrap().map(|e| e.unwrap().metadata().unwrap().blocks() * 512).sum()
}

#[tokio::test]
async fn deleting_volumes_gives_their_space_back() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so that whole segment files die.
    let store =
        SledStore::open_with(dir.path(), StoreOptions { segment_bytes: 3 * MIB, ..StoreOptions::default() }).unwrap();
    store.create_volume(VolumeId(1), 64 * MIB).unwrap();
    store.create_volume(VolumeId(2), 64 * MIB).unwrap();
    for i in 0..16 {
        store.write(VolumeId(1), i * MIB, &pattern(i as u8, MIB as usize)).unwrap();
    }
    store.clone_range(VolumeId(1), 0, VolumeId(2), 0, 16 * MIB).unwrap();
    sync(&store).await;
    let full = disk_bytes(dir.path());
    assert!(full >= 16 * MIB, "segments hold {full} bytes");
    assert_eq!(store.space().segment_files, 6);

    store.delete_volume(VolumeId(1)).unwrap();
    assert!(matches!(store.read(VolumeId(1), 0, &mut [0u8; 1]), Err(StoreError::UnknownVolume(VolumeId(1)))));
    sync(&store).await;
    // Volume 2 still references every extent.
    eventually("volume 1 released", || store.space().volumes_releasing == 0).await;
    assert_eq!(store.space().live_bytes, 16 * MIB);
    assert_eq!(read(&store, 2, 5 * MIB, MIB), pattern(5, MIB as usize));

    store.delete_volume(VolumeId(2)).unwrap();
    eventually("space returned", || {
        let s = store.space();
        s.live_bytes == 0 && s.volumes_releasing == 0 && disk_bytes(dir.path()) < MIB
    })
    .await;
    assert!(store.space().segment_files <= 1, "unused segment files are deleted, but for the one being appended");
    assert!(std::fs::read_dir(dir.path().join("segments")).unwrap().count() <= 1);

    // A volume created again under the same id starts empty.
    store.create_volume(VolumeId(1), MIB).unwrap();
    assert_eq!(read(&store, 1, 0, MIB), vec![0u8; MIB as usize]);
}

#[tokio::test]
async fn overwrites_punch_holes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), 8 * MIB).unwrap();
    for round in 0..4u8 {
        store.write(VolumeId(1), 0, &pattern(round, 4 * MIB as usize)).unwrap();
        sync(&store).await;
    }
    eventually("holes punched", || disk_bytes(dir.path()) <= 5 * MIB).await;
    assert_eq!(store.space().live_bytes, 4 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_waiters_share_flushes() {
    const WRITERS: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), 64 * MIB).unwrap();
    sync(&store).await;
    let before = store.space().flushes;
    // Every write is in before anyone waits, so the result does not depend on how the tasks
    // are scheduled (on a starved machine each task could otherwise write and wait alone):
    // the waiters, all at once, are served by the flush that covers them all (and at most one
    // more, a timed flush that may have caught the first writes).
    let lsns: Vec<Lsn> =
        (0..WRITERS).map(|t| store.write(VolumeId(1), t * 7 * B, &[t as u8; B as usize]).unwrap()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for lsn in lsns {
        let store = store.clone();
        tasks.spawn(async move { store.durable(lsn).await.unwrap() });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let flushes = store.space().flushes - before;
    assert!(flushes <= 2, "{WRITERS} waiters took {flushes} flushes");
    for t in 0..WRITERS {
        assert_eq!(read(&store, 1, t * 7 * B, B), vec![t as u8; B as usize]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_wait_for_the_pending_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), 256 * MIB).unwrap();
    let chunk = pattern(8, MIB as usize);
    let writer = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let mut pending_max = 0;
            for i in 0..160 {
                store.write(VolumeId(1), i * MIB, &chunk).unwrap();
                pending_max = pending_max.max(store.space().pending_bytes);
            }
            pending_max
        })
    };
    let pending_max = writer.await.unwrap();
    assert!(pending_max <= PENDING_BYTES_MAX + 2 * MIB, "pending reached {pending_max}");
    sync(&store).await;
    assert_eq!(read(&store, 1, 100 * MIB, MIB), pattern(8, MIB as usize));
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.create_volume(VolumeId(1), MIB).unwrap();
    store.create_volume(VolumeId(1), MIB).unwrap();
    store.create_volume(VolumeId(2), MIB).unwrap();
    store.write(VolumeId(1), 0, &pattern(1, MIB as usize)).unwrap();
    let lsn = store.last_lsn();
    let space = store.space().live_bytes;

    assert!(matches!(
        store.create_volume(VolumeId(1), 2 * MIB),
        Err(StoreError::VolumeExists { vol: VolumeId(1), .. })
    ));
    assert!(matches!(store.create_volume(VolumeId(5), 0), Err(StoreError::Invalid(_))));
    assert!(matches!(store.create_volume(VolumeId(5), 1000), Err(StoreError::Invalid(_))));
    assert!(matches!(store.create_volume(VolumeId(5), u64::MAX - 4095), Err(StoreError::Invalid(_))));
    assert!(matches!(store.write(VolumeId(9), 0, &[1]), Err(StoreError::UnknownVolume(VolumeId(9)))));
    assert!(matches!(store.write(VolumeId(1), MIB - 1, &[1, 2]), Err(StoreError::OutOfRange { vol: VolumeId(1), .. })));
    assert!(matches!(store.write(VolumeId(1), u64::MAX, &[1]), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(store.write(VolumeId(1), MIB, &[0u8; 4096]), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(store.write_zeroes(VolumeId(1), 4096, MIB), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(store.read(VolumeId(1), MIB, &mut [0u8; 1]), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(store.read(VolumeId(3), 0, &mut [0u8; 1]), Err(StoreError::UnknownVolume(VolumeId(3)))));
    assert!(matches!(store.clone_range(VolumeId(1), 1, VolumeId(2), 0, B), Err(StoreError::Invalid(_))));
    assert!(matches!(store.clone_range(VolumeId(1), 0, VolumeId(2), 0, 100), Err(StoreError::Invalid(_))));
    assert!(matches!(
        store.clone_range(VolumeId(1), 0, VolumeId(2), B, MIB),
        Err(StoreError::OutOfRange { vol: VolumeId(2), .. })
    ));
    assert!(matches!(store.clone_range(VolumeId(1), 0, VolumeId(1), 4 * B, 8 * B), Err(StoreError::Invalid(_))));
    assert!(matches!(
        store.clone_range(VolumeId(1), 0, VolumeId(7), 0, B),
        Err(StoreError::UnknownVolume(VolumeId(7)))
    ));
    assert!(matches!(store.block_checksums(VolumeId(1), 0, 2 * MIB), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(store.delete_volume(VolumeId(8)), Err(StoreError::UnknownVolume(VolumeId(8)))));

    assert_eq!(store.last_lsn(), lsn);
    assert_eq!(store.space().live_bytes, space);
    assert_eq!(read(&store, 1, 0, MIB), pattern(1, MIB as usize));
    assert_eq!(read(&store, 2, 0, MIB), vec![0u8; MIB as usize]);
    // Empty requests are fine.
    store.write(VolumeId(1), MIB, &[]).unwrap();
    store.read(VolumeId(1), MIB, &mut []).unwrap();
    store.write_zeroes(VolumeId(1), 0, 0).unwrap();
    store.clone_range(VolumeId(1), 0, VolumeId(1), 0, 0).unwrap();
    // `durable` of a position never handed out means "everything so far".
    store.durable(Lsn(u64::MAX)).await.unwrap();
}

/// The allocation map: written blocks are data, unwritten, trimmed and zeroed ones are holes,
/// from the index (before and after a checkpoint, and across reopen), merged into extents,
/// bounded in count; a clone shares its source's map.
#[tokio::test]
async fn extents_report_exactly_the_blocks_that_hold_data() {
    use tandem_storage::Extent;
    let (data, hole) = (|len| Extent { len, allocated: true }, |len| Extent { len, allocated: false });
    let dir = tempfile::tempdir().unwrap();
    let gib = 1024 * MIB;
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.create_volume(VolumeId(1), 64 * gib).unwrap();
        assert_eq!(
            store.extents(VolumeId(1), 0, 64 * gib, 16).unwrap(),
            vec![hole(64 * gib)],
            "a new volume is one hole"
        );
        store.write(VolumeId(1), 0, &pattern(1, MIB as usize)).unwrap();
        store.write(VolumeId(1), 40 * gib + 7 * B, &pattern(2, 3 * B as usize)).unwrap();
        store.write(VolumeId(1), 64 * gib - B, &pattern(3, B as usize)).unwrap();
        store.write_zeroes(VolumeId(1), 4 * B, 2 * B).unwrap();
        let want = vec![
            data(4 * B),
            hole(2 * B),
            data(MIB - 6 * B),
            hole(40 * gib + 7 * B - MIB),
            data(3 * B),
            hole(64 * gib - B - (40 * gib + 10 * B)),
            data(B),
        ];
        assert_eq!(store.extents(VolumeId(1), 0, 64 * gib, 16).unwrap(), want);
        sync(&store).await;
        // Partial blocks count whole; a window inside one extent is that extent.
        assert_eq!(store.extents(VolumeId(1), 100, 200, 16).unwrap(), vec![data(200)]);
        assert_eq!(store.extents(VolumeId(1), 4 * B + 5, B, 16).unwrap(), vec![hole(B)]);
        assert_eq!(store.extents(VolumeId(1), 4 * B + 5, 2 * B, 16).unwrap(), vec![hole(2 * B - 5), data(5)]);
        // At most `max` extents, from the start.
        assert_eq!(store.extents(VolumeId(1), 0, 64 * gib, 3).unwrap(), want[..3].to_vec());
        assert_eq!(store.extents(VolumeId(1), 0, 64 * gib, 1).unwrap(), want[..1].to_vec());
        // A clone of the whole volume has the same map.
        store.create_volume(VolumeId(2), 64 * gib).unwrap();
        store.clone_range(VolumeId(1), 0, VolumeId(2), 0, 64 * gib).unwrap();
        assert_eq!(store.extents(VolumeId(2), 0, 64 * gib, 16).unwrap(), want);
        assert!(store.extents(VolumeId(1), 64 * gib - B, 2 * B, 4).is_err(), "past the end");
        assert!(store.extents(VolumeId(9), 0, B, 4).is_err(), "no such volume");
        sync(&store).await;
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.extents(VolumeId(2), 40 * gib, 8 * B, 16).unwrap(), vec![hole(7 * B), data(B)]);
}
