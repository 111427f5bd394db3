//! The map's unit and property tests: every command through [`ClusterMap::apply`], refusals that
//! change nothing, the volume invariants under random commands, and persistence by touched keys.

use std::collections::{BTreeMap, BTreeSet};

use tandem_paths::VolumePaths;
use tandem_reservations::{Kind, Nexus, Op, Range, Refusal};
use tandem_types::{
    Epoch, Layer, NodeId, TransportKind, VolumeId, BLOCK_BYTES, SETTING_VALUE_BYTES_MAX, VOLUME_BYTES_MAX,
};

use proptest::prelude::*;

use crate::volumes::is_sorted_set;
use crate::*;

/// Node ids from their numbers.
fn ids(ids: &[u64]) -> Vec<NodeId> {
    ids.iter().copied().map(NodeId).collect()
}

fn node(id: NodeId, port: u16) -> NodeRecord {
    NodeRecord {
        id,
        site: "a".into(),
        raft_addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        api_addr: format!("127.0.0.1:{}", port + 1).parse().expect("addr"),
        nbd_addr: format!("127.0.0.1:{}", port + 2).parse().expect("addr"),
        extra_nbd_addrs: Vec::new(),
        iscsi_addr: None,
    }
}

#[test]
fn register_update_and_remove_nodes() {
    let mut m = ClusterMap::default();
    assert_eq!(m.apply(MetaCmd::RegisterNode(node(NodeId(1), 7000))), MetaReply::Done { changed: true });
    assert_eq!(m.apply(MetaCmd::RegisterNode(node(NodeId(1), 7000))), MetaReply::Done { changed: false });
    let mut moved = node(NodeId(1), 7000);
    moved.site = "b".into();
    assert_eq!(m.apply(MetaCmd::RegisterNode(moved.clone())), MetaReply::Done { changed: true });
    assert_eq!(m.nodes[&NodeId(1)], moved);
    assert_eq!(m.take_touched(), vec![ObjectKey::Node(NodeId(1))]);
    assert!(matches!(m.apply(MetaCmd::RemoveNode { id: NodeId(9) }), MetaReply::NotFound(_)));
    assert_eq!(m.apply(MetaCmd::RemoveNode { id: NodeId(1) }), MetaReply::Done { changed: true });
    assert!(m.nodes.is_empty());
    assert_eq!(m.take_touched(), vec![ObjectKey::Node(NodeId(1))]);
}

#[test]
fn invalid_commands_change_nothing() {
    let mut m = ClusterMap::default();
    m.apply(MetaCmd::RegisterNode(node(NodeId(1), 7000)));
    m.take_touched();
    let before = m.clone();
    assert!(matches!(m.apply(MetaCmd::RegisterNode(node(NodeId(0), 7100))), MetaReply::Invalid(_)));
    let mut bad_site = node(NodeId(2), 7200);
    bad_site.site = "a b".into();
    assert!(matches!(m.apply(MetaCmd::RegisterNode(bad_site)), MetaReply::Invalid(_)));
    // Another node on node 1's raft address.
    assert!(matches!(m.apply(MetaCmd::RegisterNode(node(NodeId(3), 7000))), MetaReply::Invalid(_)));
    assert!(matches!(m.apply(MetaCmd::PutSetting { key: "../x".into(), value: "v".into() }), MetaReply::Invalid(_)));
    assert!(matches!(
        m.apply(MetaCmd::PutSetting { key: "k".into(), value: "v".repeat(SETTING_VALUE_BYTES_MAX + 1) }),
        MetaReply::Invalid(_)
    ));
    assert!(matches!(m.apply(MetaCmd::DeleteSetting { key: "nope".into() }), MetaReply::NotFound(_)));
    assert_eq!(m, before);
    assert!(m.take_touched().is_empty());
}

#[test]
fn setting_compare_and_set_changes_only_what_it_expected() {
    let mut m = ClusterMap::default();
    let cas = |m: &mut ClusterMap, expect: Option<&str>, value: &str| {
        m.apply(MetaCmd::CasSetting { key: "k".into(), expect: expect.map(str::to_string), value: value.into() })
    };
    assert!(matches!(cas(&mut m, Some("1"), "2"), MetaReply::Conflict(_)));
    assert!(m.settings.is_empty());
    assert_eq!(cas(&mut m, None, "1"), MetaReply::Done { changed: true });
    assert_eq!(cas(&mut m, None, "2"), MetaReply::Conflict("setting \"k\" holds \"1\"".into()));
    assert!(matches!(cas(&mut m, Some("0"), "2"), MetaReply::Conflict(_)));
    assert_eq!(cas(&mut m, Some("1"), "2"), MetaReply::Done { changed: true });
    assert_eq!(m.settings["k"], "2");
    assert!(matches!(
        m.apply(MetaCmd::CasSetting { key: "../k".into(), expect: None, value: "v".into() }),
        MetaReply::Conflict(_) | MetaReply::Invalid(_)
    ));
}

#[test]
fn settings_put_overwrite_delete() {
    let mut m = ClusterMap::default();
    assert_eq!(m.apply(MetaCmd::PutSetting { key: "k".into(), value: "1".into() }), MetaReply::Done { changed: true });
    assert_eq!(m.apply(MetaCmd::PutSetting { key: "k".into(), value: "1".into() }), MetaReply::Done { changed: false });
    assert_eq!(m.apply(MetaCmd::PutSetting { key: "k".into(), value: "2".into() }), MetaReply::Done { changed: true });
    assert_eq!(m.settings["k"], "2");
    assert_eq!(m.apply(MetaCmd::DeleteSetting { key: "k".into() }), MetaReply::Done { changed: true });
    assert!(m.settings.is_empty());
}

#[test]
fn a_batch_applies_each_command_in_order_and_does_not_nest() {
    let mut m = ClusterMap::default();
    let reply = m.apply(MetaCmd::Batch(vec![
        MetaCmd::PutSetting { key: "a".into(), value: "1".into() },
        MetaCmd::DeleteSetting { key: "missing".into() },
        MetaCmd::Batch(vec![]),
        MetaCmd::PutSetting { key: "a".into(), value: "2".into() },
    ]));
    let MetaReply::Batch(replies) = reply else { panic!("not a batch reply: {reply:?}") };
    assert_eq!(replies.len(), 4);
    assert_eq!(replies[0], MetaReply::Done { changed: true });
    assert!(matches!(replies[1], MetaReply::NotFound(_)));
    assert!(matches!(replies[2], MetaReply::Invalid(_)));
    assert_eq!(replies[3], MetaReply::Done { changed: true });
    assert_eq!(m.settings["a"], "2");
}

#[test]
fn object_keys_round_trip_and_sort_numerically() {
    for key in [
        ObjectKey::Node(NodeId(1)),
        ObjectKey::Node(NodeId(u64::MAX)),
        ObjectKey::Setting("a.b-c".into()),
        ObjectKey::Transport(Layer::Data),
        ObjectKey::Transport(Layer::Control),
        ObjectKey::Dataset("pod-1".into()),
        ObjectKey::Volume(VolumeId(7)),
        ObjectKey::Volume(VolumeId(u64::MAX)),
        ObjectKey::NextVolumeId,
    ] {
        assert_eq!(ObjectKey::decode(&key.encode()), Some(key));
    }
    assert!(ObjectKey::Node(NodeId(2)).encode() < ObjectKey::Node(NodeId(10)).encode());
    assert!(ObjectKey::Volume(VolumeId(9)).encode() < ObjectKey::Volume(VolumeId(10)).encode());
    assert_eq!(ObjectKey::decode(b"volume/x"), None);
    assert_eq!(ObjectKey::decode(b"counter/other"), None);
    assert_eq!(ObjectKey::decode(b"junk"), None);
    assert_eq!(ObjectKey::decode(b"node/x"), None);
}

fn node_at(id: NodeId, site: &str) -> NodeRecord {
    let mut n = node(id, 7000 + 10 * id.get() as u16);
    n.site = site.into();
    n
}

/// A map with nodes 1..=5: 1, 2, 3 in site `a`, 4, 5 in site `b`.
fn two_sites() -> ClusterMap {
    let mut m = ClusterMap::default();
    for (id, site) in [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "b")] {
        assert_eq!(m.apply(MetaCmd::RegisterNode(node_at(NodeId(id), site))), MetaReply::Done { changed: true });
    }
    m.take_touched();
    m
}

fn create_dataset(name: &str, replicas: Option<u32>, site: Option<&str>) -> MetaCmd {
    MetaCmd::CreateDataset { name: name.into(), replicas, preferred_site: site.map(str::to_string) }
}

fn create_volume(name: &str, dataset: Option<&str>, size_bytes: u64) -> MetaCmd {
    MetaCmd::CreateVolume { name: name.into(), dataset: dataset.map(str::to_string), size_bytes }
}

const DONE: MetaReply = MetaReply::Done { changed: true };
const SAME: MetaReply = MetaReply::Done { changed: false };
const MIB: u64 = 1 << 20;

fn invalid(reply: MetaReply, needle: &str) {
    match reply {
        MetaReply::Invalid(m) => assert!(m.contains(needle), "{m:?} does not mention {needle:?}"),
        other => panic!("expected Invalid mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn placement_spreads_over_sites_with_the_preferred_site_first() {
    let m = two_sites();
    // Sites take turns: preferred first, then the others by name; nodes by id.
    assert_eq!(m.place(1, Some("b")), ids(&[4]));
    assert_eq!(m.place(2, Some("b")), ids(&[1, 4]));
    assert_eq!(m.place(3, Some("b")), ids(&[1, 4, 5]));
    assert_eq!(m.place(4, Some("b")), ids(&[1, 2, 4, 5]));
    assert_eq!(m.place(5, Some("b")), ids(&[1, 2, 3, 4, 5]));
    assert_eq!(m.place(2, Some("a")), ids(&[1, 4]));
    assert_eq!(m.place(3, Some("a")), ids(&[1, 2, 4]));
    assert_eq!(m.place(2, None), ids(&[1, 4]));
    assert_eq!(m.place(1, None), ids(&[1]));
    assert_eq!(ClusterMap::default().place(2, None), Vec::<NodeId>::new());
}

#[test]
fn datasets_create_idempotently_and_refuse_bad_parameters() {
    let mut m = two_sites();
    assert_eq!(m.apply(create_dataset("pod", Some(2), Some("b"))), DONE);
    assert_eq!(
        m.datasets["pod"],
        DatasetRecord { name: "pod".into(), replicas: vec![NodeId(1), NodeId(4)], preferred_site: Some("b".into()) }
    );
    assert_eq!(m.take_touched(), vec![ObjectKey::Dataset("pod".into())]);
    // The same again: nothing changes.
    assert_eq!(m.apply(create_dataset("pod", Some(2), Some("b"))), SAME);
    assert!(m.take_touched().is_empty());
    // Every node when no count is given.
    assert_eq!(m.apply(create_dataset("all", None, None)), DONE);
    assert_eq!(m.datasets["all"].replicas, ids(&[1, 2, 3, 4, 5]));
    assert_eq!(m.apply(create_dataset("all", None, None)), SAME);
    m.take_touched();

    let before = m.clone();
    invalid(m.apply(create_dataset("pod", Some(3), Some("b"))), "already exists");
    invalid(m.apply(create_dataset("pod", Some(2), None)), "already exists");
    invalid(m.apply(create_dataset("bad name", None, None)), "dataset name");
    invalid(m.apply(create_dataset("", None, None)), "dataset name");
    invalid(m.apply(create_dataset("p2", Some(0), None)), "between 1 and");
    invalid(m.apply(create_dataset("p2", Some(6), None)), "between 1 and the number of nodes (5)");
    invalid(m.apply(create_dataset("p2", None, Some("a/b"))), "preferred site");
    invalid(m.apply(create_dataset("p2", None, Some("mars"))), "no node is in site \"mars\"");
    assert_eq!(m, before);
    assert!(m.take_touched().is_empty());
    // No nodes at all: no dataset.
    invalid(ClusterMap::default().apply(create_dataset("p", None, None)), "between 1 and");

    assert_eq!(m.apply(MetaCmd::DeleteDataset { name: "all".into() }), DONE);
    assert_eq!(m.take_touched(), vec![ObjectKey::Dataset("all".into())]);
    assert!(matches!(m.apply(MetaCmd::DeleteDataset { name: "all".into() }), MetaReply::NotFound(_)));
}

#[test]
fn volumes_are_placed_in_their_dataset_and_get_fresh_ids() {
    let mut m = two_sites();
    m.apply(create_dataset("pod", Some(3), Some("b")));
    m.take_touched();
    assert_eq!(m.apply(create_volume("v1", Some("pod"), 64 * MIB)), DONE);
    let v1 = m.volume_by_name("v1").expect("v1").clone();
    assert_eq!(v1.id, VolumeId(1));
    assert_eq!(v1.dataset, "pod");
    assert_eq!(v1.replicas, ids(&[1, 4, 5]));
    assert_eq!(v1.isr, v1.replicas);
    assert_eq!(v1.epoch, Epoch(1));
    assert!(v1.resync.is_empty());
    // Primaries go to the preferred site, spread by id: candidates [4, 5], id 1 -> 5.
    assert_eq!(v1.primary, NodeId(5));
    assert_eq!(m.take_touched(), vec![ObjectKey::Volume(VolumeId(1)), ObjectKey::NextVolumeId]);
    // An identical create changes nothing and allocates no id.
    assert_eq!(m.apply(create_volume("v1", Some("pod"), 64 * MIB)), SAME);
    assert!(m.take_touched().is_empty());
    assert_eq!(m.next_volume_id, VolumeId(2));
    assert_eq!(m.apply(create_volume("v2", Some("pod"), 4096)), DONE);
    assert_eq!(m.volume_by_name("v2").expect("v2").primary, NodeId(4));

    // No dataset named: the default one, made on first use with every node.
    assert_eq!(m.apply(create_volume("v3", None, MIB)), DONE);
    assert_eq!(m.datasets[DEFAULT_DATASET].replicas, ids(&[1, 2, 3, 4, 5]));
    assert_eq!(m.datasets[DEFAULT_DATASET].preferred_site, None);
    let v3 = m.volume_by_name("v3").expect("v3");
    assert_eq!((v3.id, v3.primary), (VolumeId(3), NodeId(4))); // replicas[3 % 5]
    assert_eq!(
        m.take_touched(),
        vec![
            ObjectKey::Dataset(DEFAULT_DATASET.into()),
            ObjectKey::Volume(VolumeId(2)),
            ObjectKey::Volume(VolumeId(3)),
            ObjectKey::NextVolumeId
        ]
    );
    // Naming the default dataset is the same as naming none.
    assert_eq!(m.apply(create_volume("v3", Some(DEFAULT_DATASET), MIB)), SAME);

    // Ids are never reused, names are.
    assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v1".into() }), DONE);
    assert_eq!(m.take_touched(), vec![ObjectKey::Volume(VolumeId(1))]);
    assert!(matches!(m.apply(MetaCmd::DeleteVolume { name: "v1".into() }), MetaReply::NotFound(_)));
    assert_eq!(m.apply(create_volume("v1", Some("pod"), 64 * MIB)), DONE);
    assert_eq!(m.volume_by_name("v1").expect("v1").id, VolumeId(4));
}

#[test]
fn a_volume_whose_preferred_site_has_no_replica_left_takes_any_replica() {
    let mut m = two_sites();
    m.apply(create_dataset("pod", Some(2), Some("b")));
    // Node 4 moves to site a: the dataset's replicas [1, 4] no longer include site b.
    m.apply(MetaCmd::RegisterNode(node_at(NodeId(4), "a")));
    assert_eq!(m.apply(create_volume("v", Some("pod"), MIB)), DONE);
    assert_eq!(m.volume_by_name("v").expect("v").primary, NodeId(4)); // replicas[1 % 2]
}

#[test]
fn bad_volumes_are_refused_and_change_nothing() {
    let mut m = two_sites();
    m.apply(create_dataset("pod", Some(2), None));
    m.apply(create_volume("v", Some("pod"), MIB));
    m.take_touched();
    let before = m.clone();
    invalid(m.apply(create_volume("bad name", None, MIB)), "volume name");
    invalid(m.apply(create_volume("x", None, 0)), "more than 0");
    invalid(m.apply(create_volume("x", None, 5000)), "not a multiple of the block size");
    invalid(m.apply(create_volume("x", None, VOLUME_BYTES_MAX + BLOCK_BYTES)), "exceeds the maximum");
    invalid(m.apply(create_volume("x", Some("nope"), MIB)), "no dataset named \"nope\"");
    invalid(m.apply(create_volume("v", Some("pod"), 2 * MIB)), "already exists");
    invalid(m.apply(create_volume("v", None, MIB)), "already exists");
    // A dataset with volumes stays, and so do the nodes holding them.
    invalid(m.apply(MetaCmd::DeleteDataset { name: "pod".into() }), "still has volumes [v]");
    invalid(m.apply(MetaCmd::RemoveNode { id: NodeId(4) }), "node 4 holds replicas of datasets [pod] and volumes [v]");
    assert_eq!(m, before);
    assert!(m.take_touched().is_empty());
    // The default dataset is not made by a create that fails.
    assert!(!m.datasets.contains_key(DEFAULT_DATASET));
    // No nodes: no default dataset, no volume.
    let mut empty = ClusterMap::default();
    invalid(empty.apply(create_volume("v", None, MIB)), "default dataset");
    assert_eq!(empty, ClusterMap::default());

    // Once they are gone, the node can leave; a node in no dataset always could.
    assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v".into() }), DONE);
    invalid(m.apply(MetaCmd::RemoveNode { id: NodeId(4) }), "datasets [pod]");
    assert_eq!(m.apply(MetaCmd::RemoveNode { id: NodeId(2) }), DONE);
    assert_eq!(m.apply(MetaCmd::DeleteDataset { name: "pod".into() }), DONE);
    assert_eq!(m.apply(MetaCmd::RemoveNode { id: NodeId(4) }), DONE);
}

/// A map with volume 1 on replicas [1, 2, 3], primary 2 (replicas[1 % 3]).
fn one_volume() -> ClusterMap {
    let mut m = ClusterMap::default();
    for id in 1..=4 {
        m.apply(MetaCmd::RegisterNode(node_at(NodeId(id), "a")));
    }
    assert_eq!(m.apply(create_dataset("pod", Some(3), None)), DONE);
    assert_eq!(m.apply(create_volume("v", Some("pod"), MIB)), DONE);
    let v = &m.volumes[&VolumeId(1)];
    assert_eq!((v.replicas.clone(), v.primary), (vec![NodeId(1), NodeId(2), NodeId(3)], NodeId(2)));
    m.take_touched();
    m
}

/// An ISR change computed on the map's current ISR version.
fn isr(m: &ClusterMap, volume: VolumeId, epoch: Epoch, isr: &[NodeId]) -> MetaCmd {
    let isr_version = m.volumes.get(&volume).map_or(1, |v| v.isr_version);
    MetaCmd::SetVolumeIsr { volume, epoch, isr_version, isr: isr.to_vec() }
}

#[test]
fn the_primary_shrinks_and_grows_its_isr_by_compare_and_set() {
    let mut m = one_volume();
    // Shrink: given in any order, stored sorted.
    assert_eq!(m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(2), NodeId(1)])), DONE);
    assert_eq!(m.volumes[&VolumeId(1)].isr, ids(&[1, 2]));
    assert_eq!(m.take_touched(), vec![ObjectKey::Volume(VolumeId(1))]);
    assert_eq!(m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2)])), SAME);
    assert!(m.take_touched().is_empty());

    let before = m.clone();
    invalid(m.apply(isr(&m, VolumeId(1), Epoch(2), &[NodeId(1), NodeId(2), NodeId(3)])), "stale primary");
    invalid(m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(3)])), "must contain the primary 2");
    invalid(m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(2), NodeId(4)])), "node 4 is not a replica");
    invalid(m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(2), NodeId(2)])), "names a node twice");
    assert!(matches!(m.apply(isr(&m, VolumeId(9), Epoch(1), &[NodeId(2)])), MetaReply::NotFound(_)));
    assert_eq!(m, before);
    assert!(m.take_touched().is_empty());

    // Node 3 resyncs, then rejoins: its progress entry goes with the grow.
    let progress =
        |done| MetaCmd::SetResyncProgress { volume: VolumeId(1), node: NodeId(3), done_bytes: done, total_bytes: MIB };
    assert_eq!(m.apply(progress(4096)), DONE);
    assert_eq!(m.apply(progress(4096)), SAME);
    assert_eq!(m.apply(progress(MIB)), DONE);
    assert_eq!(m.volumes[&VolumeId(1)].resync[&NodeId(3)], ResyncProgress { done_bytes: MIB, total_bytes: MIB });
    assert_eq!(m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2), NodeId(3)])), DONE);
    assert_eq!(m.volumes[&VolumeId(1)].isr, ids(&[1, 2, 3]));
    assert!(m.volumes[&VolumeId(1)].resync.is_empty());
    assert_eq!(m.volumes[&VolumeId(1)].epoch, Epoch(1), "an ISR change does not change the epoch");
}

#[test]
fn an_isr_change_computed_on_a_stale_isr_is_refused_and_a_retry_is_a_no_op() {
    let mut m = one_volume();
    assert_eq!(m.volumes[&VolumeId(1)].isr_version, 1);
    let shrink = isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2)]);
    assert_eq!(m.apply(shrink.clone()), DONE);
    assert_eq!(m.volumes[&VolumeId(1)].isr_version, 2);
    // The same proposal again (its first reply was lost): unchanged, no new version.
    assert_eq!(m.apply(shrink.clone()), SAME);
    assert_eq!(m.volumes[&VolumeId(1)].isr_version, 2);
    let grow = isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2), NodeId(3)]);
    assert_eq!(m.apply(grow), DONE);
    assert_eq!(m.volumes[&VolumeId(1)].isr_version, 3);
    // The shrink arrives once more, late: it was computed on version 1 and must not undo
    // the grow.
    let before = m.clone();
    invalid(m.apply(shrink), "stale ISR");
    assert_eq!(m, before);
    // A failover moves the version on too.
    let failover =
        MetaCmd::Failover { volume: VolumeId(1), epoch: Epoch(1), primary: NodeId(3), isr: vec![NodeId(1), NodeId(3)] };
    assert_eq!(m.apply(failover), DONE);
    assert_eq!(m.volumes[&VolumeId(1)].isr_version, 4);
}

#[test]
fn resync_progress_is_only_for_replicas_outside_the_isr() {
    let mut m = one_volume();
    m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2)]));
    m.take_touched();
    let before = m.clone();
    let progress = |node, done, total| MetaCmd::SetResyncProgress {
        volume: VolumeId(1),
        node,
        done_bytes: done,
        total_bytes: total,
    };
    invalid(m.apply(progress(NodeId(1), 0, MIB)), "is in the ISR");
    invalid(m.apply(progress(NodeId(4), 0, MIB)), "not a replica");
    invalid(m.apply(progress(NodeId(3), MIB + 1, MIB)), "past the end");
    assert!(matches!(
        m.apply(MetaCmd::SetResyncProgress { volume: VolumeId(7), node: NodeId(3), done_bytes: 0, total_bytes: 0 }),
        MetaReply::NotFound(_)
    ));
    assert_eq!(m, before);
    assert_eq!(m.apply(progress(NodeId(3), 10, MIB)), DONE);
    assert_eq!(m.apply(MetaCmd::ClearResync { volume: VolumeId(1), node: NodeId(3) }), DONE);
    assert_eq!(m.apply(MetaCmd::ClearResync { volume: VolumeId(1), node: NodeId(3) }), SAME);
    assert!(matches!(m.apply(MetaCmd::ClearResync { volume: VolumeId(7), node: NodeId(3) }), MetaReply::NotFound(_)));
    assert!(m.volumes[&VolumeId(1)].resync.is_empty());
}

#[test]
fn a_claim_takes_an_unclaimed_epoch_and_a_second_start_moves_to_the_next() {
    let mut m = one_volume();
    let claim = |epoch, primary, nonce| MetaCmd::ClaimPrimary { volume: VolumeId(1), epoch, primary, nonce };
    let p = m.volumes[&VolumeId(1)].primary;
    let other = if p == NodeId(1) { 2 } else { 1 };
    let before = m.clone();
    invalid(m.apply(claim(Epoch(1), NodeId(other), 7)), "the claim is stale");
    invalid(m.apply(claim(Epoch(2), p, 7)), "the claim is stale");
    assert!(matches!(
        m.apply(MetaCmd::ClaimPrimary { volume: VolumeId(9), epoch: Epoch(1), primary: p, nonce: 7 }),
        MetaReply::NotFound(_)
    ));
    assert_eq!(m, before);
    assert!(m.take_touched().is_empty());

    // A new volume's first primary claims epoch 1 as it is.
    assert_eq!(m.apply(claim(Epoch(1), p, 7)), DONE);
    assert_eq!((m.volumes[&VolumeId(1)].epoch, m.volumes[&VolumeId(1)].claim), (Epoch(1), Some(7)));
    assert_eq!(m.take_touched(), vec![ObjectKey::Volume(VolumeId(1))]);
    assert_eq!(m.apply(claim(Epoch(1), p, 7)), SAME, "a retry changes nothing");

    // The primary grows its ISR at epoch 1; the change is pending when the primary is
    // started again (a lease blip that outlasted the hold time, or a restart): the new
    // start claims with a new nonce and gets epoch 2, same primary, same ISR.
    assert_eq!(m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2)])), DONE);
    let grow_at_1 = isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2), NodeId(3)]);
    let isr_before = m.volumes[&VolumeId(1)].isr.clone();
    assert_eq!(m.apply(claim(Epoch(1), p, 8)), DONE);
    let v = &m.volumes[&VolumeId(1)];
    assert_eq!((v.epoch, v.primary, v.isr.clone(), v.claim), (Epoch(2), p, isr_before, Some(8)));
    // The earlier start's change commits late: refused by the epoch (finding 1 of issue 13).
    invalid(m.apply(grow_at_1), "stale primary");
    // The earlier start's claim arrives late too: refused.
    invalid(m.apply(claim(Epoch(1), p, 7)), "the claim is stale");
    assert_eq!(m.volumes[&VolumeId(1)].epoch, Epoch(2));

    // A failover leaves the new epoch unclaimed for the new primary.
    let q = *m.volumes[&VolumeId(1)].isr.iter().find(|&&n| n != p).expect("another member");
    assert_eq!(
        m.apply(MetaCmd::Failover { volume: VolumeId(1), epoch: Epoch(2), primary: q, isr: vec![p.min(q), p.max(q)] }),
        DONE
    );
    assert_eq!((m.volumes[&VolumeId(1)].epoch, m.volumes[&VolumeId(1)].claim), (Epoch(3), None));
    assert_eq!(m.apply(claim(Epoch(3), q, 9)), DONE);
    assert_eq!((m.volumes[&VolumeId(1)].epoch, m.volumes[&VolumeId(1)].claim), (Epoch(3), Some(9)));
}

#[test]
fn failover_picks_from_the_last_committed_isr_and_bumps_the_epoch() {
    let mut m = one_volume();
    let failover =
        |epoch, primary, isr: &[NodeId]| MetaCmd::Failover { volume: VolumeId(1), epoch, primary, isr: isr.to_vec() };
    m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(2), NodeId(3)]));
    m.take_touched();
    let before = m.clone();
    invalid(m.apply(failover(Epoch(1), NodeId(1), &[NodeId(1)])), "not in the last committed ISR");
    invalid(m.apply(failover(Epoch(1), NodeId(3), &[NodeId(1), NodeId(3)])), "node 1 is not in the last committed ISR");
    invalid(m.apply(failover(Epoch(1), NodeId(3), &[NodeId(2)])), "must contain the new primary 3");
    invalid(m.apply(failover(Epoch(2), NodeId(3), &[NodeId(3)])), "stale state");
    invalid(m.apply(failover(Epoch(1), NodeId(3), &[NodeId(3), NodeId(3)])), "names a node twice");
    assert!(matches!(
        m.apply(MetaCmd::Failover { volume: VolumeId(5), epoch: Epoch(1), primary: NodeId(3), isr: vec![NodeId(3)] }),
        MetaReply::NotFound(_)
    ));
    assert_eq!(m, before);
    assert!(m.take_touched().is_empty());

    assert_eq!(m.apply(failover(Epoch(1), NodeId(3), &[NodeId(3)])), DONE);
    let v = &m.volumes[&VolumeId(1)];
    assert_eq!((v.primary, v.isr.clone(), v.epoch), (NodeId(3), ids(&[3]), Epoch(2)));
    assert_eq!(m.take_touched(), vec![ObjectKey::Volume(VolumeId(1))]);
    // A retry of the same failover changes nothing.
    assert_eq!(m.apply(failover(Epoch(1), NodeId(3), &[NodeId(3)])), SAME);
    assert!(m.take_touched().is_empty());
    // The deposed primary's ISR change carries the old epoch and is refused.
    invalid(m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2), NodeId(3)])), "stale primary");
    // The new primary grows its ISR at the new epoch.
    assert_eq!(m.apply(isr(&m, VolumeId(1), Epoch(2), &[NodeId(1), NodeId(2), NodeId(3)])), DONE);
    assert_eq!(m.volumes[&VolumeId(1)].epoch, Epoch(2));
}

#[test]
fn objects_of_datasets_and_volumes_round_trip() {
    let mut m = one_volume();
    m.apply(isr(&m, VolumeId(1), Epoch(1), &[NodeId(1), NodeId(2)]));
    m.apply(MetaCmd::SetResyncProgress { volume: VolumeId(1), node: NodeId(3), done_bytes: 1, total_bytes: 2 });
    m.apply(create_volume("w", None, MIB));
    let rebuilt = ClusterMap::from_objects(m.objects()).expect("rebuild");
    assert_eq!(rebuilt, m);
    assert_eq!(rebuilt.next_volume_id, VolumeId(3));
    // A record stored under another record's key is refused.
    let wrong = vec![(ObjectKey::Volume(VolumeId(9)), Object::Volume(m.volumes[&VolumeId(1)].clone()))];
    assert!(ClusterMap::from_objects(wrong).is_err());
    let wrong = vec![(ObjectKey::Dataset("x".into()), Object::Dataset(m.datasets["pod"].clone()))];
    assert!(ClusterMap::from_objects(wrong).is_err());
}

fn cmd() -> impl Strategy<Value = MetaCmd> {
    let nodes = proptest::collection::vec(1u64..6, 0..4);
    prop_oneof![
        (1u64..6, 0u16..4, "[ab]").prop_map(|(id, p, site)| {
            let mut n = node(NodeId(id), 7000 + 10 * p);
            n.site = site;
            MetaCmd::RegisterNode(n)
        }),
        ("[pq]|default", proptest::option::of(0u32..6), proptest::option::of("[abc]"))
            .prop_map(|(name, replicas, preferred_site)| MetaCmd::CreateDataset { name, replicas, preferred_site }),
        "[pq]|default".prop_map(|name| MetaCmd::DeleteDataset { name }),
        ("[vw]", proptest::option::of("[pq]|default"), prop_oneof![Just(4096u64), Just(8192), Just(5000)])
            .prop_map(|(name, dataset, size_bytes)| MetaCmd::CreateVolume { name, dataset, size_bytes }),
        "[vw]".prop_map(|name| MetaCmd::DeleteVolume { name }),
        (1u64..4, 1u64..4, 1u64..4, nodes.clone()).prop_map(|(volume, epoch, isr_version, isr)| {
            MetaCmd::SetVolumeIsr { volume: VolumeId(volume), epoch: Epoch(epoch), isr_version, isr: ids(&isr) }
        }),
        (1u64..4, 1u64..4, 1u64..6, nodes.clone()).prop_map(|(volume, epoch, primary, isr)| MetaCmd::Failover {
            volume: VolumeId(volume),
            epoch: Epoch(epoch),
            primary: NodeId(primary),
            isr: ids(&isr)
        }),
        (1u64..4, 1u64..6, 0u64..3, 0u64..3).prop_map(|(volume, node, done_bytes, total_bytes)| {
            MetaCmd::SetResyncProgress { volume: VolumeId(volume), node: NodeId(node), done_bytes, total_bytes }
        }),
        (1u64..4, 1u64..6)
            .prop_map(|(volume, node)| MetaCmd::ClearResync { volume: VolumeId(volume), node: NodeId(node) }),
        (1u64..6).prop_map(|id| MetaCmd::RemoveNode { id: NodeId(id) }),
        ("[a-d]", "[a-z]{0,8}").prop_map(|(key, value)| MetaCmd::PutSetting { key, value }),
        "[a-d]".prop_map(|key| MetaCmd::DeleteSetting { key }),
        (any::<bool>(), any::<bool>()).prop_map(|(data, quic)| MetaCmd::SetTransport {
            layer: if data { Layer::Data } else { Layer::Control },
            kind: if quic { TransportKind::Quic } else { TransportKind::Tcp },
        }),
        ("[hk]", "[ab]", proptest::collection::vec("iqn\\.[ab]", 0..2))
            .prop_map(|(name, site, iqns)| MetaCmd::AddHost { name, site, iqns }),
        "[hk]".prop_map(|name| MetaCmd::RemoveHost { name }),
        ("[hk]", "[vw]", any::<bool>()).prop_map(|(host, volume, connect)| if connect {
            MetaCmd::ConnectHost { host, volume }
        } else {
            MetaCmd::DisconnectHost { host, volume }
        }),
        ("[hk]", 0u64..4, "[vw]", 1u64..4).prop_map(|(host, generation, volume, node)| MetaCmd::PublishPaths {
            host,
            generation,
            paths: vec![paths_of(&volume, NodeId(node))],
        }),
        (1u64..4, 1u64..3, "[hk]", 0u64..3, 0u64..3, 0u8..4, 0u64..6000).prop_map(
            |(volume, epoch, host, key, new_key, op, offset)| MetaCmd::Reserve {
                volume: VolumeId(volume),
                epoch: Epoch(epoch),
                id: key,
                nexus: Nexus::host(&host),
                op: match op {
                    0 => Op::Register {
                        key,
                        new_key,
                        ignore_existing: true,
                        all_ports: vec![],
                        aptpl: false,
                        also: vec![]
                    },
                    1 => Op::Reserve { key, kind: Kind::WriteExclusive },
                    2 => Op::ReserveRange { key, range: Range::new(offset, 1024), kind: Kind::ExclusiveAccess },
                    _ => Op::Clear { key },
                },
            }
        ),
        (1u64..4, 0u64..3, 0u128..3, 0u64..4, 1u64..3).prop_map(|(volume, block, nonce, now, life)| {
            MetaCmd::CreateToken {
                volume: VolumeId(volume),
                ranges: vec![(block * 4096, 4096)],
                host: None,
                nonce,
                now_ms: now * 1000,
                lifetime_ms: life * 1000,
                idle_ms: 1000,
            }
        }),
        (1u64..8, nodes.clone())
            .prop_map(|(id, holders)| MetaCmd::TokenReady { id: VolumeId(id), holders: ids(&holders) }),
        (1u64..8, 0u64..5).prop_map(|(id, now)| MetaCmd::TouchToken { id: VolumeId(id), now_ms: now * 1000 }),
        (1u64..8).prop_map(|id| MetaCmd::RevokeToken { id: VolumeId(id) }),
        (0u64..5).prop_map(|now| MetaCmd::Expire { now_ms: now * 1000 }),
        ("[cs]", "[vw]", any::<bool>(), 0u64..5).prop_map(|(name, source, snapshot, now)| MetaCmd::CloneVolume {
            name,
            source,
            snapshot,
            now_ms: now * 1000
        }),
        (1u64..8, nodes)
            .prop_map(|(id, holders)| MetaCmd::FinishClone { volume: VolumeId(id), holders: ids(&holders) }),
    ]
}

fn paths_of(volume: &str, node: NodeId) -> VolumePaths {
    VolumePaths {
        volume: volume.to_string(),
        paths: vec![tandem_paths::PathEntry {
            path: format!("n{node}p0"),
            node,
            address: format!("127.0.0.1:{}", 9000 + node.get()).parse().expect("addr"),
            state: tandem_paths::PathState::ActiveOptimized,
            reason: "primary".into(),
        }],
    }
}

#[test]
fn hosts_connect_to_volumes_and_path_maps_publish_by_generation() {
    let mut m = two_sites();
    m.apply(create_volume("v", None, 4096));
    let add = |name: &str, site: &str| MetaCmd::AddHost { name: name.into(), site: site.into(), iqns: Vec::new() };
    assert_eq!(m.apply(add("h1", "a")), MetaReply::Done { changed: true });
    assert_eq!(m.apply(add("h1", "a")), MetaReply::Done { changed: false });
    assert_eq!(m.apply(add("h1", "b")), MetaReply::Done { changed: true });
    invalid(m.apply(add("bad name", "a")), "host name");
    let connect = |host: &str, volume: &str| MetaCmd::ConnectHost { host: host.into(), volume: volume.into() };
    assert!(matches!(m.apply(connect("h1", "nope")), MetaReply::NotFound(e) if e.contains("no volume named")));
    assert!(matches!(m.apply(connect("h9", "v")), MetaReply::NotFound(e) if e.contains("no host named")));
    assert_eq!(m.apply(connect("h1", "v")), MetaReply::Done { changed: true });
    assert_eq!(m.apply(connect("h1", "v")), MetaReply::Done { changed: false });
    let id = m.volume_by_name("v").expect("v").id;
    assert!(m.hosts["h1"].volumes.contains(&id));

    // Generations go up by one, never skip, never repeat with other content.
    let publish = |generation: u64, node: NodeId| MetaCmd::PublishPaths {
        host: "h1".into(),
        generation,
        paths: vec![paths_of("v", node)],
    };
    invalid(m.apply(publish(2, NodeId(1))), "generation 0");
    assert_eq!(m.apply(publish(1, NodeId(1))), MetaReply::Done { changed: true });
    assert_eq!(m.apply(publish(1, NodeId(1))), MetaReply::Done { changed: false }, "a retry");
    invalid(m.apply(publish(1, NodeId(2))), "stale");
    assert_eq!(m.apply(publish(2, NodeId(2))), MetaReply::Done { changed: true });
    assert_eq!(m.hosts["h1"].generation, 2);
    let huge = MetaCmd::PublishPaths {
        host: "h1".into(),
        generation: 3,
        paths: (0..HOST_VOLUMES_MAX + 1).map(|i| paths_of(&format!("v{i}"), NodeId(1))).collect(),
    };
    invalid(m.apply(huge), "exceeds");
    assert_eq!(m.hosts["h1"].generation, 2, "a refused publication changes nothing");

    // Deleting the volume disconnects it; removing the host forgets it.
    assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v".into() }), MetaReply::Done { changed: true });
    assert!(m.hosts["h1"].volumes.is_empty());
    assert_eq!(m.apply(MetaCmd::RemoveHost { name: "h1".into() }), MetaReply::Done { changed: true });
    assert!(matches!(m.apply(MetaCmd::RemoveHost { name: "h1".into() }), MetaReply::NotFound(_)));
}

#[test]
fn a_node_advertises_its_target_ports_once_each() {
    let mut m = ClusterMap::default();
    let mut n = node(NodeId(1), 7000);
    n.extra_nbd_addrs = vec!["127.0.0.1:7100".parse().expect("addr")];
    assert_eq!(n.targets().len(), 2);
    assert_eq!(m.apply(MetaCmd::RegisterNode(n.clone())), MetaReply::Done { changed: true });
    n.extra_nbd_addrs.push(n.nbd_addr);
    invalid(m.apply(MetaCmd::RegisterNode(n.clone())), "twice");
    n.extra_nbd_addrs =
        (0..EXTRA_TARGETS_MAX as u16 + 1).map(|i| format!("127.0.0.1:{}", 8000 + i).parse().expect("addr")).collect();
    invalid(m.apply(MetaCmd::RegisterNode(n)), "extra NBD addresses");
}

proptest! {
    /// Replaying the same commands gives the same map (determinism), and rebuilding a map
    /// from its objects — what a snapshot install and a restart do — reproduces it exactly.
    #[test]
    fn objects_reproduce_the_map(cmds in proptest::collection::vec(cmd(), 0..60)) {
        let mut a = ClusterMap::default();
        let mut b = ClusterMap::default();
        for c in &cmds {
            prop_assert_eq!(a.apply(c.clone()), b.apply(c.clone()));
        }
        prop_assert_eq!(&a, &b);
        let rebuilt = ClusterMap::from_objects(a.objects()).expect("rebuild");
        prop_assert_eq!(&rebuilt, &a);
    }

    /// Persisting only the touched keys after each command keeps a stored copy equal to the
    /// map: what the state machine does between snapshots.
    /// Whatever the commands, every volume keeps its shape (ISR a sorted subset of the
    /// replicas holding the primary, epoch ≥ 1), every volume's dataset exists, every
    /// replica is a node in the map, and a refused command changes nothing.
    #[test]
    fn random_commands_keep_the_volume_invariants(cmds in proptest::collection::vec(cmd(), 0..80)) {
        let mut m = ClusterMap::default();
        for c in cmds {
            let before = m.clone();
            let reply = m.apply(c.clone());
            if matches!(reply, MetaReply::Invalid(_) | MetaReply::NotFound(_)) {
                prop_assert_eq!(&m, &before, "refused {:?} changed the map", c);
            }
            if reply == (MetaReply::Done { changed: false }) {
                prop_assert_eq!(&m, &before, "{:?} claimed no change", c);
            }
            for v in m.volumes.values() {
                v.assert_shape();
                prop_assert!(m.datasets.contains_key(&v.dataset));
                prop_assert!(v.replicas.iter().all(|r| m.nodes.contains_key(r)));
                prop_assert!(v.id < m.next_volume_id);
            }
            for d in m.datasets.values() {
                prop_assert!(is_sorted_set(&d.replicas) && !d.replicas.is_empty());
                prop_assert!(d.replicas.iter().all(|r| m.nodes.contains_key(r)));
            }
            let names: BTreeSet<&str> = m.volumes.values().map(|v| v.name.as_str()).collect();
            prop_assert_eq!(names.len(), m.volumes.len());
            // What the map derives stays what a scan finds.
            for v in m.volumes.values() {
                prop_assert_eq!(m.volume_by_name(&v.name).map(|f| f.id), Some(v.id));
                let scanned: BTreeSet<&String> =
                    m.hosts.values().filter(|h| h.volumes.contains(&v.id)).map(|h| &h.name).collect();
                prop_assert_eq!(m.hosts_of_volume(v.id).collect::<BTreeSet<_>>(), scanned);
            }
            prop_assert_eq!(m.index.volume_by_name.len(), m.volumes.len());
            let connected: usize = m.hosts.values().map(|h| h.volumes.len()).sum();
            prop_assert_eq!(m.index.hosts_of_volume.values().map(BTreeSet::len).sum::<usize>(), connected);
            let rebuilt = ClusterMap::from_objects(m.objects()).expect("rebuild");
            prop_assert_eq!(rebuilt.index.hosts_of_volume.len(), m.index.hosts_of_volume.len());
            prop_assert_eq!(rebuilt.index.volume_by_name.len(), m.index.volume_by_name.len());
        }
    }

    #[test]
    fn touched_keys_keep_a_store_in_step(cmds in proptest::collection::vec(cmd(), 0..60)) {
        let mut m = ClusterMap::default();
        let mut store: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        for c in cmds {
            m.apply(c);
            for key in m.take_touched() {
                match m.object(&key) {
                    Some(obj) => { store.insert(key, obj); }
                    None => { store.remove(&key); }
                }
            }
            let rebuilt = ClusterMap::from_objects(store.clone()).expect("rebuild");
            prop_assert_eq!(&rebuilt, &m);
        }
    }
}

#[test]
fn a_host_owns_its_iscsi_names_and_no_two_hosts_share_one() {
    let mut m = two_sites();
    let add = |name: &str, iqns: &[&str]| MetaCmd::AddHost {
        name: name.into(),
        site: "a".into(),
        iqns: iqns.iter().map(|s| s.to_string()).collect(),
    };
    let iqn = "iqn.1993-08.org.debian:01:h1";
    assert_eq!(m.apply(add("h1", &[iqn])), MetaReply::Done { changed: true });
    assert_eq!(m.host_by_iqn(iqn).map(|h| h.name.as_str()), Some("h1"));
    // Adding again without names keeps them; the same names change nothing.
    assert_eq!(m.apply(add("h1", &[])), MetaReply::Done { changed: false });
    assert_eq!(m.apply(add("h1", &[iqn])), MetaReply::Done { changed: false });
    invalid(m.apply(add("h2", &[iqn])), "already belongs to host \"h1\"");
    invalid(m.apply(add("h2", &["IQN.upper"])), "iSCSI name");
    invalid(m.apply(add("h2", &["host-1"])), "must start with iqn.");
    let nine: Vec<String> = (0..9).map(|i| format!("iqn.2026-12.test:{i}")).collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    invalid(m.apply(add("h2", &nine)), "at most 8");
    // Names given again replace the old ones: the old name is free for another host.
    assert_eq!(m.apply(add("h1", &["iqn.2026-12.test:new"])), MetaReply::Done { changed: true });
    assert_eq!(m.host_by_iqn(iqn), None);
    assert_eq!(m.apply(add("h2", &[iqn])), MetaReply::Done { changed: true });
    assert_eq!(m.host_by_iqn(iqn).map(|h| h.name.as_str()), Some("h2"));
}

mod access {
    use super::*;
    use crate::{AccessPolicy, HostCredential, Principal, Refusal, ACCESS_SETTING};

    fn credential(id: char, cert: char) -> HostCredential {
        HostCredential { id: id.to_string().repeat(32), cert_sha256: cert.to_string().repeat(64) }
    }

    fn two_hosts() -> ClusterMap {
        let mut map = two_sites();
        for v in ["a", "b"] {
            assert_eq!(map.apply(create_volume(v, None, 1 << 20)), MetaReply::Done { changed: true });
        }
        for h in ["h1", "h2"] {
            map.apply(MetaCmd::AddHost { name: h.into(), site: "s".into(), iqns: vec![] });
        }
        map.apply(MetaCmd::ConnectHost { host: "h1".into(), volume: "a".into() });
        map
    }

    #[test]
    fn a_host_reaches_only_its_volumes_and_anonymous_clients_only_where_the_policy_allows() {
        let map = two_hosts();
        let h1 = Principal::Host("h1".into());
        let h2 = Principal::Host("h2".into());
        for policy in AccessPolicy::ALL {
            assert_eq!(map.may_open(policy, &h1, "a").map(|v| v.name.as_str()), Ok("a"));
            assert!(matches!(map.may_open(policy, &h1, "b"), Err(Refusal::NotConnected(_))));
            // A volume that does not exist looks like one that is not connected: masked.
            assert!(matches!(map.may_open(policy, &h1, "nosuch"), Err(Refusal::NotConnected(_))));
            assert!(matches!(map.may_open(policy, &h2, "a"), Err(Refusal::NotConnected(_))));
            assert!(matches!(
                map.may_open(policy, &Principal::Host("gone".into()), "a"),
                Err(Refusal::IdentityRequired(_))
            ));
            assert_eq!(map.visible_volumes(policy, &h1), ["a"]);
            assert!(map.visible_volumes(policy, &h2).is_empty());
        }
        for policy in [AccessPolicy::Open, AccessPolicy::Tls] {
            assert!(map.may_open(policy, &Principal::Anonymous, "b").is_ok());
            assert!(matches!(map.may_open(policy, &Principal::Anonymous, "x"), Err(Refusal::NotFound(_))));
            assert_eq!(map.visible_volumes(policy, &Principal::Anonymous), ["a", "b"]);
        }
        let strict = AccessPolicy::TlsRequired;
        assert!(matches!(map.may_open(strict, &Principal::Anonymous, "a"), Err(Refusal::IdentityRequired(_))));
        assert!(matches!(map.may_open(strict, &Principal::Admin("op".into()), "a"), Err(Refusal::IdentityRequired(_))));
        assert!(map.visible_volumes(strict, &Principal::Anonymous).is_empty());
    }

    #[test]
    fn the_access_setting_takes_only_a_policy_and_overrides_the_default() {
        let mut map = ClusterMap::default();
        assert_eq!(map.access_policy(AccessPolicy::Tls), AccessPolicy::Tls);
        let bad = map.apply(MetaCmd::PutSetting { key: ACCESS_SETTING.into(), value: "closed".into() });
        assert!(matches!(bad, MetaReply::Invalid(_)), "{bad:?}");
        assert!(map.settings.is_empty());
        map.apply(MetaCmd::PutSetting { key: ACCESS_SETTING.into(), value: "tls-required".into() });
        assert_eq!(map.access_policy(AccessPolicy::Open), AccessPolicy::TlsRequired);
    }

    #[test]
    fn a_new_credential_replaces_the_old_one_and_a_certificate_belongs_to_one_host() {
        let mut map = two_hosts();
        let first = credential('1', 'a');
        let set = |map: &mut ClusterMap, host: &str, c: HostCredential| {
            map.apply(MetaCmd::SetHostCredential { host: host.into(), credential: c })
        };
        assert_eq!(set(&mut map, "h1", first.clone()), MetaReply::Done { changed: true });
        assert_eq!(set(&mut map, "h1", first.clone()), MetaReply::Done { changed: false });
        assert_eq!(map.host_by_cert(&first.cert_sha256).map(|h| h.name.as_str()), Some("h1"));
        assert!(matches!(set(&mut map, "h2", credential('2', 'a')), MetaReply::Invalid(_)));
        assert!(matches!(set(&mut map, "nosuch", credential('3', 'c')), MetaReply::NotFound(_)));
        let bad = HostCredential { id: "XYZ".into(), cert_sha256: "b".repeat(64) };
        assert!(matches!(set(&mut map, "h1", bad), MetaReply::Invalid(_)));
        let second = credential('4', 'd');
        assert_eq!(set(&mut map, "h1", second.clone()), MetaReply::Done { changed: true });
        assert_eq!(map.host_by_cert(&first.cert_sha256), None);
        assert_eq!(map.hosts["h1"].credential, Some(second));
    }
}

#[test]
fn reservations_apply_in_the_volume_epoch_only_and_go_with_the_volume() {
    let mut m = one_volume();
    let epoch = m.volumes[&VolumeId(1)].epoch;
    let a = Nexus::host("a");
    let reserve = |epoch: Epoch, op: Op| MetaCmd::Reserve { volume: VolumeId(1), epoch, id: 0, nexus: a.clone(), op };
    let register =
        Op::Register { key: 0, new_key: 7, ignore_existing: false, all_ports: vec![], aptpl: true, also: vec![] };

    // A stale primary's command changes nothing.
    let stale = m.apply(reserve(Epoch(epoch.0 + 1), register.clone()));
    assert!(matches!(stale, MetaReply::Conflict(ref why) if why.contains("stale primary")), "{stale:?}");
    assert!(m.reservations_of(VolumeId(1)).is_none() && m.take_touched().is_empty());

    assert!(matches!(m.apply(reserve(epoch, register.clone())), MetaReply::Reservation(Ok(ref o)) if o.changed));
    assert_eq!(m.take_touched(), vec![ObjectKey::Reservations(VolumeId(1))]);
    // A retried command (same id) is answered as the first time; without an id it conflicts.
    let again = MetaCmd::Reserve { volume: VolumeId(1), epoch, id: 42, nexus: a.clone(), op: register.clone() };
    assert!(matches!(m.apply(again.clone()), MetaReply::Reservation(Err(Refusal::Conflict(_)))));
    let change =
        Op::Register { key: 7, new_key: 9, ignore_existing: false, all_ports: vec![], aptpl: true, also: vec![] };
    let first = MetaCmd::Reserve { volume: VolumeId(1), epoch, id: 43, nexus: a.clone(), op: change.clone() };
    assert!(matches!(m.apply(first.clone()), MetaReply::Reservation(Ok(ref o)) if o.changed));
    assert!(matches!(m.apply(first), MetaReply::Reservation(Ok(ref o)) if o.changed));
    assert_eq!(m.reservations_of(VolumeId(1)).map(|r| r.registrations[0].key), Some(9));
    let back_to_7 =
        Op::Register { key: 9, new_key: 7, ignore_existing: false, all_ports: vec![], aptpl: true, also: vec![] };
    assert!(matches!(m.apply(reserve(epoch, back_to_7)), MetaReply::Reservation(Ok(_))));
    m.take_touched();
    let in_range = Op::ReserveRange { key: 7, range: Range::new(0, MIB), kind: Kind::WriteExclusive };
    assert!(matches!(m.apply(reserve(epoch, in_range)), MetaReply::Reservation(Ok(_))));
    // A range past the end of the volume is refused before the state machine sees it.
    let past = Op::ReserveRange { key: 7, range: Range::new(MIB, 1), kind: Kind::WriteExclusive };
    assert!(matches!(m.apply(reserve(epoch, past)), MetaReply::Reservation(Err(Refusal::InvalidParameter(_)))));
    // A refusal by the state machine changes nothing either.
    m.take_touched();
    let wrong_key = Op::Reserve { key: 8, kind: Kind::ExclusiveAccess };
    assert!(matches!(m.apply(reserve(epoch, wrong_key)), MetaReply::Reservation(Err(Refusal::Conflict(_)))));
    assert!(m.take_touched().is_empty());

    let state = m.reservations_of(VolumeId(1)).expect("reservations").clone();
    assert_eq!((state.registrations.len(), state.ranges.len(), state.aptpl), (1, 1, true));
    let back = ClusterMap::from_objects(m.objects()).expect("objects");
    assert_eq!(back.reservations_of(VolumeId(1)), Some(&state));

    assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v".into() }), DONE);
    assert!(m.reservations_of(VolumeId(1)).is_none());
    assert!(m.take_touched().contains(&ObjectKey::Reservations(VolumeId(1))));
}

mod copies {
    use super::*;
    use crate::{Origin, TokenRecord, TOKENS_PER_VOLUME_MAX};

    fn create(m: &mut ClusterMap, nonce: u128, now_ms: u64) -> MetaReply {
        m.apply(MetaCmd::CreateToken {
            volume: VolumeId(1),
            ranges: vec![(0, 8192), (65536, 4096)],
            host: Some("h".into()),
            nonce,
            now_ms,
            lifetime_ms: 60_000,
            idle_ms: 10_000,
        })
    }

    fn create_with(volume: u64, ranges: Vec<(u64, u64)>, lifetime_ms: u64, idle_ms: u64, nonce: u128) -> MetaCmd {
        MetaCmd::CreateToken { volume: VolumeId(volume), ranges, host: None, nonce, now_ms: 0, lifetime_ms, idle_ms }
    }

    fn token(reply: MetaReply) -> TokenRecord {
        match reply {
            MetaReply::Token(t) => *t,
            other => panic!("not a token: {other:?}"),
        }
    }

    #[test]
    fn a_token_is_pending_until_its_image_is_held_then_expires_by_lifetime_or_inactivity() {
        let mut m = one_volume();
        let t = token(create(&mut m, 7, 1_000));
        assert_eq!((t.id, t.len(), t.ready()), (VolumeId(2), 12288, false), "its id comes from the volume ids");
        assert_eq!(m.next_volume_id, VolumeId(3));
        assert_eq!(m.take_touched(), vec![ObjectKey::NextVolumeId, ObjectKey::Token(VolumeId(2))]);
        // A retry with the same nonce gets the same token and allocates nothing.
        assert_eq!(token(create(&mut m, 7, 2_000)), t);
        assert_eq!(m.next_volume_id, VolumeId(3));
        assert!(m.take_touched().is_empty());
        assert!(
            matches!(m.apply(MetaCmd::TouchToken { id: t.id, now_ms: 1_500 }), MetaReply::Invalid(ref e) if e.contains("being made"))
        );

        invalid(m.apply(MetaCmd::TokenReady { id: t.id, holders: vec![] }), "at least one node");
        invalid(m.apply(MetaCmd::TokenReady { id: t.id, holders: ids(&[9]) }), "not in the cluster");
        let ready = token(m.apply(MetaCmd::TokenReady { id: t.id, holders: ids(&[3, 2, 2]) }));
        assert_eq!(ready.holders, ids(&[2, 3]));
        assert_eq!(token(m.apply(MetaCmd::TokenReady { id: t.id, holders: ids(&[2, 3]) })), ready, "a retry");
        assert!(matches!(m.apply(MetaCmd::TokenReady { id: t.id, holders: ids(&[1]) }), MetaReply::Conflict(_)));

        // Used at 9 s: idle until 19 s; its lifetime ends at 61 s.
        assert_eq!(token(m.apply(MetaCmd::TouchToken { id: t.id, now_ms: 9_000 })).last_used_ms, 9_000);
        assert_eq!(m.apply(MetaCmd::Expire { now_ms: 18_999 }), SAME);
        assert!(m.tokens.contains_key(&t.id));
        assert_eq!(m.apply(MetaCmd::Expire { now_ms: 19_000 }), DONE);
        assert!(m.tokens.is_empty());
        assert!(matches!(m.apply(MetaCmd::TouchToken { id: t.id, now_ms: 9_500 }), MetaReply::NotFound(_)));

        // Lifetime: used every few seconds, still void at 61 s.
        let t = token(create(&mut m, 8, 1_000));
        m.apply(MetaCmd::TokenReady { id: t.id, holders: ids(&[1]) });
        for now in (5_000..60_000).step_by(5_000) {
            assert!(matches!(m.apply(MetaCmd::TouchToken { id: t.id, now_ms: now }), MetaReply::Token(_)));
        }
        assert!(
            matches!(m.apply(MetaCmd::TouchToken { id: t.id, now_ms: 61_000 }), MetaReply::Invalid(ref e) if e.contains("lifetime"))
        );
        m.apply(MetaCmd::Expire { now_ms: 61_000 });
        assert!(m.tokens.is_empty());

        // A token whose maker never finished it goes after ten minutes.
        let pending = token(create(&mut m, 9, 0));
        m.apply(MetaCmd::Expire { now_ms: 599_999 });
        assert!(m.tokens.contains_key(&pending.id));
        m.apply(MetaCmd::Expire { now_ms: 600_000 });
        assert!(m.tokens.is_empty());
    }

    #[test]
    fn bad_tokens_are_refused_and_tokens_go_with_their_volume() {
        let mut m = one_volume();
        let create = |volume: u64, ranges: Vec<(u64, u64)>, lifetime_ms: u64, idle_ms: u64| {
            create_with(volume, ranges, lifetime_ms, idle_ms, 1)
        };
        assert!(matches!(m.apply(create(9, vec![(0, 4096)], 1000, 1000)), MetaReply::NotFound(_)));
        invalid(m.apply(create(1, vec![], 1000, 1000)), "1 to 64 ranges");
        invalid(m.apply(create(1, vec![(100, 4096)], 1000, 1000)), "whole 512-byte blocks");
        invalid(m.apply(create(1, vec![(0, 0)], 1000, 1000)), "whole 512-byte blocks");
        invalid(m.apply(create(1, vec![(MIB - 4096, 8192)], 1000, 1000)), "outside the volume");
        invalid(m.apply(create(1, vec![(0, 4096)], 0, 0)), "a token lives");
        invalid(m.apply(create(1, vec![(0, 4096)], 1000, 2000)), "inactivity");
        invalid(m.apply(create(1, vec![(0, 4096)], u64::MAX, 1000)), "a token lives");
        assert!(m.tokens.is_empty() && m.take_touched().is_empty(), "refusals change nothing");

        for nonce in 0..TOKENS_PER_VOLUME_MAX as u128 {
            assert!(matches!(m.apply(create_with(1, vec![(0, 4096)], 1000, 1000, nonce)), MetaReply::Token(_)));
        }
        invalid(m.apply(create_with(1, vec![(0, 4096)], 1000, 1000, 999)), "maximum of 128 tokens");
        let back = ClusterMap::from_objects(m.objects()).expect("objects");
        assert_eq!(back, m, "tokens persist as objects");
        assert_eq!(m.apply(MetaCmd::RevokeToken { id: VolumeId(2) }), DONE);
        assert!(matches!(m.apply(MetaCmd::RevokeToken { id: VolumeId(2) }), MetaReply::NotFound(_)));
        m.take_touched();
        assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v".into() }), DONE);
        assert!(m.tokens.is_empty());
        assert!(m.take_touched().contains(&ObjectKey::Token(VolumeId(3))));
    }

    #[test]
    fn a_clone_is_pending_until_its_image_is_made_then_served_by_the_holders() {
        let mut m = one_volume();
        let clone = |name: &str, snapshot: bool| MetaCmd::CloneVolume {
            name: name.into(),
            source: "v".into(),
            snapshot,
            now_ms: 5,
        };
        assert_eq!(m.apply(clone("snap", true)), DONE);
        assert_eq!(m.apply(clone("snap", true)), SAME, "a retry");
        invalid(m.apply(clone("snap", false)), "already exists");
        invalid(m.apply(clone("bad name", false)), "volume name");
        let unknown = MetaCmd::CloneVolume { name: "x".into(), source: "nope".into(), snapshot: false, now_ms: 5 };
        assert!(matches!(m.apply(unknown), MetaReply::NotFound(_)));
        let snap = m.volume_by_name("snap").expect("snap").clone();
        let v = m.volume_by_name("v").expect("v").clone();
        assert!(snap.pending() && snap.read_only());
        assert_eq!((snap.size_bytes, &snap.replicas, &snap.dataset), (v.size_bytes, &v.replicas, &v.dataset));
        assert_eq!(
            snap.origin,
            Some(Origin { source: v.id, source_name: "v".into(), snapshot: true, made: false, created_ms: 5 })
        );
        // Nothing can be made from a volume still being made.
        invalid(
            m.apply(MetaCmd::CloneVolume { name: "c2".into(), source: "snap".into(), snapshot: false, now_ms: 6 }),
            "still being made",
        );

        invalid(m.apply(MetaCmd::FinishClone { volume: snap.id, holders: ids(&[4]) }), "holds its image");
        // The holders become the in-sync set; the primary moves to one of them.
        assert_eq!(m.apply(MetaCmd::FinishClone { volume: snap.id, holders: ids(&[3, 1, 4]) }), DONE);
        let made = m.volume_by_name("snap").expect("snap").clone();
        assert!(!made.pending() && made.read_only());
        assert_eq!(
            (made.isr.clone(), made.primary, made.isr_version, made.epoch),
            (ids(&[1, 3]), NodeId(1), 2, Epoch(1))
        );
        assert_eq!(m.apply(MetaCmd::FinishClone { volume: snap.id, holders: ids(&[2]) }), SAME, "a retry");
        invalid(m.apply(MetaCmd::FinishClone { volume: v.id, holders: ids(&[2]) }), "not made by reference");

        // Deleting the source leaves the clone; one never finished is dropped after an hour.
        assert_eq!(m.apply(clone("c", false)), DONE);
        assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v".into() }), DONE);
        assert!(m.volume_by_name("snap").is_some());
        m.apply(MetaCmd::Expire { now_ms: 3_600_004 });
        assert!(m.volume_by_name("c").is_some());
        m.apply(MetaCmd::Expire { now_ms: 3_600_005 });
        assert!(m.volume_by_name("c").is_none() && m.volume_by_name("snap").is_some());
    }
}
