//! The replication driver over an in-memory network and in-memory stores: no sockets, no
//! processes. A `Meta` stands in for the metadata store (Raft): it commits every claim and ISR
//! proposal at once and hands the new configuration to every node.

mod mem_net;
mod mem_store;
#[cfg(feature = "chaos-bugs")]
mod planted;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_replication::driver::{Coordinator, DataPlane, DataPlaneConfig, ProposeError, VolumeConfig};
use tandem_transport::BoxFuture;
use tandem_types::{Epoch, NodeId, VolumeId, BLOCK_BYTES};

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
}

impl Meta {
    fn publish(&self) {
        let volumes = self.volumes.lock().expect("meta lock").clone();
        let planes = self.planes.lock().expect("meta lock").clone();
        for p in planes {
            p.apply_config(volumes.clone());
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
}

/// The planted bugs (`chaos-bugs`) are switched per process: a test that switches one holds this
/// for writing, every other test holds it for reading (in its [`Cluster`]).
static SWITCHES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

struct Cluster {
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
    };
    *meta.volumes.lock().expect("meta lock") = vec![cfg.clone()];
    meta.publish();
    let start = Instant::now();
    while !planes[0].stats().iter().any(|s| s.id == VOLUME && s.serving) {
        assert!(start.elapsed() < DEADLINE, "node 1 never served the volume");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cfg = meta.volumes.lock().expect("meta lock")[0].clone();
    Cluster { meta, stores, planes, cfg, _switches: None }
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
