//! The state machine's failpoint (a `failpoints` build only: `cargo test -p tandem-meta
//! --features failpoints`): `snapshot-before-install=return` fails a snapshot's installation
//! with a `StorageError` and leaves the state as it was; once cleared, the same snapshot
//! installs. Its own test binary: the failpoint registry is per process.
#![cfg(feature = "failpoints")]

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftSnapshotBuilder};
use tandem_clustermap::MetaCmd;
use tandem_meta::failpoints::SNAPSHOT_BEFORE_INSTALL;
use tandem_meta::state_machine::StateMachine;
use tandem_meta::TypeConfig;
use tandem_types::NodeId;

fn entries() -> Vec<Entry<TypeConfig>> {
    let leader = CommittedLeaderId::new(1, NodeId(1));
    vec![
        Entry {
            log_id: LogId::new(leader, 1),
            payload: EntryPayload::Membership(Membership::new(vec![[NodeId(1)].into_iter().collect()], None)),
        },
        Entry {
            log_id: LogId::new(leader, 2),
            payload: EntryPayload::Normal(MetaCmd::PutSetting { key: "k".into(), value: "v".into() }),
        },
    ]
}

#[tokio::test]
async fn the_snapshot_failpoint_fails_the_install_with_a_storage_error_and_changes_nothing() {
    let dir_a = tempfile::tempdir().expect("dir");
    let db_a = sled::Config::new().path(dir_a.path()).open().expect("sled");
    let mut a = StateMachine::open(&db_a, dir_a.path()).expect("open");
    a.apply(entries()).await.expect("apply");
    let want = a.reader().read(|s| s.clone());

    let dir_b = tempfile::tempdir().expect("dir");
    let db_b = sled::Config::new().path(dir_b.path()).open().expect("sled");
    let mut b = StateMachine::open(&db_b, dir_b.path()).expect("open");
    let empty = b.reader().read(|s| s.clone());

    fail::cfg(SNAPSHOT_BEFORE_INSTALL, "return").expect("cfg");
    let snapshot = a.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let err = b.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect_err("the failpoint fails it");
    assert!(err.to_string().contains(SNAPSHOT_BEFORE_INSTALL), "{err}");
    assert_eq!(b.reader().read(|s| s.clone()), empty, "a failed install changes nothing");
    assert!(b.get_current_snapshot().await.expect("read").is_none());

    fail::cfg(SNAPSHOT_BEFORE_INSTALL, "off").expect("cfg");
    let snapshot = a.get_snapshot_builder().await.build_snapshot().await.expect("build");
    b.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("installs once cleared");
    assert_eq!(b.reader().read(|s| s.clone()), want);
}
