//! The replication driver over an in-memory network and in-memory stores: no sockets, no
//! processes. A `Meta` stands in for the metadata store (Raft): it commits every claim and ISR
//! proposal at once and hands the new configuration to every node.

mod mem_net;
mod mem_store;
#[cfg(feature = "chaos-bugs")]
mod planted;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_replication::driver::{Coordinator, DataPlane, DataPlaneConfig, IoFail, ProposeError, VolumeConfig};
use tandem_reservations::{Access, Conflict, Kind, Nexus, Op, Outcome, Range, Refusal, Reservations};
use tandem_storage::Extent;
use tandem_transport::BoxFuture;
use tandem_types::{Epoch, NodeId, VolumeId, BLOCK_BYTES};
use tandem_wire::data::Requester;

use mem_net::Hub;
use mem_store::MemStore;

const VOLUME: VolumeId = VolumeId(7);
/// Generous: a starved machine is only slow.
const DEADLINE: Duration = Duration::from_secs(30);

/// The committed configuration, and the nodes it is applied to.
#[derive(Default)]
struct Meta {
    volumes: Mutex<Vec<VolumeConfig>>,
    planes: Mutex<Vec<DataPlane<MemStore>>>,
    /// Every ISR proposal made, in order.
    proposals: Mutex<Vec<Vec<NodeId>>>,
    /// Every node's lease has run out (none is ever granted again while set).
    leases_lost: AtomicBool,
    /// Nodes (by index) that hear of no committed change while listed: a stalled process.
    deaf: Mutex<HashSet<usize>>,
    /// Hosts the committed map does not let use the volume (`Coordinator::may_access`), and
    /// every check made, in order.
    denied: Mutex<HashSet<String>>,
    access_checks: Mutex<Vec<Requester>>,
    /// The volume's reservations, as the committed map would hold them.
    reservations: Mutex<Reservations>,
}

impl Meta {
    fn publish(&self) {
        let volumes = self.volumes.lock().expect("meta lock").clone();
        let planes = self.planes.lock().expect("meta lock").clone();
        let deaf = self.deaf.lock().expect("meta lock").clone();
        for (i, p) in planes.into_iter().enumerate() {
            if !deaf.contains(&i) {
                p.apply_config(volumes.clone());
            }
        }
    }

    fn change(&self, volume: VolumeId, epoch: Epoch, f: impl FnOnce(&mut VolumeConfig)) -> Result<(), ProposeError> {
        {
            let mut vols = self.volumes.lock().expect("meta lock");
            let v = vols.iter_mut().find(|v| v.id == volume).ok_or(ProposeError::Refused("no such volume".into()))?;
            if v.epoch != epoch {
                return Err(ProposeError::Refused(format!("epoch {} is current", v.epoch)));
            }
            f(v);
        }
        self.publish();
        Ok(())
    }
}

/// The node's handle on `Meta` (the data plane holds its coordinator; `Meta` holds the planes).
struct Coord(Arc<Meta>);

impl Coordinator for Coord {
    fn propose_isr(&self, volume: VolumeId, epoch: Epoch, isr: Vec<NodeId>) -> BoxFuture<'_, Result<(), ProposeError>> {
        Box::pin(async move {
            self.0.proposals.lock().expect("meta lock").push(isr.clone());
            self.0.change(volume, epoch, |v| v.isr = isr)
        })
    }

    fn report_progress(&self, _: VolumeId, _: NodeId, _: u64, _: u64) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn lease_valid(&self) -> bool {
        !self.0.leases_lost.load(Ordering::Relaxed)
    }

    fn confirm_primary(&self, _: VolumeId, _: Epoch) -> BoxFuture<'_, Result<bool, ProposeError>> {
        Box::pin(async { Ok(true) })
    }

    fn claim_primary(&self, volume: VolumeId, epoch: Epoch, nonce: u64) -> BoxFuture<'_, Result<(), ProposeError>> {
        Box::pin(async move { self.0.change(volume, epoch, |v| v.claim = Some(nonce)) })
    }

    fn may_access(&self, _: VolumeId, requester: &Requester) -> BoxFuture<'_, Result<(), String>> {
        self.0.access_checks.lock().expect("meta lock").push(requester.clone());
        let denied = requester.host.as_ref().is_some_and(|h| self.0.denied.lock().expect("meta lock").contains(h));
        Box::pin(async move {
            if denied {
                Err("not connected".into())
            } else {
                Ok(())
            }
        })
    }

    fn check_reservations(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        nexus: &Nexus,
        access: Access,
        offset: u64,
        len: u64,
    ) -> Option<Result<(), Conflict>> {
        let current = self.0.volumes.lock().expect("meta lock").iter().any(|v| v.id == volume && v.epoch == epoch);
        current.then(|| self.0.reservations.lock().expect("meta lock").check(nexus, access, offset, len))
    }

    fn reserve(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        id: u64,
        nexus: Nexus,
        op: Op,
    ) -> BoxFuture<'_, Result<Result<Outcome, Refusal>, ProposeError>> {
        Box::pin(async move {
            let mut result = None;
            self.0.change(volume, epoch, |_| {
                result = Some(self.0.reservations.lock().expect("meta lock").apply_once(id, &nexus, &op));
            })?;
            Ok(result.expect("applied"))
        })
    }
}

/// The planted bugs (`chaos-bugs`) are switched per process: a test that switches one holds this
/// for writing, every other test holds it for reading (in its [`Cluster`]).
static SWITCHES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

struct Cluster {
    /// For a test that joins a node of its own (only the planted bugs' tests do).
    #[cfg_attr(not(feature = "chaos-bugs"), allow(dead_code))]
    hub: Arc<Hub>,
    meta: Arc<Meta>,
    stores: Vec<Arc<MemStore>>,
    planes: Vec<DataPlane<MemStore>>,
    cfg: VolumeConfig,
    /// No planted bug is switched while this cluster runs (`None`: its test switches them).
    _switches: Option<tokio::sync::RwLockReadGuard<'static, ()>>,
}

/// `nodes` nodes (ids 1..), one volume replicated on all of them with node 1 its primary,
/// started and waited for until node 1 serves it.
async fn cluster(nodes: u64) -> Cluster {
    let switches = SWITCHES.read().await;
    Cluster { _switches: Some(switches), ..cluster_switching(nodes).await }
}

/// [`cluster`] for a test that holds [`SWITCHES`] for writing.
async fn cluster_switching(nodes: u64) -> Cluster {
    let hub = Arc::new(Hub::default());
    let meta = Arc::new(Meta::default());
    let ids: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
    // Long enough that no member is timed out while a test holds its durability back.
    let config = DataPlaneConfig { ack_timeout: Duration::from_secs(600), ..DataPlaneConfig::default() };
    let mut stores = Vec::new();
    let mut planes = Vec::new();
    for &id in &ids {
        let store = Arc::new(MemStore::default());
        let plane = DataPlane::start(id, hub.join(id), store.clone(), Arc::new(Coord(meta.clone())), config.clone());
        plane.set_peers(&ids);
        stores.push(store);
        planes.push(plane);
    }
    *meta.planes.lock().expect("meta lock") = planes.clone();
    let cfg = VolumeConfig {
        id: VOLUME,
        name: "v".into(),
        size_bytes: 4 * 1024 * 1024,
        replicas: ids.clone(),
        primary: NodeId(1),
        isr: ids.clone(),
        epoch: Epoch(1),
        claim: None,
        requester: None,
        read_only: false,
    };
    *meta.volumes.lock().expect("meta lock") = vec![cfg.clone()];
    meta.publish();
    let start = Instant::now();
    while !planes[0].stats().iter().any(|s| s.id == VOLUME && s.serving) {
        assert!(start.elapsed() < DEADLINE, "node 1 never served the volume");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cfg = meta.volumes.lock().expect("meta lock")[0].clone();
    Cluster { hub, meta, stores, planes, cfg, _switches: None }
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

fn local(store: &MemStore, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tandem_storage::BlockStore::read(store, VOLUME, offset, &mut buf).expect("local read");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_acknowledged_only_once_the_backup_has_it_durable() {
    let c = cluster(2).await;
    let data = pattern(4 * BLOCK_BYTES as usize, 5);
    let offset = 3 * BLOCK_BYTES;

    // The backup applies what it receives but makes nothing durable.
    c.stores[1].hold_durability(true);
    let write = tokio::spawn({
        let (plane, cfg, data) = (c.planes[0].clone(), c.cfg.clone(), data.clone());
        async move { plane.write(&cfg, offset, data).await }
    });
    let start = Instant::now();
    while local(&c.stores[1], offset, data.len()) != data[..] {
        assert!(start.elapsed() < DEADLINE, "the record never reached the backup");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Applied on the backup, not durable there: not acknowledged.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!write.is_finished(), "a write was acknowledged before the backup had it durable");

    c.stores[1].hold_durability(false);
    let written = tokio::time::timeout(DEADLINE, write).await.expect("the write completes").expect("write task");
    written.expect("the write succeeds");
    assert!(c.meta.proposals.lock().expect("meta lock").is_empty(), "no member left the ISR");

    // Read back at the primary, through the backup (proxied to the primary), and on each copy.
    for plane in &c.planes {
        let mut buf = vec![0u8; data.len()];
        plane.read(&c.cfg, offset, &mut buf).await.expect("read");
        assert_eq!(buf, data[..]);
    }
    for store in &c.stores {
        assert_eq!(local(store, offset, data.len()), data[..]);
    }
    assert_eq!(c.planes[0].local_digest(VOLUME), c.planes[1].local_digest(VOLUME));
}

/// Block status: the primary's map, the same through every node (proxied from the others),
/// bounded by the caller's count, holes again after zeroing; host reads are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allocation_map_comes_from_the_primary_through_every_node() {
    let c = cluster(3).await;
    let size = c.cfg.size_bytes;
    let extent = |len, allocated| Extent { len, allocated };
    c.planes[1].write(&c.cfg, 8192, pattern(4096, 3)).await.expect("write");
    c.planes[2].write(&c.cfg, size - 100, pattern(100, 4)).await.expect("write at the end");
    let want = vec![extent(8192, false), extent(4096, true), extent(size - 16384, false), extent(4096, true)];
    for plane in &c.planes {
        assert_eq!(plane.extents(&c.cfg, 0, size, 1024).await.expect("map"), want);
        // At most `max` extents, from the start; a range inside one block reports that block.
        assert_eq!(plane.extents(&c.cfg, 0, size, 2).await.expect("map"), want[..2].to_vec());
        assert_eq!(plane.extents(&c.cfg, 8200, 10, 1).await.expect("map"), vec![extent(10, true)]);
        assert_eq!(plane.extents(&c.cfg, 0, 0, 5).await.expect("empty"), vec![]);
        assert!(matches!(plane.extents(&c.cfg, size - 1, 2, 5).await, Err(IoFail::Invalid(_))));
    }
    c.planes[2].write_zeroes(&c.cfg, 8192, 4096).await.expect("zeroes");
    assert_eq!(
        c.planes[1].extents(&c.cfg, 0, size, 1024).await.expect("map"),
        vec![extent(size - 4096, false), extent(4096, true)]
    );
    let before = c.planes[2].host_read_bytes();
    read(&c.planes[2], &c.cfg, 0, 5000).await;
    assert_eq!(c.planes[2].host_read_bytes() - before, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_backup_is_proxied_to_the_primary_and_replicated() {
    let c = cluster(3).await;
    let data = pattern(1024 * 1024 + 512, 9);
    c.planes[2].write(&c.cfg, 4096, data.clone()).await.expect("proxied write");
    for store in &c.stores {
        assert_eq!(local(store, 4096, data.len()), data[..]);
    }
    let mut buf = vec![0u8; data.len()];
    c.planes[1].read(&c.cfg, 4096, &mut buf).await.expect("proxied read");
    assert_eq!(buf, data[..]);
}

/// A request proxied for a host names it, and the primary decides: a host the map lets use
/// the volume is served; one it does not is refused with a definite error (no retry, no hold)
/// and nothing of its writes lands on any replica. The primary's own host requests are not
/// asked about (their node checked at open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_refuses_a_request_proxied_for_a_host_the_map_does_not_let_in() {
    let c = cluster(3).await;
    c.meta.denied.lock().expect("meta lock").insert("mallory".into());
    let as_host = |h: &str| VolumeConfig { requester: Some(Requester::host(h)), ..c.cfg.clone() };
    let (alice, mallory) = (as_host("alice"), as_host("mallory"));
    let good = pattern(64 * 1024, 3);
    c.planes[2].write(&alice, 0, good.clone()).await.expect("alice's proxied write");
    let bad = pattern(64 * 1024, 4);
    let started = Instant::now();
    let refused = c.planes[1].write(&mallory, 0, bad.clone()).await;
    assert!(matches!(refused, Err(IoFail::Denied(_))), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "a refusal is definite, not held: {:?}", started.elapsed());
    for (i, op) in ["zeroes", "read", "flush", "compare and write"].into_iter().enumerate() {
        let result = match i {
            0 => c.planes[1].write_zeroes(&mallory, 0, 4096).await.map(|_| ()),
            1 => c.planes[2].read(&mallory, 0, &mut vec![0u8; 4096]).await,
            2 => c.planes[2].flush(&mallory).await,
            _ => c.planes[1].compare_and_write(&mallory, 0, good.slice(..4096), bad.slice(..4096)).await.map(|_| ()),
        };
        assert!(matches!(result, Err(IoFail::Denied(_))), "mallory's {op}: {result:?}");
    }
    for store in &c.stores {
        assert_eq!(local(store, 0, good.len()), good[..], "a refused write changed a replica");
    }
    // The checks came from the proxies, for the hosts they named; node 1 (the primary) serves
    // its own requests without one.
    c.planes[0].write(&mallory, 0, good.clone()).await.expect("the primary's own request");
    let checks = c.meta.access_checks.lock().expect("meta lock").clone();
    assert!(checks.contains(&Requester::host("alice")) && checks.contains(&Requester::host("mallory")));
    assert_eq!(checks.len(), 6, "one check per proxied request, none retried: {checks:?}");
}

/// Reservations are decided at the primary, for requests it serves and those proxied to it: a
/// host that a reservation excludes gets a definite conflict and nothing of its writes lands;
/// a preempt takes effect for every write after it (through any node), and a range
/// reservation excludes others from its range only. A reservation command runs once however
/// often its reply is lost (same id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_enforces_reservations_on_every_path_and_a_preempt_fences_the_holder() {
    let c = cluster(3).await;
    let as_host = |h: &str| VolumeConfig { requester: Some(Requester::host(h)), ..c.cfg.clone() };
    let (alice, bob) = (as_host("alice"), as_host("bob"));
    let register = |key| Op::Register {
        key: 0,
        new_key: key,
        ignore_existing: true,
        all_ports: vec![],
        aptpl: false,
        also: vec![],
    };
    // Through a proxy and at the primary.
    assert!(c.planes[1].reserve(&alice, register(0xa)).await.expect("alice registers").is_ok());
    assert!(c.planes[0].reserve(&bob, register(0xb)).await.expect("bob registers").is_ok());
    let reserve = Op::Reserve { key: 0xa, kind: Kind::WriteExclusive };
    assert!(c.planes[2].reserve(&alice, reserve).await.expect("alice reserves").is_ok());

    let mine = pattern(8192, 5);
    c.planes[2].write(&alice, 0, mine.clone()).await.expect("the holder writes through a proxy");
    let theirs = pattern(8192, 6);
    for (node, plane) in c.planes.iter().enumerate() {
        let refused = plane.write(&bob, 0, theirs.clone()).await;
        assert!(matches!(refused, Err(IoFail::Conflict(_))), "bob's write via node {}: {refused:?}", node + 1);
        plane.read(&bob, 0, &mut vec![0u8; 4096]).await.expect("write exclusive lets everyone read");
    }
    for store in &c.stores {
        assert_eq!(local(store, 0, mine.len()), mine[..], "a refused write changed a replica");
    }

    // Bob preempts alice: from then on her writes conflict and his land.
    let preempt = Op::Preempt { key: 0xb, victim: 0xa, kind: Kind::ExclusiveAccess, abort: true };
    let outcome = c.planes[1].reserve(&bob, preempt).await.expect("bob preempts").expect("accepted");
    assert_eq!(outcome.aborted, vec![Nexus::host("alice")]);
    for plane in &c.planes {
        assert!(matches!(plane.write(&alice, 0, mine.clone()).await, Err(IoFail::Conflict(_))));
        assert!(matches!(plane.read(&alice, 0, &mut vec![0u8; 4096]).await, Err(IoFail::Conflict(_))));
    }
    c.planes[0].write(&bob, 0, theirs.clone()).await.expect("the new holder writes");

    // A range: bob releases the volume and reserves a range; alice (registered again) may
    // write outside it only.
    assert!(c.planes[2].reserve(&bob, Op::Release { key: 0xb, kind: Kind::ExclusiveAccess }).await.unwrap().is_ok());
    assert!(c.planes[2].reserve(&alice, register(0xa)).await.unwrap().is_ok());
    let range = Op::ReserveRange { key: 0xb, range: Range::new(0, 8192), kind: Kind::WriteExclusive };
    assert!(c.planes[1].reserve(&bob, range).await.unwrap().is_ok());
    assert!(matches!(c.planes[1].write(&alice, 4096, mine.slice(..4096)).await, Err(IoFail::Conflict(_))));
    c.planes[1].write(&alice, 8192, mine.clone()).await.expect("outside the range");
    let overlap = Op::ReserveRange { key: 0xa, range: Range::new(4096, 8192), kind: Kind::WriteExclusive };
    assert!(matches!(c.planes[1].reserve(&alice, overlap).await.unwrap(), Err(Refusal::Conflict(_))));
    // Requests with no requester are the node's own: never checked.
    let node_cfg = c.cfg.clone();
    c.planes[0].write(&node_cfg, 0, theirs.clone()).await.expect("the node's own write");
    let state = c.meta.reservations.lock().expect("meta lock").clone();
    assert_eq!((state.registrations.len(), state.ranges.len(), state.reservation), (2, 1, None));
}

/// The primary's store fails (a failed flush: it refuses changes until the node restarts). The
/// primary steps down and builds no new primary on that store (no epoch claimed again and
/// again); host writes in flight, at the failed node and proxied through another, are not
/// failed but held, and once the volume fails over (what the leader does when the node stops
/// renewing its lease) they complete at the new primary, durable on the ISR left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_store_fails_steps_down_for_good_and_writes_complete_after_the_failover() {
    let c = cluster(3).await;
    let before = pattern(2 * BLOCK_BYTES as usize, 1);
    c.planes[0].write(&c.cfg, 0, before.clone()).await.expect("a write before the failure");
    let claimed = c.meta.volumes.lock().expect("meta lock")[0].claim;

    c.stores[0].fail("fdatasync: EIO");
    let data = pattern(2 * BLOCK_BYTES as usize, 2);
    let mut writes = Vec::new();
    for (via, offset) in [(0usize, 0u64), (1, 8 * BLOCK_BYTES)] {
        let (plane, cfg, data) = (c.planes[via].clone(), c.cfg.clone(), data.clone());
        writes.push(tokio::spawn(async move { plane.write(&cfg, offset, data).await }));
    }
    // Several ticks: the writes wait (no error), node 1 serves nothing and claims no new epoch.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for w in &writes {
        assert!(!w.is_finished(), "a write finished while no primary could serve it: {w:?}");
    }
    assert!(!c.planes[0].stats().iter().any(|s| s.serving), "a primary serves on a failed store");
    assert_eq!(c.meta.volumes.lock().expect("meta lock")[0].claim, claimed, "a new primary claimed an epoch");

    // The failover the leader commits once node 1's lease has lapsed.
    {
        let mut vols = c.meta.volumes.lock().expect("meta lock");
        let v = &mut vols[0];
        v.primary = NodeId(2);
        v.isr = vec![NodeId(2), NodeId(3)];
        v.epoch = v.epoch.next();
        v.claim = None;
    }
    c.meta.publish();
    for w in writes {
        let written = tokio::time::timeout(DEADLINE, w).await.expect("the write completes").expect("write task");
        written.expect("a write held through the failover succeeds");
    }
    for store in &c.stores[1..] {
        assert_eq!(local(store, 0, data.len()), data[..]);
        assert_eq!(local(store, 8 * BLOCK_BYTES, data.len()), data[..]);
    }
    assert!(!c.planes[0].stats().iter().any(|s| s.serving), "the failed node serves again");
}

/// Reads `len` bytes at `offset` through `plane`.
async fn read(plane: &DataPlane<MemStore>, cfg: &VolumeConfig, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    plane.read(cfg, offset, &mut buf).await.expect("read");
    buf
}

/// Node 1 (the primary) stands still: it hears of no committed change. The leader fails the
/// volume over to node 2, with the live members as the ISR; returns once node 2 serves.
async fn fail_over_from_stalled_node_1(c: &Cluster) {
    c.meta.deaf.lock().expect("meta lock").insert(0);
    c.meta
        .change(VOLUME, Epoch(1), |v| {
            v.primary = NodeId(2);
            v.isr = vec![NodeId(2), NodeId(3)];
            v.epoch = Epoch(2);
            v.claim = None;
        })
        .expect("failover");
    let start = Instant::now();
    while !c.planes[1].stats().iter().any(|s| s.id == VOLUME && s.serving) {
        assert!(start.elapsed() < DEADLINE, "node 2 never served the volume");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The interleaving of the chaos run pause-primary-blip seed 1 (a primary stopped past its
/// lease). Node 1, the primary, sequences a host write and sends it to nodes 2 and 3, then
/// stalls before acknowledging it. The volume fails over to node 2, whose copy has the write:
/// reconciliation keeps it and reads return it. Another host's newer write to the same block
/// is acknowledged. Node 1 comes back, learns of the failover, and its retry loop re-routes the
/// write it still holds to node 2. That retry must not execute again: the first attempt took
/// effect, and landing it a second time would undo the acknowledged newer write (before the
/// fix, the last reads returned the old write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_that_took_effect_before_a_failover_is_not_executed_again() {
    let c = cluster(3).await;
    let offset = 16 * BLOCK_BYTES;
    let first = pattern(BLOCK_BYTES as usize, 1);
    let newer = pattern(BLOCK_BYTES as usize, 2);

    // Node 1 stalls: its own copy is never made durable (so it acknowledges nothing) and it
    // hears of no committed change.
    c.stores[0].hold_durability(true);
    let stalled = tokio::spawn({
        let (plane, cfg, data) = (c.planes[0].clone(), c.cfg.clone(), first.clone());
        async move { plane.write(&cfg, offset, data).await }
    });
    let start = Instant::now();
    while local(&c.stores[1], offset, first.len()) != first[..] || local(&c.stores[2], offset, first.len()) != first[..]
    {
        assert!(start.elapsed() < DEADLINE, "the records never reached the backups");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fail_over_from_stalled_node_1(&c).await;
    // The stalled write took effect: reads return it.
    assert!(read(&c.planes[2], &c.cfg, offset, first.len()).await == first[..], "the stalled write is not visible");
    // Another host writes the block through node 3; acknowledged, and read back.
    c.planes[2].write(&c.cfg, offset, newer.clone()).await.expect("newer write");
    assert!(read(&c.planes[1], &c.cfg, offset, newer.len()).await == newer[..], "the newer write is not visible");
    assert!(!stalled.is_finished(), "the stalled write was answered while its node stood still");

    // Node 1 hears of the failover before its own copy is durable: its primary steps down,
    // and the write it still holds goes back to its retry loop, which sends it to node 2.
    c.meta.deaf.lock().expect("meta lock").clear();
    c.meta.publish();
    let written = tokio::time::timeout(DEADLINE, stalled).await.expect("the stalled write completes").expect("task");
    written.expect("the stalled write succeeds (it took effect)");
    c.stores[0].hold_durability(false);

    // The newer, acknowledged write is still there.
    for plane in &c.planes {
        let back = read(plane, &c.cfg, offset, newer.len()).await;
        assert!(back == newer[..], "an acknowledged write was undone (old data back: {})", back == first[..]);
    }
}

/// COMPARE AND WRITE is atomic at the primary against every other write, wherever the requests
/// come in: hosts on every node increment one counter by compare and write (read the value,
/// then swap in value + 1), and plain writes hammer the block beside it. Every increment that
/// matched must count: with a read and a write that another write can come between, two
/// increments would match the same value and one would be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_is_atomic_against_every_other_write_on_every_path() {
    let c = cluster(3).await;
    let block = BLOCK_BYTES as usize;
    let counter = 4 * BLOCK_BYTES;
    let value = move |n: u64| {
        let mut b = vec![0u8; block];
        b[..8].copy_from_slice(&n.to_le_bytes());
        Bytes::from(b)
    };
    const TASKS: usize = 6;
    const TRIES: usize = 40;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (plane, cfg) = (c.planes[t % c.planes.len()].clone(), c.cfg.clone());
        tasks.push(tokio::spawn(async move {
            let mut matched = 0u64;
            for _ in 0..TRIES {
                let mut buf = vec![0u8; block];
                plane.read(&cfg, counter, &mut buf).await.expect("read the counter");
                let now = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                let swapped = plane.compare_and_write(&cfg, counter, value(now), value(now + 1)).await;
                match swapped.expect("compare and write") {
                    None => matched += 1,
                    Some(at) => assert!(at < 8, "miscompare reported at byte {at}, outside the counter"),
                }
            }
            matched
        }));
    }
    let noise = tokio::spawn({
        let (plane, cfg) = (c.planes[1].clone(), c.cfg.clone());
        async move {
            for i in 0..200u8 {
                plane.write(&cfg, counter + BLOCK_BYTES, pattern(block, i)).await.expect("write beside");
            }
        }
    });
    let mut matched = 0;
    for t in tasks {
        matched += tokio::time::timeout(DEADLINE, t).await.expect("in time").expect("task");
    }
    noise.await.expect("noise");
    let mut buf = vec![0u8; block];
    c.planes[2].read(&c.cfg, counter, &mut buf).await.expect("read");
    let end = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    assert!(matched > 0, "no compare and write ever matched");
    assert_eq!(end, matched, "{matched} increments matched but the counter reads {end}: some were lost");
    for store in &c.stores {
        assert_eq!(local(store, counter, block), buf, "a replica differs");
    }

    // A miscompare names the first differing byte and writes nothing.
    let mut wrong = buf.clone();
    wrong[100] ^= 1;
    let answer = c.planes[1].compare_and_write(&c.cfg, counter, Bytes::from(wrong), value(0)).await;
    assert_eq!(answer.expect("compare and write"), Some(100));
    assert_eq!(read(&c.planes[0], &c.cfg, counter, block).await, buf, "a miscompare wrote");
}

/// A compare and write whose first attempt took effect before a failover is retried at the new
/// primary: it must be answered as matched, not compared again against its own effect (a
/// miscompare would tell the host its lock was not taken while it holds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_compare_and_write_that_took_effect_before_a_failover_is_not_compared_again() {
    let c = cluster(3).await;
    let offset = 24 * BLOCK_BYTES;
    let len = BLOCK_BYTES as usize;
    let zeroes = Bytes::from(vec![0u8; len]);
    let lock = pattern(len, 3);

    // Node 1, the primary, stalls as in the retried-write test above.
    c.stores[0].hold_durability(true);
    let stalled = tokio::spawn({
        let (plane, cfg, zeroes, lock) = (c.planes[0].clone(), c.cfg.clone(), zeroes.clone(), lock.clone());
        async move { plane.compare_and_write(&cfg, offset, zeroes, lock).await }
    });
    let start = Instant::now();
    while local(&c.stores[1], offset, len) != lock[..] || local(&c.stores[2], offset, len) != lock[..] {
        assert!(start.elapsed() < DEADLINE, "the records never reached the backups");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fail_over_from_stalled_node_1(&c).await;
    assert!(!stalled.is_finished(), "the stalled compare and write was answered while its node stood still");

    // Node 1 hears of the failover; the request it still holds is retried at node 2.
    c.meta.deaf.lock().expect("meta lock").clear();
    c.meta.publish();
    let answer = tokio::time::timeout(DEADLINE, stalled).await.expect("it completes").expect("task");
    c.stores[0].hold_durability(false);
    assert_eq!(answer.expect("the compare and write succeeds"), None, "the retry miscompared against its own effect");
    assert!(read(&c.planes[2], &c.cfg, offset, len).await == lock[..], "the lock is not held");
}

fn image_bytes(store: &MemStore, image: VolumeId, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tandem_storage::BlockStore::read(store, image, 0, &mut buf).expect("image read");
    buf
}

/// An image is made on the primary and every in-sync member, frozen at the writes acknowledged
/// before it; a copy of it lands by a clone record on every replica when all of them hold it,
/// streamed from a holder when the primary does not, and a member that turns out not to hold it
/// refuses the record, leaves the ISR and is resynced: no copy is lost or torn either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_frozen_on_every_in_sync_replica_and_copies_of_it_land_by_reference_or_streamed() {
    let c = cluster(3).await;
    let len = 256 * 1024;
    let (old, new) = (pattern(len, 3), pattern(len, 200));
    c.planes[2].write(&c.cfg, 0, old.clone()).await.expect("write");

    let image = VolumeId(100);
    let holders = c.planes[1]
        .make_image(&c.cfg, image, vec![(0, len as u64 / 2), (len as u64 / 2, len as u64 / 2)])
        .await
        .expect("image");
    assert_eq!(holders, vec![NodeId(1), NodeId(2), NodeId(3)], "the primary first, then every in-sync member");
    for store in &c.stores {
        assert_eq!(image_bytes(store, image, len), old[..], "every holder's image holds the bytes of its moment");
    }
    // Misaligned or out-of-range images are refused before anything is made.
    let bad = c.planes[0].make_image(&c.cfg, VolumeId(101), vec![(512, 4096)]).await;
    assert!(matches!(bad, Err(IoFail::Invalid(_))), "{bad:?}");
    assert!(c.stores.iter().all(|s| tandem_storage::BlockStore::volume_size(&**s, VolumeId(101)).is_none()));

    // A read-only snapshot's configuration refuses every write, on every path.
    let snapshot = VolumeConfig { read_only: true, ..c.cfg.clone() };
    let refused = c.planes[2].write(&snapshot, 0, pattern(4096, 1)).await;
    assert!(matches!(refused, Err(IoFail::Invalid(ref e)) if e.contains("read-only")), "{refused:?}");
    assert!(matches!(c.planes[0].write_zeroes(&snapshot, 0, 4096).await, Err(IoFail::Invalid(_))));
    assert!(matches!(c.planes[1].copy(&snapshot, 0, image, 0, 4096, holders.clone()).await, Err(IoFail::Invalid(_))));
    assert_eq!(local(&c.stores[0], 0, len), old[..], "nothing of them landed");

    // Later writes to the source do not change the image.
    c.planes[0].write(&c.cfg, 0, new.clone()).await.expect("overwrite");
    let mut buf = vec![0u8; len];
    c.planes[2].read_image(image, 0, &mut buf, &holders).await.expect("image read");
    assert_eq!(buf, old[..]);

    // By reference, asked through a backup.
    let by_ref = c.planes[2].copy(&c.cfg, 1024 * 1024, image, 0, len as u64, holders.clone()).await.expect("copy");
    assert!(by_ref, "every in-sync replica holds the image: a clone record");
    for store in &c.stores {
        assert_eq!(local(store, 1024 * 1024, len), old[..]);
        assert_eq!(local(store, 0, len), new[..], "the source keeps its own bytes");
    }

    // The primary holds no copy: streamed from node 2, as ordinary writes.
    let streamed = c.planes[1].copy(&c.cfg, 2 * 1024 * 1024, image, 4096, 8192, vec![NodeId(2)]).await.expect("copy");
    assert!(!streamed, "the primary does not hold the image: streamed");
    // Not block-aligned: streamed too.
    let unaligned =
        c.planes[0].copy(&c.cfg, 3 * 1024 * 1024 + 100, image, 0, 5000, holders.clone()).await.expect("copy");
    assert!(!unaligned);
    for store in &c.stores {
        assert_eq!(local(store, 2 * 1024 * 1024, 8192), old[4096..4096 + 8192]);
        assert_eq!(local(store, 3 * 1024 * 1024 + 100, 5000), old[..5000]);
    }

    // Node 3 lost its copy of the image, but the copy names it as a holder: it refuses the
    // clone record, leaves the ISR and is brought level again; the copy is acknowledged.
    tandem_storage::BlockStore::delete_volume(&*c.stores[2], image).expect("delete");
    let offset = 1536 * 1024;
    c.planes[0].copy(&c.cfg, offset, image, 0, len as u64, holders.clone()).await.expect("copy");
    assert!(
        c.meta.proposals.lock().expect("meta lock").iter().any(|isr| !isr.contains(&NodeId(3))),
        "node 3 refused the record and left the ISR"
    );
    let start = Instant::now();
    while local(&c.stores[2], offset, len) != old[..] || c.meta.volumes.lock().expect("meta lock")[0].isr.len() != 3 {
        assert!(start.elapsed() < DEADLINE, "node 3 was never brought level after refusing the clone record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for store in &c.stores[..2] {
        assert_eq!(local(store, offset, len), old[..]);
    }
}
