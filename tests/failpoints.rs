//! Failpoints in real `tandem` processes (the chaos build: `tandem_chaos_bin`, with the
//! `failpoints` feature): the debug API that sets them, and what the product guarantees when
//! each fires — a primary whose `fdatasync` fails drops out and the volume fails over, the
//! host's write waiting through it; a backup whose acknowledgements are lost
//! leaves the ISR through a committed change and the host's writes complete; cleared, it
//! returns through resync. The default build has no debug endpoints.
//!
//! Every wait polls with a deadline; the deadlines are generous for a starved 2-core machine.

use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_testkit::{
    create_served_volume, ids, random_bytes, tandem_bin, tandem_chaos_bin, volume, wait_for, wait_identical, Cluster,
    NbdClient,
};

/// Longer than the node's hold time (30 s): a slow answer is not mistaken for a failed one.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const CHANGE_WAIT: Duration = Duration::from_secs(90);
const RESYNC_WAIT: Duration = Duration::from_secs(180);
const BLOCK: usize = 4096;

fn chaos_cluster(nodes: u32) -> Cluster {
    Cluster::builder().exe(tandem_chaos_bin()).nodes(nodes).start().unwrap_or_else(|e| panic!("{e}"))
}

/// `PUT /v1/debug/failpoints/{name}` on node `id`: the status and the JSON answer.
fn set_failpoint(c: &Cluster, id: u64, name: &str, actions: &str) -> (u16, Value) {
    let url = format!("{}/v1/debug/failpoints/{name}", c.api(id));
    let resp = c
        .http()
        .put(&url)
        .json(&serde_json::json!({ "actions": actions }))
        .send()
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn must_set(c: &Cluster, id: u64, name: &str, actions: &str) {
    let (status, body) = set_failpoint(c, id, name, actions);
    assert_eq!(status, 200, "set {name}={actions} on node {id}: {body}");
}

/// `GET /v1/debug/failpoints` on node `id`: name → actions.
fn failpoints(c: &Cluster, id: u64) -> (u16, Vec<(String, String)>) {
    let url = format!("{}/v1/debug/failpoints", c.api(id));
    let resp = c.http().get(&url).send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body: Value = resp.json().unwrap_or(Value::Null);
    let list = body["failpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    (f["name"].as_str().unwrap_or("").to_string(), f["actions"].as_str().unwrap_or("").to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    (status, list)
}

fn actions_of(c: &Cluster, id: u64, name: &str) -> String {
    let (status, list) = failpoints(c, id);
    assert_eq!(status, 200);
    list.into_iter().find(|(n, _)| n == name).map(|(_, a)| a).unwrap_or_else(|| panic!("{name} not listed"))
}

#[test]
fn the_debug_api_lists_sets_and_clears_failpoints_and_refuses_bad_input() {
    // TANDEM_FAILPOINTS at startup, reaching the node through `tandem up`. A setting that never
    // fires (0%), so a cluster another test starts meanwhile with this environment is unharmed.
    std::env::set_var("TANDEM_FAILPOINTS", "journal-after-fsync=0%return");
    let c = chaos_cluster(1);
    std::env::remove_var("TANDEM_FAILPOINTS");
    assert_eq!(actions_of(&c, 1, "journal-after-fsync"), "0%return");
    must_set(&c, 1, "journal-after-fsync", "off");
    let (status, list) = failpoints(&c, 1);
    assert_eq!(status, 200);
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "journal-before-fsync",
        "journal-after-fsync",
        "backup-before-reply",
        "isr-before-propose",
        "snapshot-before-install",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert!(list.iter().all(|(_, a)| a == "off"), "nothing set yet: {list:?}");

    let (status, body) = set_failpoint(&c, 1, "no-such-failpoint", "return");
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("no-such-failpoint")), "{body}");
    let (status, body) = set_failpoint(&c, 1, "snapshot-before-install", "sometimes");
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(actions_of(&c, 1, "snapshot-before-install"), "off", "a refused setting changes nothing");

    // Nothing on a one-node cluster installs a snapshot or proposes a change here: harmless.
    let (status, body) = set_failpoint(&c, 1, "snapshot-before-install", "20%return");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["actions"], "20%return");
    must_set(&c, 1, "isr-before-propose", "1*sleep(10)");
    assert_eq!(actions_of(&c, 1, "snapshot-before-install"), "20%return");
    assert_eq!(actions_of(&c, 1, "isr-before-propose"), "1*sleep(10)");
    must_set(&c, 1, "snapshot-before-install", "off");
    must_set(&c, 1, "isr-before-propose", "off");
    assert_eq!(actions_of(&c, 1, "snapshot-before-install"), "off");
    assert_eq!(actions_of(&c, 1, "isr-before-propose"), "off");
}

#[test]
fn a_default_build_has_no_failpoint_endpoints() {
    let c = Cluster::builder().exe(tandem_bin()).nodes(1).start().unwrap_or_else(|e| panic!("{e}"));
    let (status, _) = failpoints(&c, 1);
    assert_eq!(status, 404);
    let (status, _) = set_failpoint(&c, 1, "journal-before-fsync", "return");
    assert_eq!(status, 404);
}

/// `journal-before-fsync=return` on the primary: its flush fails and its store is poisoned (as
/// after a real failed `fdatasync`) until the node restarts. The node drops out on its own — it
/// builds no new primary and stops renewing its lease — so the leader fails the volume over to
/// an in-sync backup with nobody killing anything, and the epoch does not churn. The host's
/// write in flight is never acknowledged by the failed node: it waits through the failover and
/// is acknowledged by the new primary (no error, only latency), through another node and
/// through the failed node itself (which still proxies). Restarted, the node resyncs to an
/// identical copy.
#[test]
fn a_primary_whose_fsync_fails_drops_out_and_the_volume_fails_over_without_a_host_error() {
    let c = chaos_cluster(3);
    let v = create_served_volume(&c, "fsync", "16M");
    let p = v["primary"].as_u64().expect("primary");
    let epoch = v["epoch"].as_u64().expect("epoch");
    let via = c.node_ids().into_iter().find(|&n| n != p).expect("another node");
    println!("primary {p} (epoch {epoch}), writes through node {via}");
    let mut client = NbdClient::connect(c.nbd_addr(via), "fsync", CLIENT_TIMEOUT).expect("connect");
    let a = random_bytes(1, 16 * BLOCK);
    client.write(0, &a).expect("a write before the failpoint");

    must_set(&c, p, "journal-before-fsync", "return");
    let b = random_bytes(2, 16 * BLOCK);
    let started = Instant::now();
    client.write(0, &b).expect("the write waits through the failover and succeeds");
    println!("the write completed after {:?}", started.elapsed());
    let now = volume(&c, via, "fsync").expect("the volume");
    let moved = now["primary"].as_u64().expect("primary");
    assert_ne!(moved, p, "the write was acknowledged while the failed node was still primary: {now}");
    assert!(c.log_lines(p, "no longer renewing its lease").len() == 1, "the failed node kept its lease");
    assert!(!ids(&now["isr"]).contains(&p), "the failed node is still in the ISR: {now}");
    // One failover and the new primary's claim, not an epoch per attempt to serve again.
    let churn = now["epoch"].as_u64().expect("epoch") - epoch;
    assert!(churn <= 3, "the epoch churned: {epoch} -> {now}");
    assert_eq!(client.read(0, b.len()).expect("read back"), b);

    // Through the failed node: it proxies to the new primary.
    let mut at_failed = NbdClient::connect(c.nbd_addr(p), "fsync", CLIENT_TIMEOUT).expect("connect to the failed node");
    let d = random_bytes(3, 16 * BLOCK);
    at_failed.write(16 * BLOCK as u64, &d).expect("a write through the failed node");
    assert_eq!(client.read(16 * BLOCK as u64, d.len()).expect("read back"), d);
    // Still out a while later: no primary on a poisoned store, no lease, no churn.
    std::thread::sleep(Duration::from_secs(3));
    let later = volume(&c, via, "fsync").expect("the volume");
    assert_eq!(later["primary"], now["primary"], "{later}");
    assert_eq!(later["epoch"], now["epoch"], "the epoch moved with no fault: {later}");

    // Clearing the failpoint does not heal the poisoned store: a restart does.
    must_set(&c, p, "journal-before-fsync", "off");
    c.kill(p);
    c.restart(p);
    let mut all = c.node_ids();
    all.sort_unstable();
    wait_identical(&c, via, "fsync", &all, RESYNC_WAIT);
    assert_eq!(client.read(0, b.len()).expect("read back after resync"), b);
}

/// `backup-before-reply=return` on a backup: it applies and persists every write but its
/// acknowledgements never arrive. The host's writes still complete — after the primary times
/// the backup out and the shrink is committed — and the ISR shows it gone. Cleared, the backup
/// resyncs and returns to the ISR with an identical copy.
#[test]
fn lost_acknowledgements_from_a_backup_drop_it_from_the_isr_and_writes_go_on() {
    let c = chaos_cluster(3);
    let v = create_served_volume(&c, "acks", "16M");
    let p = v["primary"].as_u64().expect("primary");
    let mut all = ids(&v["isr"]);
    all.sort_unstable();
    assert_eq!(all.len(), 3, "a full ISR to start with: {v}");
    let b = all.iter().copied().find(|&n| n != p).expect("a backup");
    println!("primary {p}, backup {b} loses its acknowledgements");

    must_set(&c, b, "backup-before-reply", "return");
    let mut client = NbdClient::connect(c.nbd_addr(p), "acks", CLIENT_TIMEOUT).expect("connect");
    let mut last = Vec::new();
    for i in 0..8u64 {
        last = random_bytes(10 + i, 4 * BLOCK);
        let started = Instant::now();
        client.write(i * 4 * BLOCK as u64, &last).expect("writes complete without the backup");
        println!("write {i}: {:?}", started.elapsed());
    }
    let shrunk = wait_for("the ISR to drop the silent backup", CHANGE_WAIT, || {
        volume(&c, p, "acks").filter(|v| !ids(&v["isr"]).contains(&b) && ids(&v["isr"]).contains(&p))
    });
    println!("ISR without {b}: {}", shrunk["isr"]);
    assert_eq!(client.read(7 * 4 * BLOCK as u64, last.len()).expect("read"), last);

    must_set(&c, b, "backup-before-reply", "off");
    wait_identical(&c, p, "acks", &all, RESYNC_WAIT);
    client.write(0, &random_bytes(99, BLOCK)).expect("a write with the full ISR again");
}

/// `isr-before-propose=return` on the primary while a backup's acknowledgements are lost: the
/// primary cannot shrink the ISR, and a write that depends on the shrink waits for it (I3) —
/// it is neither acknowledged without the backup nor failed. Cleared, the shrink commits and
/// the write completes.
#[test]
fn a_write_waits_while_the_isr_shrink_it_depends_on_cannot_be_proposed() {
    let c = chaos_cluster(3);
    let v = create_served_volume(&c, "hold", "16M");
    let p = v["primary"].as_u64().expect("primary");
    let isr = ids(&v["isr"]);
    let b = isr.iter().copied().find(|&n| n != p).expect("a backup");
    println!("primary {p}, backup {b} loses its acknowledgements, the primary cannot propose");

    must_set(&c, p, "isr-before-propose", "return");
    must_set(&c, b, "backup-before-reply", "return");
    let addr = c.nbd_addr(p);
    let data = random_bytes(7, 4 * BLOCK);
    let want = data.clone();
    let writer = std::thread::spawn(move || {
        let mut client = NbdClient::connect(addr, "hold", Duration::from_secs(120)).expect("connect");
        let started = Instant::now();
        let result = client.write(0, &data);
        (result.map_err(|e| e.to_string()), started.elapsed())
    });
    // Three attempts, so the write has had time to finish if it did not wait for the shrink.
    wait_for("the primary to hit the failpoint three times", CHANGE_WAIT, || {
        (c.log_lines(p, "failpoint isr-before-propose").len() >= 3).then_some(())
    });
    // The shrink was attempted and never proposed: the write must still be waiting, and the
    // committed ISR must still hold the backup.
    assert!(!writer.is_finished(), "a write that needs the shrink finished before the shrink committed");
    let now = volume(&c, p, "hold").expect("the volume");
    assert!(ids(&now["isr"]).contains(&b), "the ISR changed without a proposal: {now}");

    must_set(&c, p, "isr-before-propose", "off");
    let (result, took) = writer.join().expect("writer");
    println!("the write completed after {took:?}: {result:?}");
    result.expect("the write completes once the shrink can commit");
    wait_for("the ISR to drop the silent backup", CHANGE_WAIT, || {
        volume(&c, p, "hold").filter(|v| !ids(&v["isr"]).contains(&b))
    });
    must_set(&c, b, "backup-before-reply", "off");
    let mut client = NbdClient::connect(addr, "hold", CLIENT_TIMEOUT).expect("connect");
    assert_eq!(client.read(0, want.len()).expect("read"), want);
}

/// `journal-before-fsync=return` on a backup: its store fails as after a real failed
/// `fdatasync`, it refuses the records it can no longer make durable, and the primary drops it
/// from the ISR; the host's writes complete on the others. The backup comes back only as a
/// restarted process (its store is poisoned until reopened), through resync.
#[test]
fn a_failed_fsync_on_a_backup_drops_it_from_the_isr_and_writes_go_on() {
    let c = chaos_cluster(3);
    let v = create_served_volume(&c, "bfsync", "16M");
    let p = v["primary"].as_u64().expect("primary");
    let mut all = ids(&v["isr"]);
    all.sort_unstable();
    let b = all.iter().copied().find(|&n| n != p).expect("a backup");
    println!("primary {p}, backup {b} fails its fsync");

    must_set(&c, b, "journal-before-fsync", "return");
    let mut client = NbdClient::connect(c.nbd_addr(p), "bfsync", CLIENT_TIMEOUT).expect("connect");
    let mut written = Vec::new();
    for i in 0..4u64 {
        let data = random_bytes(20 + i, 4 * BLOCK);
        client.write(i * 4 * BLOCK as u64, &data).expect("writes complete without the failed backup");
        written.push(data);
    }
    wait_for("the ISR to drop the failed backup", CHANGE_WAIT, || {
        volume(&c, p, "bfsync").filter(|v| !ids(&v["isr"]).contains(&b))
    });
    for (i, data) in written.iter().enumerate() {
        assert_eq!(&client.read(i as u64 * 4 * BLOCK as u64, data.len()).expect("read"), data);
    }

    must_set(&c, b, "journal-before-fsync", "off");
    c.kill(b);
    c.restart(b);
    wait_identical(&c, p, "bfsync", &all, RESYNC_WAIT);
}
