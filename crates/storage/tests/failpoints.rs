//! The store's failpoints (a `failpoints` build only: `cargo test -p tandem-storage --features
//! failpoints`): a `return` at either side of the flush's `fdatasync` is that flush's I/O error,
//! which poisons the store as a failed `fdatasync` does, until it is reopened. One test: the
//! failpoint registry is per process, and a test binary is one process.
#![cfg(feature = "failpoints")]

use tandem_storage::failpoints::{JOURNAL_AFTER_FSYNC, JOURNAL_BEFORE_FSYNC};
use tandem_storage::{BlockStore, SledStore, StoreError};
use tandem_types::VolumeId;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn a_failpoint_at_the_fsync_fails_the_flush_and_poisons_the_store_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    for name in [JOURNAL_BEFORE_FSYNC, JOURNAL_AFTER_FSYNC] {
        let store = SledStore::open(dir.path()).unwrap();
        if store.volumes().is_empty() {
            store.create_volume(VolumeId(1), 8 * MIB).unwrap();
        }
        let lsn = store.write(VolumeId(1), 0, &[1u8; 4096]).unwrap();
        store.durable(lsn).await.expect("durable before the failpoint is set");

        fail::cfg(name, "return").expect("cfg");
        let lsn = store.write(VolumeId(1), 4096, &[2u8; 4096]).unwrap();
        let err = store.durable(lsn).await.expect_err("a flush through the failpoint fails");
        assert!(matches!(err, StoreError::Failed(ref why) if why.contains(name)), "{name}: {err}");
        assert!(store.write(VolumeId(1), 8192, &[3u8; 4096]).is_err(), "{name}: a poisoned store takes no writes");
        fail::remove(name);
        assert!(store.write(VolumeId(1), 8192, &[3u8; 4096]).is_err(), "{name}: poisoned until reopened");
        drop(store);

        let store = SledStore::open(dir.path()).unwrap();
        let lsn = store.write(VolumeId(1), 8192, &[4u8; 4096]).unwrap();
        store.durable(lsn).await.expect("a reopened store flushes again");
        let mut buf = vec![0u8; 4096];
        store.read(VolumeId(1), 0, &mut buf).unwrap();
        assert_eq!(buf, vec![1u8; 4096], "{name}: what was durable before the failure is still there");
    }
}
