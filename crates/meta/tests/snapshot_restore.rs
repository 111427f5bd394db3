//! Property: a snapshot built by the sled state machine, installed into a fresh one, reproduces
//! the state exactly; and a state machine reopened from its sled files has the same state.

use std::net::SocketAddr;
use tandem_types::{Epoch, NodeId, VolumeId};

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftSnapshotBuilder};
use proptest::prelude::*;
use tandem_clustermap::{MetaCmd, NodeRecord};
use tandem_meta::state_machine::{SmState, StateMachine};
use tandem_meta::TypeConfig;
use tandem_types::{Layer, TransportKind};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn cmd() -> impl Strategy<Value = MetaCmd> {
    prop_oneof![
        (1u64..8, 1u16..5, "[a-c]").prop_map(|(id, p, site)| MetaCmd::RegisterNode(NodeRecord {
            id: NodeId(id),
            site,
            raft_addr: addr(7000 + 10 * p),
            api_addr: addr(8000 + p),
            nbd_addr: addr(9000 + p),
            extra_nbd_addrs: Vec::new(),
            iscsi_addr: None,
        })),
        (1u64..8).prop_map(|id| MetaCmd::RemoveNode { id: NodeId(id) }),
        ("[a-e]", "[a-z0-9]{0,16}").prop_map(|(key, value)| MetaCmd::PutSetting { key, value }),
        "[a-e]".prop_map(|key| MetaCmd::DeleteSetting { key }),
        (any::<bool>(), any::<bool>()).prop_map(|(data, quic)| MetaCmd::SetTransport {
            layer: if data { Layer::Data } else { Layer::Control },
            kind: if quic { TransportKind::Quic } else { TransportKind::Tcp },
        }),
        ("[pq]", proptest::option::of(1u32..4), proptest::option::of("[a-c]"))
            .prop_map(|(name, replicas, preferred_site)| MetaCmd::CreateDataset { name, replicas, preferred_site }),
        "[pq]".prop_map(|name| MetaCmd::DeleteDataset { name }),
        ("[vw]", proptest::option::of("[pq]"), 1u64..4).prop_map(|(name, dataset, blocks)| MetaCmd::CreateVolume {
            name,
            dataset,
            size_bytes: blocks * tandem_types::BLOCK_BYTES
        }),
        "[vw]".prop_map(|name| MetaCmd::DeleteVolume { name }),
        (1u64..4, 1u64..3, 1u64..3, proptest::collection::vec(1u64..8, 1..4)).prop_map(
            |(volume, epoch, isr_version, isr)| MetaCmd::SetVolumeIsr {
                volume: VolumeId(volume),
                epoch: Epoch(epoch),
                isr_version,
                isr: isr.into_iter().map(NodeId).collect()
            }
        ),
        (1u64..4, 1u64..3, 1u64..8, proptest::collection::vec(1u64..8, 1..4)).prop_map(
            |(volume, epoch, primary, isr)| MetaCmd::Failover {
                volume: VolumeId(volume),
                epoch: Epoch(epoch),
                primary: NodeId(primary),
                isr: isr.into_iter().map(NodeId).collect()
            }
        ),
        (1u64..4, 1u64..8, 0u64..10).prop_map(|(volume, node, done_bytes)| MetaCmd::SetResyncProgress {
            volume: VolumeId(volume),
            node: NodeId(node),
            done_bytes,
            total_bytes: 10
        }),
    ]
}

fn entries(cmds: Vec<MetaCmd>) -> Vec<Entry<TypeConfig>> {
    let leader = CommittedLeaderId::new(1, NodeId(1));
    let mut out = vec![Entry {
        log_id: LogId::new(leader, 1),
        payload: EntryPayload::Membership(Membership::new(vec![[1u64, 2, 3].into_iter().map(NodeId).collect()], None)),
    }];
    for (i, c) in cmds.into_iter().enumerate() {
        out.push(Entry { log_id: LogId::new(leader, i as u64 + 2), payload: EntryPayload::Normal(c) });
    }
    out
}

fn state(sm: &StateMachine) -> SmState {
    sm.reader().read(|s| s.clone())
}

async fn check(cmds: Vec<MetaCmd>, split: usize) -> Result<(), TestCaseError> {
    let dir_a = tempfile::tempdir().expect("dir");
    let dir_b = tempfile::tempdir().expect("dir");
    let db_a = sled::Config::new().path(dir_a.path()).open().expect("sled");
    let mut a = StateMachine::open(&db_a, dir_a.path()).expect("open");
    let all = entries(cmds);
    let split = split.min(all.len());
    // Apply in two batches, as openraft does.
    a.apply(all[..split].to_vec()).await.expect("apply");
    a.apply(all[split..].to_vec()).await.expect("apply");
    let before = state(&a);
    prop_assert_eq!(before.last_applied.map(|l| l.index), Some(all.len() as u64));

    let snapshot = a.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let db_b = sled::Config::new().path(dir_b.path()).open().expect("sled");
    let mut b = StateMachine::open(&db_b, dir_b.path()).expect("open");
    b.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
    prop_assert_eq!(&state(&b), &before);

    // Both survive a reopen from their files.
    drop(a);
    drop(b);
    let a = StateMachine::open(&db_a, dir_a.path()).expect("reopen");
    prop_assert_eq!(&state(&a), &before);
    let b = StateMachine::open(&db_b, dir_b.path()).expect("reopen");
    prop_assert_eq!(&state(&b), &before);
    let mut b = b;
    let current = b.get_current_snapshot().await.expect("read").expect("a snapshot");
    prop_assert_eq!(current.meta.last_log_id, before.last_applied);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn snapshot_restore_reproduces_the_state(cmds in proptest::collection::vec(cmd(), 0..40), split in 0usize..45) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(check(cmds, split))?;
    }
}

/// A snapshot larger than a network frame (16 MiB: about 6,000 settings of 4 KiB here; a big
/// cluster's map gets there too) installs: it is decoded with the snapshot limits, not a
/// frame's. Before, such a snapshot failed to decode and a new node could never catch up.
#[test]
fn a_snapshot_larger_than_a_frame_installs() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let value = "x".repeat(tandem_types::SETTING_VALUE_BYTES_MAX);
        let cmds: Vec<MetaCmd> =
            (0..6000).map(|i| MetaCmd::PutSetting { key: format!("k{i:05}"), value: value.clone() }).collect();
        let dir_a = tempfile::tempdir().expect("dir");
        let db_a = sled::Config::new().path(dir_a.path()).open().expect("sled");
        let mut a = StateMachine::open(&db_a, dir_a.path()).expect("open");
        a.apply(entries(cmds)).await.expect("apply");
        let snapshot = a.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let bytes = snapshot.snapshot.get_ref().len();
        assert!(bytes > tandem_types::FRAME_BYTES_MAX, "the snapshot takes {bytes} bytes, not more than a frame");
        let dir_b = tempfile::tempdir().expect("dir");
        let db_b = sled::Config::new().path(dir_b.path()).open().expect("sled");
        let mut b = StateMachine::open(&db_b, dir_b.path()).expect("open");
        b.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
        assert_eq!(state(&b), state(&a));
    });
}
