//! The data plane end to end, against real `tandem` processes and real NBD clients: writes
//! through one node read back through the others, large copies with nbdcopy, fio and qemu-img
//! as hosts use them, kill -9 of the primary and of a backup under a write stream (no
//! acknowledged write lost, replicas identical), resync of only what changed, bounded
//! memory while a large volume is read out, and the read buffers of many clients held within
//! the node's cap.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_testkit::{
    block_version, create_served_volume, ids, local_copy, qemu_io_ok as qemu_io, random_bytes, require_tools,
    run_ok as tool, volume, wait_for, wait_identical, Cluster, NbdClient, Reconnecting, Rng,
};

const LEADER_WAIT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn nbd_url(c: &Cluster, id: u64, volume: &str) -> String {
    format!("nbd://{}/{volume}", c.nbd_addr(id))
}

/// Node `id`'s own copy of `name`, read back from its store (not through the primary): the
/// `data_digest` of `GET /v1/local/volumes?data=true`.
fn data_digest(c: &Cluster, id: u64, name: &str) -> String {
    let v: Value = c
        .http()
        .get(format!("{}/v1/local/volumes?data=true", c.api(id)))
        .timeout(Duration::from_secs(120))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("node {id}: local volumes with data digests: {e}"));
    let copy = v["volumes"].as_array().and_then(|a| a.iter().find(|x| x["name"] == name));
    let copy = copy.unwrap_or_else(|| panic!("node {id} holds no copy of {name}: {v}"));
    copy["data_digest"].as_str().unwrap_or_else(|| panic!("node {id}: no data digest of {name}: {copy}")).to_string()
}

/// What `data_digest` says of a copy holding `data`: the crc32c of each 4 KiB block, folded
/// with FNV-1a.
fn digest_of(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for block in data.chunks(BLOCK as usize) {
        for b in crc32c::crc32c(block).to_be_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Every node in `nodes` holds `want` in its own store: read there, not through the primary
/// (which every NBD read reaches).
fn assert_replicas_hold(c: &Cluster, nodes: &[u64], name: &str, want: &[u8]) {
    let want = digest_of(want);
    for &n in nodes {
        let got = data_digest(c, n, name);
        assert_eq!(got, want, "node {n}: its own copy of {name}, read from its store, is not what was written");
    }
}

fn create_volume(c: &Cluster, name: &str, size: &str) -> Value {
    require_tools(&["qemu-io", "qemu-img", "nbdinfo", "nbdcopy", "fio"]);
    create_served_volume(c, name, size)
}

#[test]
fn real_clients_write_through_one_node_and_read_through_the_others() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let v = create_volume(&c, "v1", "256M");
    let primary = v["primary"].as_u64().expect("primary");
    let other = c.node_ids().into_iter().find(|&n| n != primary).expect("a non-primary node");

    // Written through a node that is not the primary (so proxied), read back everywhere.
    qemu_io(&nbd_url(&c, other, "v1"), &["write -P 0xab 0 1M", "write -P 0xcd 100M 64k", "flush"]);
    for n in c.node_ids() {
        let url = nbd_url(&c, n, "v1");
        qemu_io(&url, &["read -P 0xab 0 1M", "read -P 0xcd 100M 64k", "read -P 0 1M 1M"]);
    }
    let listed = tool("nbdinfo", &["--list", &format!("nbd://{}", c.nbd_addr(2))]);
    assert!(listed.contains("v1"), "nbdinfo --list: {listed}");

    // 256 MiB of random data in through node 1, out through node 3, bit-exact.
    let tmp = tempfile::tempdir().expect("temp dir");
    let src = tmp.path().join("src.bin");
    let back = tmp.path().join("back.bin");
    let seed = 0x7a4d_e11a;
    println!("nbdcopy payload seed {seed:#x}");
    std::fs::write(&src, random_bytes(seed, 256 * MIB as usize)).expect("write source");
    tool("nbdcopy", &[src.to_str().expect("path"), &nbd_url(&c, 1, "v1")]);
    tool("nbdcopy", &[&nbd_url(&c, 3, "v1"), back.to_str().expect("path")]);
    let (a, b) = (std::fs::read(&src).expect("src"), std::fs::read(&back).expect("back"));
    assert!(a == b, "nbdcopy round trip differs");
    // A backup that fell behind under the copy (2 s without an ack) left the ISR and is
    // resynced: up to the whole 256 MiB, one chunk at a time.
    wait_identical(&c, 1, "v1", &[1, 2, 3], Duration::from_secs(120));
    // Every read above reached the primary; each replica's own data is what was copied in.
    assert_replicas_hold(&c, &[1, 2, 3], "v1", &a);
}

/// What a writer did: per block, the latest acknowledged value and any later attempts.
#[derive(Default)]
struct History {
    acked: HashMap<u64, u64>,
    /// Values written after the last acknowledged one that failed or were interrupted: the
    /// block may hold any of them.
    maybe: HashMap<u64, Vec<u64>>,
    acked_total: u64,
    failed_total: u64,
    /// The slowest acknowledged write, as the host saw it.
    latency_max: Duration,
}

fn block_data(block: u64, value: u64) -> Vec<u8> {
    block_version(block, value, BLOCK as usize)
}

/// Writes numbered 4 KiB blocks until told to stop, reconnecting through `nodes` in turn when
/// a write fails; records every outcome in `history`.
fn write_stream(
    addrs: Vec<SocketAddr>,
    volume: String,
    blocks: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let mut client = Reconnecting::new(addrs, &volume, Duration::from_secs(45));
        let mut value = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let block = rng.below(blocks);
            value += 1;
            let Ok(cl) = client.get() else { continue };
            let started = Instant::now();
            let result = cl.write(block * BLOCK, &block_data(block, value));
            let took = started.elapsed();
            let mut h = history.lock().expect("history");
            match result {
                Ok(()) => {
                    h.latency_max = h.latency_max.max(took);
                    h.acked.insert(block, value);
                    h.maybe.remove(&block);
                    h.acked_total += 1;
                }
                Err(_) => {
                    h.maybe.entry(block).or_default().push(value);
                    h.failed_total += 1;
                    client.broken();
                }
            }
        }
    })
}

/// Every acknowledged write reads back through every node in `nodes`.
fn check_history(c: &Cluster, nodes: &[u64], name: &str, history: &History) {
    for &n in nodes {
        let mut cl = NbdClient::connect(c.nbd_addr(n), name, Duration::from_secs(20)).expect("connect for checking");
        for (&block, &value) in &history.acked {
            let got = cl.read(block * BLOCK, BLOCK as usize).expect("read back");
            let ok = got == block_data(block, value)
                || history.maybe.get(&block).is_some_and(|later| later.iter().any(|&v| got == block_data(block, v)));
            assert!(ok, "node {n}: block {block} lost acknowledged write {value}");
        }
    }
}

/// Every replica in `nodes` holds what the writer left, in its own store: each block's
/// acknowledged value, or a later attempt that may have landed (as read through `via`), and
/// zeros where nothing was written. The volumes written are 64 MiB.
fn check_replicas(c: &Cluster, via: u64, nodes: &[u64], name: &str, history: &History) {
    let mut image = vec![0u8; 64 * MIB as usize];
    let mut cl = NbdClient::connect(c.nbd_addr(via), name, Duration::from_secs(20)).expect("connect for checking");
    let written: std::collections::BTreeSet<u64> = history.acked.keys().chain(history.maybe.keys()).copied().collect();
    for block in written {
        let got = cl.read(block * BLOCK, BLOCK as usize).expect("read back");
        let acked = history.acked.get(&block);
        let ok = acked.map_or(got == vec![0u8; BLOCK as usize], |&v| got == block_data(block, v))
            || history.maybe.get(&block).is_some_and(|later| later.iter().any(|&v| got == block_data(block, v)));
        assert!(ok, "node {via}: block {block} holds neither its acknowledged write {acked:?} nor a later attempt");
        let at = (block * BLOCK) as usize;
        image[at..at + BLOCK as usize].copy_from_slice(&got);
    }
    assert_replicas_hold(c, nodes, name, &image);
}

/// Creates 64 MiB volumes `<prefix>1`, `<prefix>2`, ... until one has its primary on the Raft
/// leader's node (`on_leader`) or off it; its name. Primaries are spread by volume id: of three
/// volumes, one has each node as primary.
fn volume_led_by(c: &Cluster, prefix: &str, leader: u64, on_leader: bool) -> String {
    for i in 1..=3 {
        let name = format!("{prefix}{i}");
        let v = create_volume(c, &name, "64M");
        if (v["primary"].as_u64() == Some(leader)) == on_leader {
            return name;
        }
    }
    panic!("no volume with the wanted primary (leader {leader}, on the leader: {on_leader})");
}

/// Kills the primary of a volume under a stream of writes through the other nodes: no write
/// fails (the host only waits), none acknowledged is lost, and the old primary rejoins. With
/// `leader_too`, the primary killed also leads Raft, so an election comes before the failover.
fn kill_the_primary_under_writes(leader_too: bool) {
    let c = Cluster::up(3);
    let leader = c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let name = volume_led_by(&c, "vk", leader, leader_too);
    let name = name.as_str();
    let primary = volume(&c, 1, name).and_then(|v| v["primary"].as_u64()).expect("primary");
    let survivors: Vec<u64> = c.node_ids().into_iter().filter(|&n| n != primary).collect();
    let seed = 0x5eed_0001;
    println!("write stream seed {seed:#x}; volume {name}, primary {primary}, Raft leader {leader}");
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let addrs: Vec<SocketAddr> = survivors.iter().map(|&n| c.nbd_addr(n)).collect();
    let writer = write_stream(addrs, name.into(), 2048, seed, stop.clone(), history.clone());
    wait_for("200 acknowledged writes", Duration::from_secs(60), || {
        (history.lock().expect("history").acked_total >= 200).then_some(())
    });
    if leader_too {
        assert_eq!(c.agreed_leader(&c.node_ids(), LEADER_WAIT), primary, "the primary still leads Raft");
    }
    let before_kill = history.lock().expect("history").acked_total;
    c.kill(primary);
    let killed = Instant::now();
    wait_for("writes to resume through a survivor", Duration::from_secs(60), || {
        (history.lock().expect("history").acked_total >= before_kill + 200).then_some(())
    });
    println!("writes resumed; 200 more acknowledged {:?} after the kill", killed.elapsed());
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let h = history.lock().expect("history");
    println!("acknowledged {}, failed {}, worst write latency {:?}", h.acked_total, h.failed_total, h.latency_max);
    assert_eq!(h.failed_total, 0, "a host write failed while a survivor could serve (kill of node {primary})");
    let v = volume(&c, survivors[0], name).expect("volume");
    assert!(survivors.contains(&v["primary"].as_u64().expect("primary")), "a survivor is primary: {v}");
    assert!(v["epoch"].as_u64().expect("epoch") >= 2, "the epoch moved on: {v}");
    check_history(&c, &survivors, name, &h);
    wait_identical(&c, survivors[0], name, &survivors, Duration::from_secs(30));
    check_replicas(&c, survivors[0], &survivors, name, &h);

    // The old primary returns: it is resynced, rejoins, and holds the same data.
    c.restart_missing();
    wait_identical(&c, survivors[0], name, &[1, 2, 3], Duration::from_secs(60));
    check_history(&c, &[primary], name, &h);
    check_replicas(&c, survivors[0], &[1, 2, 3], name, &h);
}

#[test]
fn killing_the_primary_under_writes_fails_and_loses_no_write() {
    kill_the_primary_under_writes(false);
}

#[test]
fn killing_a_primary_that_leads_raft_under_writes_fails_and_loses_no_write() {
    kill_the_primary_under_writes(true);
}

/// Issue 13, finding 1, against real processes: while the primary re-adds a backup that was
/// cut out of the ISR, the primary's lease blips (SIGSTOP for longer than the lease, shorter
/// than the failure timeout); then the primary is killed with SIGKILL. Whatever the order in
/// which the re-add, the blip and the failover land, no host write fails, every acknowledged
/// write reads back on every replica, and the replicas end identical. A primary started again
/// after its core was lost never runs in the epoch of its earlier start (docs/PROTOCOL.md,
/// "One primary per epoch").
#[test]
fn a_lease_blip_of_the_primary_during_a_re_add_then_its_kill_loses_no_write() {
    let c = Cluster::up(3);
    let leader = c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    // A volume whose primary does not lead Raft: its stop then costs the cluster no election.
    let name = volume_led_by(&c, "vb", leader, false);
    let name = name.as_str();
    let primary = volume(&c, 1, name).and_then(|v| v["primary"].as_u64()).expect("primary");
    let others: Vec<u64> = c.node_ids().into_iter().filter(|&n| n != primary).collect();
    // The backup to cut out and re-add: the one that does not lead Raft.
    let readded = *others.iter().find(|&&n| n != leader).expect("a backup that does not lead");
    let epoch0 = volume(&c, leader, name).and_then(|v| v["epoch"].as_u64()).expect("epoch");
    let seed = 0x5eed_0013;
    println!("write stream seed {seed:#x}; volume {name}, primary {primary}, leader {leader}, re-added {readded}");
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    // Through the leader's node (proxied to the primary): it is never stopped.
    let writer = write_stream(vec![c.nbd_addr(leader)], name.into(), 2048, seed, stop.clone(), history.clone());
    let acked = |n: u64| {
        let h = history.clone();
        move || (h.lock().expect("history").acked_total >= n).then_some(())
    };
    wait_for("100 acknowledged writes", Duration::from_secs(60), acked(100));

    // Cut the backup out of the ISR: it stops answering for longer than the ack timeout.
    let paused = c.pause(readded);
    let shrunk = wait_for("the ISR to drop the stopped backup", Duration::from_secs(30), || {
        let v = volume(&c, leader, name)?;
        (!ids(&v["isr"]).contains(&readded)).then_some(v)
    });
    paused.resume();
    println!("node {readded} left the ISR: {shrunk}");
    // As soon as its resync is under way, the primary's lease blips.
    let seen = wait_for("the backup's resync to start", Duration::from_secs(30), || {
        let v = volume(&c, leader, name)?;
        let resyncing = v["resync"].as_array()?.iter().any(|r| r["node"].as_u64() == Some(readded));
        (resyncing || ids(&v["isr"]).contains(&readded)).then_some(v)
    });
    let blip = c.pause(primary);
    println!("lease blip of node {primary} starts; the volume was {seen}");
    std::thread::sleep(tandem_node::lease::LEASE + Duration::from_millis(300));
    blip.resume();
    let n = history.lock().expect("history").acked_total;
    wait_for("writes to go on after the blip", Duration::from_secs(60), acked(n + 100));

    // The primary dies.
    let before_kill = history.lock().expect("history").acked_total;
    c.kill(primary);
    wait_for("writes to resume after the kill", Duration::from_secs(60), acked(before_kill + 100));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let h = history.lock().expect("history");
    let v = volume(&c, leader, name).expect("volume");
    println!(
        "acknowledged {}, failed {}, worst write latency {:?}; volume now {v}",
        h.acked_total, h.failed_total, h.latency_max
    );
    assert_eq!(h.failed_total, 0, "a host write failed while a survivor could serve");
    assert!(others.contains(&v["primary"].as_u64().expect("primary")), "a survivor is primary: {v}");
    assert!(v["epoch"].as_u64().expect("epoch") > epoch0, "the epoch moved on: {v}");
    let survivors_isr = ids(&v["isr"]);
    check_history(&c, &survivors_isr, name, &h);
    wait_identical(&c, leader, name, &others, Duration::from_secs(60));
    check_history(&c, &others, name, &h);
    check_replicas(&c, leader, &others, name, &h);

    // The old primary returns, is resynced, and holds the same data.
    c.restart_missing();
    wait_identical(&c, leader, name, &[1, 2, 3], Duration::from_secs(60));
    check_history(&c, &[primary], name, &h);
    check_replicas(&c, leader, &[1, 2, 3], name, &h);
}

#[test]
fn a_returning_backup_resyncs_only_what_changed() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let v = create_volume(&c, "vr", "256M");
    let primary = v["primary"].as_u64().expect("primary");
    let backup = c.node_ids().into_iter().find(|&n| n != primary).expect("a backup");
    let url = nbd_url(&c, primary, "vr");
    qemu_io(&url, &["write -P 0x11 0 8M"]);
    wait_identical(&c, primary, "vr", &[1, 2, 3], Duration::from_secs(20));

    c.kill(backup);
    // Writes continue once the ISR has shrunk.
    qemu_io(&url, &["write -P 0x22 64M 1M", "write -P 0x33 200M 512k", "write -P 0x44 4M 4k"]);
    let v = volume(&c, primary, "vr").expect("volume");
    assert!(!ids(&v["isr"]).contains(&backup), "the dead backup left the ISR: {v}");
    let resync = |field: &str| local_copy(&c, primary, "vr").expect("copy")[field].as_u64().expect("bytes");
    let (sent_before, compared_before) = (resync("resync_bytes_sent"), resync("resync_bytes_compared"));

    c.restart_missing();
    wait_identical(&c, primary, "vr", &[1, 2, 3], Duration::from_secs(60));
    let sent = resync("resync_bytes_sent") - sent_before;
    let compared = resync("resync_bytes_compared") - compared_before;
    println!("resync compared {compared} bytes and moved {sent} bytes of a 256 MiB volume");
    assert!(sent > 0, "the returning backup missed writes, so something must move");
    assert!(sent <= 8 * MIB, "resync moved {sent} bytes; only ~1.5 MiB changed");
    // Only the chunks written while it was away are compared (3 chunks of 1 MiB), not the
    // whole volume: a resync that compared every chunk would also send only ~1.5 MiB.
    assert!(compared >= sent, "resync sent {sent} bytes but compared only {compared}");
    assert!(compared <= 8 * MIB, "resync compared {compared} bytes of a 256 MiB volume; only 3 chunks changed");
    qemu_io(&nbd_url(&c, backup, "vr"), &["read -P 0x22 64M 1M", "read -P 0x33 200M 512k", "read -P 0x11 0 4M"]);
}

#[test]
fn fio_and_qemu_img_use_a_volume_through_a_non_primary_node() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let v = create_volume(&c, "vf", "64M");
    let primary = v["primary"].as_u64().expect("primary");
    let other = c.node_ids().into_iter().find(|&n| n != primary).expect("a non-primary node");
    let uri = nbd_url(&c, other, "vf");
    let out = tool(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No state file in the working directory.
            "--verify_state_save=0",
        ],
    );
    assert!(out.contains("err= 0"), "fio reported errors: {out}");

    let tmp = tempfile::tempdir().expect("temp dir");
    let img = tmp.path().join("disk.img");
    std::fs::write(&img, random_bytes(0xd15c, 64 * MIB as usize)).expect("image");
    let img = img.to_str().expect("path");
    tool("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", img, &uri]);
    let cmp = tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", img, &nbd_url(&c, primary, "vf")]);
    assert!(cmp.contains("identical"), "qemu-img compare: {cmp}");
}

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[test]
fn reading_a_large_volume_out_keeps_memory_bounded() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let v = create_volume(&c, "vm", "1G");
    let primary = v["primary"].as_u64().expect("primary");
    let other = c.node_ids().into_iter().find(|&n| n != primary).expect("a non-primary node");
    // Some real data, so the reads are not all of unallocated blocks.
    qemu_io(&nbd_url(&c, primary, "vm"), &["write -P 0x5a 0 64M", "write -P 0xa5 900M 64M"]);
    for node in [other, primary] {
        let pid = c.pid(node);
        let before = rss_bytes(pid);
        let mut copy = Command::new("nbdcopy").args([&nbd_url(&c, node, "vm"), "null:"]).spawn().expect("nbdcopy");
        let mut peak = before;
        let status = loop {
            peak = peak.max(rss_bytes(pid));
            if let Some(s) = copy.try_wait().expect("wait") {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "nbdcopy out of node {node} failed");
        let growth = peak.saturating_sub(before);
        println!("node {node}: RSS {before} -> peak {peak} (+{} MiB) while 1 GiB was read", growth / MIB);
        assert!(growth < 64 * MIB, "node {node} grew by {growth} bytes while serving a 1 GiB read");
        let high_water = read_buffers(&c, node)["read_buffer_bytes_high_water"].as_u64().expect("high water");
        assert!(high_water <= READ_BUFFER_BYTES_MAX, "node {node} held {high_water} bytes of read buffers at once");
    }
}

/// The cap on the read buffers of all NBD connections of a node together, as the node
/// documents it (`tandem_nbd::READ_BUFFER_BYTES_MAX`): a black-box test asserts the figure.
const READ_BUFFER_BYTES_MAX: u64 = 8 * MIB;
/// The largest piece of a read a node buffers (`tandem_nbd::READ_CHUNK_BYTES`).
const READ_CHUNK_BYTES: u64 = 256 * 1024;
/// nbdcopy processes reading at once: each reads over 4 connections with 64 requests of 256 KiB
/// in flight (up to its 16 MiB queue), so together they ask for many times the cap.
const READERS: usize = 8;

/// The node's shared read-buffer budget, from `GET /v1/local/volumes` (field `frontend`).
fn read_buffers(c: &Cluster, id: u64) -> Value {
    let v: Value = c
        .http()
        .get(format!("{}/v1/local/volumes", c.api(id)))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("GET /v1/local/volumes of node {id}: {e}"));
    v["frontend"].clone()
}

/// Many clients reading at full queue depth through one node fill its read-buffer cap and
/// never go over it: the high-water mark of buffers reserved at once ends within one read
/// chunk of the cap (the cap held readers back) and not above it (it was kept), on a node
/// that proxies to the primary and on the primary itself.
#[test]
fn many_clients_reading_at_once_fill_the_read_buffer_cap_and_never_exceed_it() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let v = create_volume(&c, "vc", "64M");
    let primary = v["primary"].as_u64().expect("primary");
    let other = c.node_ids().into_iter().find(|&n| n != primary).expect("a non-primary node");
    qemu_io(&nbd_url(&c, primary, "vc"), &["write -P 0x5a 0 16M", "write -P 0xa5 48M 16M"]);
    for node in [other, primary] {
        let before = read_buffers(&c, node);
        assert_eq!(before["read_buffer_bytes_max"].as_u64(), Some(READ_BUFFER_BYTES_MAX), "node {node}: {before}");
        let url = nbd_url(&c, node, "vc");
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                Command::new("nbdcopy")
                    .args(["--connections=4", "--requests=64", "--request-size=262144", &url, "null:"])
                    .spawn()
                    .expect("nbdcopy")
            })
            .collect();
        let failed = readers.into_iter().filter_map(|mut r| (!r.wait().expect("wait").success()).then_some(())).count();
        // Buffers are given back when their reply is out, just after the client has it.
        let after = wait_for("the read buffers to be given back", Duration::from_secs(10), || {
            let after = read_buffers(&c, node);
            (after["read_buffer_bytes_reserved"].as_u64() == Some(0)).then_some(after)
        });
        println!("node {node}: read buffers {before} -> {after} with {READERS} nbdcopy readers");
        let high_water = after["read_buffer_bytes_high_water"].as_u64().expect("high water");
        assert!(
            high_water <= READ_BUFFER_BYTES_MAX,
            "node {node} held {high_water} bytes of read buffers at once, over the {READ_BUFFER_BYTES_MAX} cap"
        );
        assert!(
            high_water > READ_BUFFER_BYTES_MAX - READ_CHUNK_BYTES,
            "node {node} held at most {high_water} bytes of read buffers with {READERS} readers at full queue \
             depth: the {READ_BUFFER_BYTES_MAX} byte cap was never reached"
        );
        // Checked last: without the cap, reads pile up until some fail, which would hide which
        // of the bounds above broke.
        assert_eq!(failed, 0, "{failed} of {READERS} nbdcopy readers out of node {node} failed");
    }
}

#[test]
fn switching_the_data_transport_under_writes_fails_no_write() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let v = create_volume(&c, "vs", "64M");
    let primary = v["primary"].as_u64().expect("primary");
    let other = c.node_ids().into_iter().find(|&n| n != primary).expect("a non-primary node");
    let seed = 0x5eed_0002;
    println!("write stream seed {seed:#x}");
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    // Through a non-primary node: the proxied I/O and the replication both cross the switch.
    let writer = write_stream(vec![c.nbd_addr(other)], "vs".into(), 1024, seed, stop.clone(), history.clone());
    let acked = || history.lock().expect("history").acked_total;
    for (i, kind) in ["quic", "tcp", "quic", "tcp"].iter().enumerate() {
        let before = acked();
        c.admin(&["transport", "set", kind, "--layer", "data"]);
        wait_for(&format!("every replication link on {kind}"), Duration::from_secs(30), || {
            let status: Value = serde_json::from_str(&c.admin(&["transport", "status", "--json"])).ok()?;
            let links: Vec<Value> = status
                .as_array()?
                .iter()
                .flat_map(|v| v["links"].as_array().cloned().unwrap_or_default())
                .filter(|l| l["channel"].as_str().is_some_and(|c| c.eq_ignore_ascii_case("replication")))
                .collect();
            (links.len() >= 2 && links.iter().all(|l| l["transport"] == *kind)).then_some(())
        });
        wait_for(&format!("writes to go on after switch {i} to {kind}"), Duration::from_secs(30), || {
            (acked() >= before + 100).then_some(())
        });
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let h = history.lock().expect("history");
    println!("acknowledged {}, failed {}", h.acked_total, h.failed_total);
    assert_eq!(h.failed_total, 0, "a write failed across a transport switch");
    let status: Value = serde_json::from_str(&c.admin(&["transport", "status", "--json"])).expect("json");
    let switches: u64 = status
        .as_array()
        .expect("views")
        .iter()
        .flat_map(|v| v["links"].as_array().cloned().unwrap_or_default())
        .filter(|l| l["channel"].as_str().is_some_and(|c| c.eq_ignore_ascii_case("replication")))
        .filter_map(|l| l["switches"].as_u64())
        .sum();
    assert!(switches >= 4, "the replication links did not switch: {status}");
    let v = volume(&c, 1, "vs").expect("volume");
    assert_eq!(ids(&v["isr"]), vec![1, 2, 3], "no replica left the ISR over a switch: {v}");
    check_history(&c, &c.node_ids(), "vs", &h);
    wait_identical(&c, 1, "vs", &[1, 2, 3], Duration::from_secs(20));
}

/// Bytes the files under `dir` occupy on disk (holes not counted).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            total += if meta.is_dir() { disk_bytes(&e.path()) } else { meta.blocks() * 512 };
        }
    }
    total
}

#[test]
fn deleting_a_volume_frees_its_space_on_every_replica() {
    let c = Cluster::up(3);
    c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let v = create_volume(&c, "vd", "64M");
    let primary = v["primary"].as_u64().expect("primary");
    let blocks = |n: u64| c.path().join(format!("node-{n}")).join("blocks").join("segments");
    let before: Vec<u64> = c.node_ids().iter().map(|&n| disk_bytes(&blocks(n))).collect();
    qemu_io(&nbd_url(&c, primary, "vd"), &["write -P 0x77 0 32M"]);
    wait_identical(&c, primary, "vd", &[1, 2, 3], Duration::from_secs(20));
    for (i, &n) in c.node_ids().iter().enumerate() {
        let used = disk_bytes(&blocks(n));
        assert!(used >= before[i] + 32 * MIB, "node {n} holds the 32 MiB written: {before:?} -> {used}");
    }
    c.admin(&["volume", "delete", "vd"]);
    for (i, &n) in c.node_ids().iter().enumerate() {
        wait_for(&format!("node {n} to free the deleted volume's space"), Duration::from_secs(30), || {
            (disk_bytes(&blocks(n)) < before[i] + 4 * MIB).then_some(())
        });
    }
}
