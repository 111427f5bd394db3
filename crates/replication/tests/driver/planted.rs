//! The planted bugs of the driver and the core (`chaos-bugs`, docs/ARCHITECTURE.md) re-open
//! their holes in the real driver: each test shows the fixed behaviour with its switch off and
//! the defect with it on. Each holds [`SWITCHES`] for writing and switches off again on the way
//! out, even when it fails.

use std::time::Duration;

use bytes::Bytes;
use tandem_replication::driver::Network;
use tandem_types::chaos_bugs::{self, Bug};
use tandem_types::{Channel, NodeId, BLOCK_BYTES};
use tandem_wire::data::{DataMsg, DataReply};
use tokio::sync::RwLockWriteGuard;

use super::{cluster_switching, local, pattern, Cluster, DEADLINE, SWITCHES, VOLUME};

/// How long a test waits to see that something does not happen.
const QUIET: Duration = Duration::from_millis(300);

/// Switches `bug` on until dropped, with no other test running a cluster.
struct Planted {
    bug: Bug,
    _excl: RwLockWriteGuard<'static, ()>,
}

impl Planted {
    async fn exclusive(bug: Bug) -> Planted {
        let excl = SWITCHES.write().await;
        assert!(!chaos_bugs::on(bug), "switches are off between tests");
        Planted { bug, _excl: excl }
    }

    fn on(&self) {
        chaos_bugs::set(self.bug, true);
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        chaos_bugs::set(self.bug, false);
    }
}

/// Whether a write at node 1 completes while node 2 has it applied but not durable.
async fn acked_while_the_backup_holds_durability(c: &Cluster, seed: u8) -> bool {
    let data = pattern(2 * BLOCK_BYTES as usize, seed);
    let offset = u64::from(seed) * 8 * BLOCK_BYTES;
    c.stores[1].hold_durability(true);
    let write = tokio::spawn({
        let (plane, cfg, data) = (c.planes[0].clone(), c.cfg.clone(), data.clone());
        async move { plane.write(&cfg, offset, data).await }
    });
    let start = std::time::Instant::now();
    while local(&c.stores[1], offset, data.len()) != data[..] {
        assert!(start.elapsed() < DEADLINE, "the record never reached the backup");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(QUIET).await;
    let acked = write.is_finished();
    c.stores[1].hold_durability(false);
    tokio::time::timeout(DEADLINE, write).await.expect("the write completes").expect("task").expect("write");
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_ack_before_backups_acks_what_a_backup_lacks() {
    let p = Planted::exclusive(Bug::AckBeforeBackups).await;
    // The core takes its switches when the primary is built.
    let off = cluster_switching(2).await;
    assert!(!acked_while_the_backup_holds_durability(&off, 1).await);
    p.on();
    let on = cluster_switching(2).await;
    assert!(acked_while_the_backup_holds_durability(&on, 2).await, "planted: acked before the backup had it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_backup_ack_before_fsync_acks_before_the_flush() {
    let p = Planted::exclusive(Bug::BackupAckBeforeFsync).await;
    let c = cluster_switching(2).await;
    assert!(!acked_while_the_backup_holds_durability(&c, 1).await);
    p.on();
    assert!(acked_while_the_backup_holds_durability(&c, 2).await, "planted: the backup acked before its flush");
}

/// A read at the primary overlapping a write in flight (applied everywhere, durable on no
/// backup) returns before the write is acknowledged only with the bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_read_unacknowledged_returns_a_write_in_flight() {
    let p = Planted::exclusive(Bug::ReadUnacknowledged).await;
    let c = cluster_switching(2).await;
    for (seed, planted) in [(1u8, false), (2, true)] {
        if planted {
            p.on();
        }
        let data = pattern(BLOCK_BYTES as usize, seed);
        let offset = u64::from(seed) * 8 * BLOCK_BYTES;
        c.stores[1].hold_durability(true);
        let write = tokio::spawn({
            let (plane, cfg, data) = (c.planes[0].clone(), c.cfg.clone(), data.clone());
            async move { plane.write(&cfg, offset, data).await }
        });
        let start = std::time::Instant::now();
        while local(&c.stores[1], offset, data.len()) != data[..] || local(&c.stores[0], offset, data.len()) != data[..]
        {
            assert!(start.elapsed() < DEADLINE, "the write was never applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let read = tokio::spawn({
            let (plane, cfg) = (c.planes[0].clone(), c.cfg.clone());
            async move {
                let mut buf = vec![0u8; BLOCK_BYTES as usize];
                plane.read(&cfg, offset, &mut buf).await.map(|()| buf)
            }
        });
        tokio::time::sleep(QUIET).await;
        assert!(!write.is_finished(), "the write is not acknowledged");
        assert_eq!(read.is_finished(), planted, "planted {planted}: the read returned before the ack");
        c.stores[1].hold_durability(false);
        let buf = tokio::time::timeout(DEADLINE, read).await.expect("read completes").expect("task").expect("read");
        assert_eq!(buf, data[..]);
        tokio::time::timeout(DEADLINE, write).await.expect("write completes").expect("task").expect("write");
    }
}

/// With every lease lost, the primary serves no read (it pauses; the read waits for a lease
/// or the hold time); with the bug it serves it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_read_without_lease_serves_without_a_lease() {
    let p = Planted::exclusive(Bug::ReadWithoutLease).await;
    let c = cluster_switching(2).await;
    c.planes[0].write(&c.cfg, 0, pattern(BLOCK_BYTES as usize, 3)).await.expect("write");
    c.meta.leases_lost.store(true, std::sync::atomic::Ordering::Relaxed);
    for planted in [false, true] {
        if planted {
            p.on();
        }
        let read = tokio::spawn({
            let (plane, cfg) = (c.planes[0].clone(), c.cfg.clone());
            async move {
                let mut buf = vec![0u8; BLOCK_BYTES as usize];
                plane.read(&cfg, 0, &mut buf).await.map(|()| buf)
            }
        });
        tokio::time::sleep(QUIET).await;
        assert_eq!(read.is_finished(), planted, "planted {planted}: a read served without a lease");
        if planted {
            let buf = read.await.expect("task").expect("read");
            assert_eq!(buf, pattern(BLOCK_BYTES as usize, 3)[..]);
        } else {
            read.abort();
        }
    }
}

/// A primary is built only in an epoch its start claimed; with the bug it serves in the epoch
/// the map shows, claimed by nobody (or by an earlier start, whose late ISR change then still
/// matches it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_late_isr_change_serves_in_an_epoch_it_never_claimed() {
    let p = Planted::exclusive(Bug::LateIsrChange).await;
    let off = cluster_switching(2).await;
    assert!(off.cfg.claim.is_some(), "the primary claimed its epoch");
    p.on();
    let on = cluster_switching(2).await;
    assert_eq!(on.cfg.claim, None, "planted: serving without a claim");
}

/// A proxied write whose earlier attempt took effect at the primary, retried there after a
/// newer write to its block (a proxy that re-routed it late, or a copy of it parked at the
/// primary): answered from its identity without running again; with the bug it runs again and
/// the newer write is undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_park_at_stopped_primary_runs_a_retried_write_again() {
    let p = Planted::exclusive(Bug::ParkAtStoppedPrimary).await;
    let c = cluster_switching(2).await;
    // A proxying node of its own on the test's network (node 2 keeps its own end).
    let proxy = c.hub.join(NodeId(9));
    for (seed, planted) in [(1u8, false), (2, true)] {
        if planted {
            p.on();
        }
        let offset = u64::from(seed) * 8 * BLOCK_BYTES;
        let old = pattern(BLOCK_BYTES as usize, seed);
        let newer = pattern(BLOCK_BYTES as usize, seed + 100);
        let msg = DataMsg::ProxyWrite {
            volume: VOLUME,
            offset,
            data: old.to_vec(),
            fua: false,
            write: 1000 + u64::from(seed),
            requester: None,
        };
        let payload = Bytes::from(msg.encode().expect("encode"));
        for attempt in ["first", "retry"] {
            let reply = tokio::time::timeout(DEADLINE, proxy.call(NodeId(1), Channel::Bulk, payload.clone()))
                .await
                .expect("the primary answers")
                .expect("call");
            assert_eq!(DataReply::decode(&reply).expect("reply"), DataReply::Ok, "{attempt} attempt");
            if attempt == "first" {
                c.planes[0].write(&c.cfg, offset, newer.clone()).await.expect("the newer write");
            }
        }
        let want = if planted { &old } else { &newer };
        for store in &c.stores {
            assert_eq!(
                local(store, offset, old.len()),
                want[..],
                "planted {planted}: what the block holds after the retry"
            );
        }
    }
}
