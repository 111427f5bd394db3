//! A network partition against real `tandem` processes: the primary of a volume is cut off
//! from the other nodes. Once its lease has run out it neither acknowledges writes nor serves
//! reads; the majority fails the volume over to a new primary that takes writes; after the
//! heal the old primary is resynced and every replica holds the majority's history, and only
//! it.
//!
//! The nodes run in network namespaces of their own, joined by a bridge (the test kit's
//! `Cluster::in_namespaces`, all of it removed on drop, also when the test fails). The
//! partition (`isolate`) drops every IPv4 packet between the primary and the other nodes on
//! the bridge (TCP and UDP: QUIC too) but not between any node and the test: a silent loss on
//! the wire, like a cut link, with no error reported to either side. The heal removes it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_node::lease::{FAILURE_TIMEOUT, LEASE};
use tandem_testkit::{
    create_served_volume, ids, local_copy, random_bytes, volume, wait_for, wait_identical, Cluster, NbdClient,
    Reconnecting,
};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const VOLUME: &str = "vp";
const VOLUME_BYTES: u64 = 64 * MIB;
const NODES: [u64; 3] = [1, 2, 3];
/// Scheduling slack on top of the lease for "nothing after the lease ended".
const SLACK: Duration = Duration::from_secs(1);
/// How long the test waits for one request to the partitioned primary: a request still
/// unanswered then is counted as hung, never as acknowledged.
const MINORITY_WRITE_TIMEOUT: Duration = Duration::from_millis(1000);
const MINORITY_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a node keeps retrying a host request that finds no serving primary, and how long
/// a primary without a lease keeps the writes it sequenced before it fails them
/// (`DataPlaneConfig::hold_time` in crates/replication/src/driver/mod.rs).
const REQUEST_RETRY_DEADLINE: Duration = tandem_node::HOLD_TIME_DEFAULT;

// The volume's layout: what is written where, and by whom.
/// Written through the primary before the partition (pattern A), in three regions.
const A_REGIONS: [(u64, u64, u64); 3] = [(0, 2 * MIB, 0xa1), (8 * MIB, 2 * MIB, 0xa2), (16 * MIB, 256 * 1024, 0xa3)];
/// The partitioned primary is asked to overwrite blocks here (inside an A region, and
/// overwritten again by the majority's C) ...
const MINORITY_OVER: u64 = 8 * MIB + 64 * 1024;
/// ... and to write blocks here (never written by anyone else).
const MINORITY_FRESH: u64 = 40 * MIB;
/// The partitioned primary is asked to read blocks here (an A region).
const MINORITY_READ: u64 = 16 * MIB;
/// Written through the majority after the failover: a new region (B, through the node that
/// is not primary, so proxied) and an overwrite of part of an A region (C, through the new
/// primary) that covers every block the cut-off primary was asked to overwrite.
const B_REGION: (u64, u64, u64) = (24 * MIB, 2 * MIB, 0xb1);
const C_REGION: (u64, u64, u64) = (8 * MIB, 512 * 1024, 0xc1);

/// What every block of the volume must hold, and which write put it there.
struct Model {
    bytes: Vec<u8>,
    labels: Vec<String>,
}

impl Model {
    fn new() -> Model {
        Model {
            bytes: vec![0u8; VOLUME_BYTES as usize],
            labels: vec!["never written".into(); (VOLUME_BYTES / BLOCK) as usize],
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], label: &str) {
        assert!(offset.is_multiple_of(BLOCK) && (data.len() as u64).is_multiple_of(BLOCK));
        self.bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in offset / BLOCK..(offset + data.len() as u64) / BLOCK {
            self.labels[b as usize] = label.to_string();
        }
    }
}

/// Creates the test's volume and waits until its primary serves it with every node in sync;
/// its record.
fn create_volume_in_sync(t: &Cluster) -> Value {
    create_served_volume(t, VOLUME, "64M");
    wait_for("the volume to be served by its primary with every node in sync", Duration::from_secs(30), || {
        let v = volume(t, 1, VOLUME)?;
        let primary = v["primary"].as_u64()?;
        (ids(&v["isr"]) == NODES && local_copy(t, primary, VOLUME)?["serving"] == true).then_some(v)
    })
}

/// One request the test made to the partitioned primary.
struct Attempt {
    offset: u64,
    data: Vec<u8>,
    /// Since the partition.
    start: Duration,
    end: Duration,
    ok: bool,
    error: String,
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// Writes 4 KiB blocks through `addr` until `stop`, one at a time, reconnecting after any
/// failure; every attempt is recorded with its outcome.
fn minority_writer(
    addr: SocketAddr,
    first: NbdClient,
    cut: Instant,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut client = Reconnecting::starting_with(first, addr, VOLUME, MINORITY_WRITE_TIMEOUT);
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Ok(cl) = client.get() else { continue };
            let base = if k.is_multiple_of(2) { MINORITY_FRESH } else { MINORITY_OVER };
            let offset = base + (k / 2 % 64) * BLOCK;
            let data = random_bytes(0x3000 + k, BLOCK as usize);
            let start = cut.elapsed();
            let r = cl.write(offset, &data);
            let end = cut.elapsed();
            let error = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            log.lock().expect("log").push(Attempt { offset, data, start, end, ok: r.is_ok(), error });
            if r.is_err() {
                client.broken();
            }
            k += 1;
        }
    })
}

/// Reads 4 KiB blocks through `addr` until `stop`; a read counts as served only if it returned
/// the expected data (`data` holds what it returned).
fn minority_reader(
    addr: SocketAddr,
    first: NbdClient,
    expected: Vec<u8>,
    cut: Instant,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut client = Reconnecting::starting_with(first, addr, VOLUME, MINORITY_READ_TIMEOUT);
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Ok(cl) = client.get() else { continue };
            let at = (k % 64) * BLOCK;
            let start = cut.elapsed();
            let r = cl.read(MINORITY_READ + at, BLOCK as usize);
            let end = cut.elapsed();
            let (ok, data, error) = match r {
                Ok(d) => (true, d, String::new()),
                Err(e) => (false, Vec::new(), e.to_string()),
            };
            let served_right = ok && data[..] == expected[at as usize..(at + BLOCK) as usize];
            log.lock().expect("log").push(Attempt { offset: MINORITY_READ + at, data, start, end, ok, error });
            assert!(!ok || served_right, "a read through the partitioned primary returned wrong data");
            if ok {
                std::thread::sleep(Duration::from_millis(20));
            } else {
                client.broken();
            }
            k += 1;
        }
    })
}

/// Says what block `at` read through node `id` should hold and what it holds instead.
fn wrong_block(id: u64, at: u64, got: &[u8], model: &Model, unacked: &[&Attempt], cut: Instant) -> String {
    let holds = unacked
        .iter()
        .find(|a| a.offset == at && a.data[..] == *got)
        .map(|a| {
            format!(
                "the write the test sent to the cut-off primary at +{} and gave up on at +{} (unacknowledged)",
                secs(a.start),
                secs(a.end)
            )
        })
        .unwrap_or_else(|| "something else".into());
    format!(
        "node {id}, read at +{}: the block at offset {at} should hold {} but holds {holds}",
        secs(cut.elapsed()),
        model.labels[(at / BLOCK) as usize]
    )
}

/// Reads the whole volume through node `id`'s own NBD address and compares it with `model`;
/// names the first differing block, what should be there, and what is.
fn check_volume(t: &Cluster, id: u64, model: &Model, unacked: &[&Attempt], cut: Instant) {
    let mut cl = NbdClient::connect(t.nbd_addr(id), VOLUME, Duration::from_secs(20)).expect("connect for checking");
    let mut off = 0u64;
    while off < VOLUME_BYTES {
        let got = cl.read(off, MIB as usize).unwrap_or_else(|e| panic!("node {id}: read at {off}: {e}"));
        let want = &model.bytes[off as usize..(off + MIB) as usize];
        if got != want {
            let b = BLOCK as usize;
            let i = (0..MIB as usize).step_by(b).find(|&i| got[i..i + b] != want[i..i + b]).expect("a block differs");
            panic!("{}", wrong_block(id, off + i as u64, &got[i..i + b], model, unacked, cut));
        }
        off += MIB;
    }
    cl.disconnect();
}

fn partition_the_primary(transport: &str, tag: u32) {
    let t = Cluster::in_namespaces(3, transport, tag);
    let leader = t.agreed_leader(&NODES, Duration::from_secs(20));
    let v = create_volume_in_sync(&t);
    let p = v["primary"].as_u64().expect("primary");
    let epoch0 = v["epoch"].as_u64().expect("epoch");
    let others: Vec<u64> = NODES.into_iter().filter(|&n| n != p).collect();
    println!("[{transport}] primary {p} (epoch {epoch0}), Raft leader {leader}");

    // 1. Pattern A through the primary; every replica has it.
    let mut model = Model::new();
    let mut cl = NbdClient::connect(t.nbd_addr(p), VOLUME, Duration::from_secs(20)).expect("connect to the primary");
    for (off, len, seed) in A_REGIONS {
        let data = random_bytes(seed, len as usize);
        cl.write(off, &data).expect("write pattern A through the primary");
        model.write(off, &data, &format!("pattern A (acknowledged by node {p} before the partition)"));
    }
    cl.flush().expect("flush");
    cl.disconnect();
    wait_identical(&t, p, VOLUME, &NODES, Duration::from_secs(30));
    assert!(t.can_connect(p, others[0]), "before the partition, node {p} reaches node {}", others[0]);

    // 2. The partition. The minority clients connect first, so they need no handshake after it.
    let wcl =
        NbdClient::connect(t.nbd_addr(p), VOLUME, MINORITY_WRITE_TIMEOUT).expect("writer connects to the primary");
    let rcl = NbdClient::connect(t.nbd_addr(p), VOLUME, MINORITY_READ_TIMEOUT).expect("reader connects to the primary");
    let before = Instant::now();
    t.isolate(p);
    let cut = Instant::now();
    let wall = |at: Instant| {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
        format!("{:.3} unix", (unix - at.elapsed()).as_secs_f64())
    };
    println!(
        "[{transport}] partition of node {p} from {others:?} installed at {} (nft took {:?})",
        wall(cut),
        cut - before
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Vec::new()));
    let reads = Arc::new(Mutex::new(Vec::new()));
    let (a3_off, a3_len, a3_seed) = A_REGIONS[2];
    assert!(a3_off == MINORITY_READ && a3_len >= 64 * BLOCK);
    let writer = minority_writer(t.nbd_addr(p), wcl, cut, stop.clone(), writes.clone());
    let reader =
        minority_reader(t.nbd_addr(p), rcl, random_bytes(a3_seed, a3_len as usize), cut, stop.clone(), reads.clone());
    let stop_guard = scopeguard(stop.clone());

    // The majority fails the volume over.
    let (v1, failover_at) =
        wait_for("the majority to fail the volume over", FAILURE_TIMEOUT + Duration::from_secs(6), || {
            let v = volume(&t, others[0], VOLUME)?;
            (v["primary"].as_u64()? != p && v["epoch"].as_u64()? > epoch0).then(|| (v, cut.elapsed()))
        });
    let q = v1["primary"].as_u64().expect("new primary");
    let r = others.iter().copied().find(|&n| n != q).expect("the other majority node");
    assert!(others.contains(&q), "the new primary is on the majority side: {v1}");
    assert!(!ids(&v1["isr"]).contains(&p), "the cut-off primary left the ISR: {v1}");
    assert!(!t.can_connect(p, q), "during the partition node {p} cannot reach node {q}");
    let epoch1 = v1["epoch"].as_u64().expect("epoch");
    let serving_at = wait_for("the new primary to serve", Duration::from_secs(20), || {
        (local_copy(&t, q, VOLUME)?["serving"] == true).then(|| cut.elapsed())
    });
    println!(
        "[{transport}] failover to node {q} (epoch {epoch1}, ISR {:?}) seen at +{}, serving at +{}",
        ids(&v1["isr"]),
        secs(failover_at),
        secs(serving_at)
    );

    // Writes through the majority: B through the node that is not primary, C through the new one.
    let majority_start = cut.elapsed();
    let mut majority_writes = Vec::new();
    for (node, name, (off, len, seed)) in [(r, "B", B_REGION), (q, "C", C_REGION)] {
        let mut cl =
            NbdClient::connect(t.nbd_addr(node), VOLUME, Duration::from_secs(20)).expect("connect to the majority");
        let data = random_bytes(seed, len as usize);
        cl.write(off, &data).unwrap_or_else(|e| panic!("write through node {node} of the majority: {e}"));
        cl.flush().expect("flush");
        cl.disconnect();
        let label = format!("pattern {name} (acknowledged by node {node} of the majority at +{})", secs(cut.elapsed()));
        majority_writes.push((off, data, label));
    }
    println!("[{transport}] majority writes acknowledged from +{} to +{}", secs(majority_start), secs(cut.elapsed()));

    // The minority clients keep trying well past the end of the lease.
    let past = LEASE + SLACK + Duration::from_secs(2);
    wait_for("the minority clients to try past the lease", Duration::from_secs(30), || {
        let w = writes.lock().expect("log").iter().any(|a| a.start > past);
        let rd = reads.lock().expect("log").iter().any(|a| a.start > past);
        (w && rd).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("minority writer");
    reader.join().expect("minority reader");
    drop(stop_guard);
    let writes = std::mem::take(&mut *writes.lock().expect("log"));
    let reads = std::mem::take(&mut *reads.lock().expect("log"));

    let bound = LEASE + SLACK;
    let show = |a: &Attempt| {
        format!("[{}..{} {} {}]", secs(a.start), secs(a.end), if a.ok { "ok" } else { "failed:" }, a.error)
    };
    let acked: Vec<&Attempt> = writes.iter().filter(|a| a.ok).collect();
    let late_acks: Vec<String> = acked.iter().filter(|a| a.end > bound).map(|a| show(a)).collect();
    let served: Vec<&Attempt> = reads.iter().filter(|a| a.ok).collect();
    let late_reads: Vec<String> = served.iter().filter(|a| a.end > bound).map(|a| show(a)).collect();
    let last_read = served.iter().map(|a| a.end).max();
    let first_refused = reads.iter().filter(|a| !a.ok && last_read.is_none_or(|l| a.start >= l)).map(|a| a.start).min();
    println!(
        "[{transport}] through the cut-off primary: {} write attempts, {} acknowledged {:?}; {} reads, {} served, \
         last served at +{}, first refused/hung read started at +{} (lease {}, bound +{})",
        writes.len(),
        acked.len(),
        acked.iter().map(|a| secs(a.end)).collect::<Vec<_>>(),
        reads.len(),
        served.len(),
        last_read.map(secs).unwrap_or_else(|| "-".into()),
        first_refused.map(secs).unwrap_or_else(|| "-".into()),
        secs(LEASE),
        secs(bound)
    );
    for a in writes.iter().take(3).chain(reads.iter().filter(|a| !a.ok).take(2)) {
        println!("[{transport}]   e.g. {} at offset {}", show(a), a.offset);
    }
    assert!(late_acks.is_empty(), "the cut-off primary acknowledged writes after its lease ended: {late_acks:?}");
    assert!(late_reads.is_empty(), "the cut-off primary served reads after its lease ended: {late_reads:?}");
    assert!(writes.iter().any(|a| a.start > bound), "no write was tried after the lease ended");
    assert!(reads.iter().any(|a| a.start > bound), "no read was tried after the lease ended");
    // A write the cut-off primary did acknowledge must survive (I1); the others must not
    // appear. Any such acknowledgement came before the lease ended, so before the failover and
    // the majority's writes.
    for a in &acked {
        model.write(a.offset, &a.data, &format!("the write acknowledged by cut-off node {p} at +{}", secs(a.end)));
    }
    for (off, data, label) in &majority_writes {
        model.write(*off, data, label);
    }
    let unacked: Vec<&Attempt> = writes.iter().filter(|a| !a.ok).collect();

    // 3. The heal: the old primary is resynced, rejoins, and every copy is the majority's.
    let heal = Instant::now();
    t.heal();
    println!("[{transport}] healed at +{} ({})", secs(heal - cut), wall(heal));
    let (v2, digest) = wait_identical(&t, q, VOLUME, &NODES, Duration::from_secs(60));
    let rejoined = heal.elapsed();
    println!("[{transport}] healed; node {p} back in the ISR with identical copies after {}", secs(rejoined));
    assert_eq!(v2["primary"].as_u64(), Some(q), "the primary stays where the majority put it: {v2}");
    assert_eq!(v2["epoch"].as_u64(), Some(epoch1), "no further failover: {v2}");
    let resynced = local_copy(&t, q, VOLUME).and_then(|c| c["resync_bytes_sent"].as_u64()).unwrap_or(0);
    assert!(resynced > 0, "node {p} missed the majority's writes, so its resync must have moved something");
    for id in NODES {
        check_volume(&t, id, &model, &unacked, cut);
    }
    // The cut-off primary's nodes may hold the requests the test gave up on until their retry
    // deadline; until then too, none of them may change the history.
    let last_try = unacked.iter().map(|a| a.start).max().unwrap_or_default();
    let until = last_try + REQUEST_RETRY_DEADLINE + SLACK;
    let mut blocks: Vec<u64> = unacked.iter().map(|a| a.offset).collect();
    blocks.sort_unstable();
    blocks.dedup();
    let mut clients: Vec<(u64, NbdClient)> = NODES
        .iter()
        .map(|&n| {
            (n, NbdClient::connect(t.nbd_addr(n), VOLUME, Duration::from_secs(20)).expect("connect for watching"))
        })
        .collect();
    while cut.elapsed() < until {
        for (n, cl) in &mut clients {
            for &at in &blocks {
                let got = cl.read(at, BLOCK as usize).unwrap_or_else(|e| panic!("node {n}: read at {at}: {e}"));
                let want = &model.bytes[at as usize..(at + BLOCK) as usize];
                assert!(got == want, "{}", wrong_block(*n, at, &got, &model, &unacked, cut));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "[{transport}] the {} blocks the cut-off primary was asked to write still hold the majority's data at +{}",
        blocks.len(),
        secs(cut.elapsed())
    );
    let digests: Vec<Option<String>> = NODES.iter().map(|&n| tandem_testkit::digest(&t, n, VOLUME)).collect();
    assert!(digests.iter().all(|d| d.as_deref() == Some(digest.as_str())), "digests at the end: {digests:?}");
    println!(
        "[{transport}] one history: every node reads the majority's data, digest {digest}; timings: lease end \
         seen at +{}, failover at +{}, rejoin {} after the heal",
        last_read.map(secs).unwrap_or_else(|| "-".into()),
        secs(failover_at),
        secs(rejoined)
    );
}

/// Stops the minority clients if the test panics while they run.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn scopeguard(stop: Arc<AtomicBool>) -> StopOnDrop {
    StopOnDrop(stop)
}

#[test]
fn a_partitioned_primary_stops_at_its_lease_end_and_rejoins_one_history_over_tcp() {
    partition_the_primary("tcp", 0);
}

#[test]
fn a_partitioned_primary_stops_at_its_lease_end_and_rejoins_one_history_over_quic() {
    partition_the_primary("quic", 1);
}

/// Invariant I6 (docs/PROTOCOL.md, "Reads"): a read returns only data that no failover can take
/// away. The primary is cut off from both backups; a write to a block goes to it and cannot be
/// acknowledged (no backup can take it); a read of that block goes to it while its lease is
/// still valid. Before the read rule, the primary answered from its own copy, which already
/// held the write; then it was killed, the volume failed over to a backup that never saw the
/// write, and the data the host had read was gone. Now the read waits for the write and is
/// never served with it.
#[test]
fn a_cut_off_primary_never_serves_a_read_of_a_write_its_backups_lack() {
    let t = Cluster::in_namespaces(3, "tcp", 2);
    t.agreed_leader(&NODES, Duration::from_secs(20));
    let v = create_volume_in_sync(&t);
    let p = v["primary"].as_u64().expect("primary");
    let epoch0 = v["epoch"].as_u64().expect("epoch");
    let others: Vec<u64> = NODES.into_iter().filter(|&n| n != p).collect();
    let at = 4 * MIB;
    let old = random_bytes(0x1a, BLOCK as usize);
    let new = random_bytes(0x1b, BLOCK as usize);
    let mut cl = NbdClient::connect(t.nbd_addr(p), VOLUME, Duration::from_secs(20)).expect("connect to the primary");
    cl.write(at, &old).expect("write the old data through the primary");
    cl.flush().expect("flush");
    cl.disconnect();
    wait_identical(&t, p, VOLUME, &NODES, Duration::from_secs(30));

    // Both clients connect before the cut; the test's own link to the primary stays up.
    let mut writer = NbdClient::connect(t.nbd_addr(p), VOLUME, Duration::from_secs(3)).expect("writer connects");
    let mut reader = NbdClient::connect(t.nbd_addr(p), VOLUME, Duration::from_secs(3)).expect("reader connects");
    t.isolate(p);
    let cut = Instant::now();
    let sent = new.clone();
    let write = std::thread::spawn(move || writer.write(at, &sent).map_err(|e| e.to_string()));
    // Long enough for the write to reach the primary and be sequenced, well inside the lease
    // (the read is then admitted: the primary still serves).
    std::thread::sleep(Duration::from_millis(300));
    let read_start = cut.elapsed();
    let read = reader.read(at, BLOCK as usize);
    let read_end = cut.elapsed();
    let write = write.join().expect("writer thread");
    println!(
        "read through cut-off node {p} from +{} to +{}: {}; the write: {}",
        secs(read_start),
        secs(read_end),
        match &read {
            Ok(d) if d[..] == new[..] => "served the unacknowledged write".to_string(),
            Ok(d) if d[..] == old[..] => "served the old data".to_string(),
            Ok(_) => "served other data".to_string(),
            Err(e) => format!("not served ({e})"),
        },
        match &write {
            Ok(()) => "acknowledged".to_string(),
            Err(e) => format!("not acknowledged ({e})"),
        }
    );
    assert!(read_start < LEASE, "the read must start while the primary's lease is valid (at +{})", secs(read_start));
    assert!(write.is_err(), "no backup could take the write, so it cannot have been acknowledged");
    if let Ok(data) = &read {
        assert!(data[..] != new[..], "the primary served a read of a write that no backup has (I6)");
        assert!(data[..] == old[..], "the read returned neither the old nor the new data");
    }

    // The primary dies; the majority fails over to a backup, which never had the write.
    t.kill(p);
    t.heal();
    let v1 = wait_for("the majority to fail the volume over", FAILURE_TIMEOUT + Duration::from_secs(20), || {
        let v = volume(&t, others[0], VOLUME)?;
        (v["primary"].as_u64()? != p && v["epoch"].as_u64()? > epoch0).then_some(v)
    });
    let q = v1["primary"].as_u64().expect("new primary");
    let mut cl =
        NbdClient::connect(t.nbd_addr(q), VOLUME, Duration::from_secs(20)).expect("connect to the new primary");
    let after = cl.read(at, BLOCK as usize).expect("read through the new primary");
    assert!(after[..] == old[..], "after the failover to node {q} the block holds the old data");
    println!("after the failover to node {q}: the block holds the old data, as every read through node {p} showed");
}
