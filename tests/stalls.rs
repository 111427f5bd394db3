//! A host must never see an I/O error from a cluster that can still serve: a paused primary
//! (a VM stun, a long stall), a paused backup or Raft leader, and a CPU-starved machine cost
//! the host latency, never an error, while a majority is up and an in-sync replica can serve.
//!
//! Every test here drives real `tandem` processes with real or independent clients, stops
//! nodes with SIGSTOP/SIGCONT, asserts zero host-visible errors, reads every byte back, and
//! prints the worst write latency the host saw.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_testkit::{
    block_version, create_served_volume, ids, random_bytes, require_tools, volume, wait_for, wait_identical, Cluster,
    NbdClient, Reap, Rng,
};

const LEADER_WAIT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// The clients' own timeout for one request: longer than the node's hold time (30 s), so
/// that a slow answer is never mistaken for a failed one; a request that takes this long
/// fails the test anyway.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits for `child` to exit within `timeout`; returns its stdout and stderr.
fn finish(mut child: Reap, timeout: Duration) -> (std::process::ExitStatus, String, String) {
    let mut stdout = child.0.stdout.take().expect("stdout piped");
    let mut stderr = child.0.stderr.take().expect("stderr piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = wait_for("the client to finish", timeout, || child.0.try_wait().ok().flatten());
    (status, out.join().expect("stdout reader"), err.join().expect("stderr reader"))
}

/// Every host request a node failed, from its log.
fn failed_requests(c: &Cluster) -> Vec<String> {
    let mut lines = Vec::new();
    for n in c.node_ids() {
        lines.extend(c.log_lines(n, "NBD request failed"));
        lines.extend(c.log_lines(n, "NBD read failed"));
    }
    lines
}

#[test]
fn a_primary_stopped_for_17_s_under_fio_costs_the_host_latency_not_errors() {
    require_tools(&["fio"]);
    let c = Cluster::up(3);
    let leader = c.agreed_leader(&c.node_ids(), LEADER_WAIT);
    let v = create_served_volume(&c, "vs", "64M");
    let p = v["primary"].as_u64().expect("primary");
    // The host writes through a node that is not the primary, so every write is proxied.
    let via = c.node_ids().into_iter().find(|&n| n != p).expect("another node");
    println!("primary {p}, Raft leader {leader}, fio writes through node {via}");
    let uri = format!("nbd://{}/vs", c.nbd_addr(via));
    let runtime_s = 40;
    let fio = Command::new("fio")
        .args([
            "--name=stall",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=16",
            "--size=64M",
            "--time_based",
            &format!("--runtime={runtime_s}"),
            "--verify=crc32c",
            // Verify as it goes: a time-based job has no verify phase of its own.
            "--verify_backlog=256",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio starts");
    let fio = Reap(fio);
    let started = Instant::now();

    // The schedule of the experiment, not a wait for a condition: 5 s of writes, then the
    // primary stops for 17 s while fio keeps writing.
    std::thread::sleep(Duration::from_secs(5));
    let paused = c.pause(p);
    let stopped_at = Instant::now();
    let (v1, failover_after) = wait_for("a failover away from the stopped primary", Duration::from_secs(30), || {
        let v = volume(&c, via, "vs")?;
        (v["primary"].as_u64()? != p).then(|| (v, stopped_at.elapsed()))
    });
    println!("failover to node {} (epoch {}) {failover_after:?} after the stop", v1["primary"], v1["epoch"]);
    let stop_for = Duration::from_secs(17);
    std::thread::sleep(stop_for.saturating_sub(stopped_at.elapsed()));
    paused.resume();
    println!("node {p} continued after {:?}", stopped_at.elapsed());

    let (status, out, err) = finish(fio, Duration::from_secs(runtime_s + 60));
    let failed = failed_requests(&c);
    assert!(status.success(), "fio failed ({status}): {err}\n{out}\nnode logs: {failed:#?}");
    let json: Value = serde_json::from_str(&out[out.find('{').expect("fio JSON")..]).expect("fio JSON output");
    let job = &json["jobs"][0];
    let written = job["write"]["io_bytes"].as_u64().expect("write bytes");
    let verified = job["read"]["io_bytes"].as_u64().expect("read bytes");
    let worst_ms = job["write"]["lat_ns"]["max"].as_f64().expect("write latency") / 1e6;
    println!(
        "fio: {} MiB written, {} MiB verified, error {}, worst write latency {worst_ms:.0} ms, ran {:?}",
        written / MIB,
        verified / MIB,
        job["error"],
        started.elapsed()
    );
    assert_eq!(job["error"].as_u64(), Some(0), "fio saw an error: {err}\nnode logs: {failed:#?}");
    assert!(failed.is_empty(), "nodes failed host requests: {failed:#?}");
    assert!(written > 0 && verified > 0, "fio wrote {written} and verified {verified} bytes");

    // The stopped node comes back as a backup, is resynced, and every copy is the same.
    let (v, _) = wait_identical(&c, via, "vs", &c.node_ids(), Duration::from_secs(90));
    println!("ISR {:?}, identical copies", ids(&v["isr"]));
}

/// CPU-burning processes beside the cluster, killed on drop.
fn burn_cpu(n: usize) -> Vec<Reap> {
    (0..n)
        .map(|_| Reap(Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("a CPU burner starts")))
        .collect()
}

/// One writer's record: per block, the value last acknowledged; and every failure.
#[derive(Default)]
struct Log {
    acked: HashMap<u64, u64>,
    writes: u64,
    failures: Vec<String>,
    /// (start, latency) of every acknowledged write.
    latencies: Vec<(Duration, Duration)>,
}

fn block_data(block: u64, value: u64) -> Vec<u8> {
    block_version(block, value, BLOCK as usize)
}

/// Writes 4 KiB blocks in `[first, first + blocks)` through `addr` on one connection until
/// told to stop; never reconnects: every failure is a host-visible error.
fn writer(
    addr: SocketAddr,
    first: u64,
    blocks: u64,
    seed: u64,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut cl = match NbdClient::connect(addr, "va", CLIENT_TIMEOUT) {
            Ok(cl) => cl,
            Err(e) => {
                log.lock().expect("log").failures.push(format!("connect to {addr}: {e}"));
                return;
            }
        };
        let mut rng = Rng::new(seed);
        let mut value = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let block = first + rng.below(blocks);
            value += 1;
            let start = epoch.elapsed();
            let result = cl.write(block * BLOCK, &block_data(block, value));
            let took = epoch.elapsed() - start;
            let mut l = log.lock().expect("log");
            l.writes += 1;
            match result {
                Ok(()) => {
                    l.acked.insert(block, value);
                    l.latencies.push((start, took));
                }
                Err(e) => {
                    l.failures.push(format!("write of block {block} through {addr} at +{start:?}: {e}"));
                    return;
                }
            }
        }
    })
}

/// Copies `src` into volume `vb` through `addr` with nbdcopy again and again until told to
/// stop; records each copy's duration and every failure.
fn copier(
    uri: String,
    src: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Result<Duration, String>>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let out = Command::new("nbdcopy").arg(&src).arg(&uri).output();
            let r = match out {
                Ok(o) if o.status.success() => Ok(t.elapsed()),
                Ok(o) => Err(format!("nbdcopy into {uri}: {}", String::from_utf8_lossy(&o.stderr).trim())),
                Err(e) => Err(format!("nbdcopy: {e}")),
            };
            let failed = r.is_err();
            log.lock().expect("log").push(r);
            if failed {
                return;
            }
        }
    })
}

#[test]
fn pauses_of_a_backup_the_primary_and_the_leader_on_a_starved_cluster_fail_no_write() {
    require_tools(&["nbdcopy"]);
    let c = Cluster::up(3);
    let nodes = c.node_ids();
    c.agreed_leader(&nodes, LEADER_WAIT);
    create_served_volume(&c, "va", "64M");
    create_served_volume(&c, "vb", "16M");
    let tmp = tempfile::tempdir().expect("temp dir");
    let src = tmp.path().join("src.bin");
    let seed = 0x57a1_1ed0_u64;
    println!("seed {seed:#x}");
    std::fs::write(&src, random_bytes(seed, 16 * MIB as usize)).expect("source file");

    // Two CPU burners on two cores: every node process gets about half the CPU it would.
    let burners = burn_cpu(2);
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let region = (64 * MIB / BLOCK) / nodes.len() as u64;
    let logs: Vec<Arc<Mutex<Log>>> = nodes.iter().map(|_| Arc::new(Mutex::new(Log::default()))).collect();
    let writers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, &n)| writer(c.nbd_addr(n), i as u64 * region, region, seed ^ n, epoch, stop.clone(), logs[i].clone()))
        .collect();
    let copies = Arc::new(Mutex::new(Vec::new()));
    let copy_via = nodes[nodes.len() - 1];
    let copy = copier(format!("nbd://{}/vb", c.nbd_addr(copy_via)), src.clone(), stop.clone(), copies.clone());

    // The schedule: each role paused for less and for more than the lease (1.5 s), the longer
    // pauses also past the failure timeout (2.5 s), so they cause failovers and elections.
    let mut report = Vec::new();
    for (role, pause) in
        [("backup", 1000), ("primary", 1000), ("leader", 1000), ("backup", 4000), ("primary", 4000), ("leader", 4000)]
    {
        let leader = c.agreed_leader(&nodes, Duration::from_secs(60));
        let v = volume(&c, leader, "va").expect("volume va");
        let primary = v["primary"].as_u64().expect("primary");
        let victim = match role {
            "primary" => primary,
            "leader" => leader,
            _ => ids(&v["isr"])
                .into_iter()
                .filter(|&n| n != primary)
                .min_by_key(|&n| n == leader)
                .expect("a backup in the ISR"),
        };
        let from = epoch.elapsed();
        let paused = c.pause(victim);
        std::thread::sleep(Duration::from_millis(pause));
        paused.resume();
        // Settled: both volumes have all three copies in sync again. A resync on this starved
        // machine copies about one 1 MiB chunk a second under the writers' load (a 64 MiB
        // volume took up to 85 s); the bound leaves room for that, not for a resync that stalls.
        let settle_deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let vols: Vec<Option<Value>> = ["va", "vb"].iter().map(|name| volume(&c, victim, name)).collect();
            if vols.iter().all(|v| v.as_ref().is_some_and(|v| ids(&v["isr"]).len() == nodes.len())) {
                break;
            }
            if Instant::now() > settle_deadline {
                let logs: Vec<String> = nodes
                    .iter()
                    .flat_map(|&n| {
                        let l = c.log_lines(n, "tandem_replication");
                        l.into_iter().map(move |x| format!("node {n}: {x}"))
                    })
                    .collect();
                panic!("copies not back in sync 180 s after the {role} pause: {vols:#?}\n{logs:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let to = epoch.elapsed();
        let worst = logs
            .iter()
            .flat_map(|l| {
                let l = l.lock().expect("log");
                l.latencies.iter().filter(|(s, d)| *s + *d >= from && *s <= to).map(|(_, d)| *d).max()
            })
            .max()
            .unwrap_or_default();
        let line = format!(
            "{role} (node {victim}, primary {primary}, leader {leader}) paused {pause} ms: worst write latency {} ms, settled {:.1} s after the pause began",
            worst.as_millis(),
            (to - from).as_secs_f64()
        );
        println!("{line}");
        report.push(line);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    copy.join().expect("copier");
    drop(burners);

    let failures: Vec<String> = logs.iter().flat_map(|l| l.lock().expect("log").failures.clone()).collect();
    let copy_failures: Vec<String> =
        copies.lock().expect("log").iter().filter_map(|r| r.as_ref().err().cloned()).collect();
    let writes: u64 = logs.iter().map(|l| l.lock().expect("log").writes).sum();
    let copies_done = copies.lock().expect("log").iter().filter(|r| r.is_ok()).count();
    println!("{writes} writes by {} clients, {copies_done} nbdcopy runs of 16 MiB", nodes.len());
    let node_failed = failed_requests(&c);
    assert!(failures.is_empty(), "host writes failed: {failures:#?}\nnode logs: {node_failed:#?}");
    assert!(copy_failures.is_empty(), "nbdcopy failed: {copy_failures:#?}\nnode logs: {node_failed:#?}");
    assert!(node_failed.is_empty(), "nodes failed host requests: {node_failed:#?}");
    assert!(copies_done > 0 && writes > 0, "the load ran: {writes} writes, {copies_done} copies");

    // Every acknowledged byte reads back through every node.
    for &n in &nodes {
        let mut cl = NbdClient::connect(c.nbd_addr(n), "va", CLIENT_TIMEOUT).expect("connect for checking");
        for l in &logs {
            for (&block, &value) in &l.lock().expect("log").acked {
                let got = cl.read(block * BLOCK, BLOCK as usize).expect("read back");
                assert!(got == block_data(block, value), "node {n}: block {block} lost acknowledged write {value}");
            }
        }
        let back = tmp.path().join(format!("back-{n}.bin"));
        let out = Command::new("nbdcopy")
            .arg(format!("nbd://{}/vb", c.nbd_addr(n)))
            .arg(&back)
            .output()
            .expect("nbdcopy runs");
        assert!(out.status.success(), "nbdcopy out of node {n}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            std::fs::read(&back).expect("copy") == std::fs::read(&src).expect("source"),
            "node {n}: vb differs from the last copy in"
        );
    }
    println!("worst write latency per pause:\n  {}", report.join("\n  "));
}
