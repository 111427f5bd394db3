//! Hosts and their path maps end to end, against real `tandem` processes: two sites (nodes 1
//! and 2 in site `a`, node 3 in site `b`; node 2 with two target ports), a volume whose primary
//! is in site `a`, and hosts in each site.
//!
//! - The states of every path for hosts in both sites, their order, and I/O with qemu-io
//!   through every path that is not unavailable; 404s for unknown names.
//! - Probe results: a host whose probes to one node fail sees only that node's paths
//!   unavailable, and gets them back only after sustained success; noisy latency never
//!   changes a map; a port much slower than its sibling stops being optimized.
//! - kill -9 of a primary that is not the Raft leader: a watching host sees a map with the dead
//!   node's paths unavailable and another node's active-optimized (how fast: `tandem bench
//!   failover`); the host agent's map file follows; the failover commits to the node the map
//!   pointed at; the node comes back as an in-sync replica after a restart.
//! - A real agent whose probes to one node's port time out (nftables drops its SYNs): only that
//!   path becomes unavailable for its host, the other host is unaffected, and the path returns
//!   once the port answers again.
//! - The path manager recomputes only the maps a change affects: settings writes none, a
//!   change to one host's volumes that host (its `/metrics` counters).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_testkit::firewall::BlockedPorts;
use tandem_testkit::{
    qemu_io_ok, require_tools, run_tandem as run, run_tandem_ok as run_ok, seed, tandem_bin, wait_for, Cluster, Reap,
    Rng,
};

const LEADER_WAIT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

/// A free port on 127.0.0.1 (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Rewrites the config `tandem up` made: sites a, a, b, and a second target port on node 2.
fn two_sites(text: &str, extra: &str) -> String {
    let mut parts: Vec<String> = text.split("[[node]]").map(str::to_string).collect();
    for part in parts.iter_mut().skip(1) {
        let id: u64 = part
            .lines()
            .find_map(|l| l.trim().strip_prefix("id = ").map(|v| v.trim().parse().expect("id")))
            .expect("node id");
        let site = if id == 3 { "b" } else { "a" };
        *part = part.replace("site = \"local\"", &format!("site = \"{site}\""));
        if id == 2 {
            *part = format!("\nextra_nbd_addrs = [\"{extra}\"]{part}");
        }
    }
    parts.join("[[node]]")
}

/// The cluster, the volume `v1` (primary in site a) and hosts `ha` (site a), `hb` (site b).
struct Setup {
    c: Cluster,
    extra: String,
}

fn setup() -> Setup {
    // The extra port is chosen once the cluster's own ports are known, and differs from them.
    let mut extra = String::new();
    let c = Cluster::up_with(3, "tcp", |t| {
        extra = loop {
            let port = free_port();
            if !t.contains(&format!(":{port}\"")) {
                break format!("127.0.0.1:{port}");
            }
        };
        two_sites(t, &extra)
    });
    c.agreed_leader(&[1, 2, 3], LEADER_WAIT);
    // Each node advertises its site and target ports from its config once it is back.
    wait_for("nodes to advertise sites and target ports", LEADER_WAIT, || {
        let nodes: Value = c.http().get(format!("{}/v1/nodes", c.api(1))).send().ok()?.json().ok()?;
        let nodes = nodes.as_array()?;
        let sites: Vec<&str> = nodes.iter().filter_map(|n| n["site"].as_str()).collect();
        let extra_ok = nodes.iter().any(|n| n["id"] == 2 && n["extra_nbd_addrs"] == json!([extra]));
        (sites == ["a", "a", "b"] && extra_ok).then_some(())
    });
    let api = c.api(1);
    run_ok(&[
        "dataset",
        "create",
        "pod",
        "--replicas",
        "3",
        "--preferred-site",
        "a",
        "--endpoint",
        &api,
        "--cluster",
        c.path_str(),
    ]);
    run_ok(&[
        "volume",
        "create",
        "v1",
        "--size",
        "64M",
        "--dataset",
        "pod",
        "--endpoint",
        &api,
        "--cluster",
        c.path_str(),
    ]);
    let out = run_ok(&["host", "add", "ha", "--site", "a", "--endpoint", &api, "--cluster", c.path_str()]);
    assert!(out.contains("ha"), "{out}");
    run_ok(&["host", "add", "hb", "--site", "b", "--endpoint", &c.api(3), "--cluster", c.path_str()]);
    run_ok(&["host", "connect", "ha", "v1", "--endpoint", &api, "--cluster", c.path_str()]);
    run_ok(&["host", "connect", "hb", "v1", "--endpoint", &c.api(2), "--cluster", c.path_str()]);
    Setup { c, extra }
}

fn primary(c: &Cluster, via: u64) -> u64 {
    primary_of(c, via, "v1")
}

fn primary_of(c: &Cluster, via: u64, volume: &str) -> u64 {
    let v: Value =
        c.http().get(format!("{}/v1/volumes/{volume}", c.api(via))).send().expect("get").json().expect("json");
    v["primary"].as_u64().expect("primary")
}

/// `GET /v1/hosts/{host}/paths` through node `via`.
fn paths(c: &Cluster, via: u64, host: &str) -> Option<Value> {
    let resp = c.http().get(format!("{}/v1/hosts/{host}/paths", c.api(via))).send().ok()?;
    resp.status().is_success().then(|| resp.json().ok()).flatten()
}

/// The paths of `v1` in a map: (path, node, address, state, reason).
fn v1_paths(map: &Value) -> Vec<(String, u64, String, String, String)> {
    paths_of(map, "v1")
}

/// The paths of `volume` in a map: (path, node, address, state, reason).
fn paths_of(map: &Value, volume: &str) -> Vec<(String, u64, String, String, String)> {
    let Some(vols) = map["volumes"].as_array() else { return Vec::new() };
    let Some(v1) = vols.iter().find(|v| v["volume"] == volume) else { return Vec::new() };
    v1["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().expect(k).to_string();
            (s("path"), p["node"].as_u64().expect("node"), s("address"), s("state"), s("reason"))
        })
        .collect()
}

fn state_of(map: &Value, path: &str) -> String {
    v1_paths(map).into_iter().find(|p| p.0 == path).map(|p| p.3).unwrap_or_default()
}

/// Waits until `host`'s map satisfies `ok`; returns the map.
fn wait_map(c: &Cluster, via: u64, host: &str, what: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("{host}: {what}"), timeout, || paths(c, via, host).filter(|m| ok(m)))
}

fn post_probes(c: &Cluster, via: u64, host: &str, probes: Value) -> (u16, Value) {
    let resp = c
        .http()
        .post(format!("{}/v1/hosts/{host}/probes", c.api(via)))
        .json(&json!({ "probes": probes }))
        .send()
        .expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn ok_probe(node: u64, address: &str, rtt_us: u64) -> Value {
    json!({ "node": node, "address": address, "ok": true, "rtt_us": rtt_us })
}

fn failed_probe(node: u64, address: &str) -> Value {
    json!({ "node": node, "address": address, "ok": false, "refused": false, "error": "timed out after 1000 ms" })
}

/// Checks for `window` that `host`'s map stays as `ok` says (a negative check: nothing may
/// change too early).
fn holds_for(c: &Cluster, host: &str, window: Duration, what: &str, ok: impl Fn(&Value) -> bool) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        let m = paths(c, 1, host).expect("map");
        assert!(ok(&m), "{host}: {what} did not hold: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn path_states_follow_sites_isr_and_probes_and_every_path_serves_io() {
    require_tools(&["qemu-io"]);
    let Setup { c, extra } = setup();
    let p = primary(&c, 1);
    // Placement: the preferred site holds nodes 1 and 2, and volume 1 lands on the second.
    assert_eq!(p, 2, "the test expects v1's primary on node 2 (the node with two ports)");
    let ha = wait_map(&c, 1, "ha", "a map with v1's four paths", LEADER_WAIT, |m| v1_paths(m).len() == 4);
    let rows = v1_paths(&ha);
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    // The primary's two ports first, then site a's other node, then site b's.
    assert_eq!(names, ["n2p0", "n2p1", "n1p0", "n3p0"], "{ha}");
    assert_eq!(rows[1].2, extra);
    for r in &rows {
        let want = if r.1 == p { "active-optimized" } else { "active-non-optimized" };
        assert_eq!(r.3, want, "{r:?}");
    }
    assert_eq!(rows[0].4, "primary");
    assert!(rows[2].4.contains("in-sync replica") && rows[2].4.contains("node 2"), "{rows:?}");
    // The same map from every node; a host in site b gets its own site's replica first. A
    // newer generation may appear between two reads: then read all three again until they
    // show one generation, and at it, the same paths.
    let generation = ha["generation"].as_u64().expect("generation");
    assert!(generation >= 1, "{ha}");
    let (g, agreed) = wait_for("nodes 1, 2 and 3 to show ha's map at one generation", Duration::from_secs(30), || {
        let maps = [1, 2, 3].map(|via| paths(&c, via, "ha"));
        let gens: Vec<u64> = maps.iter().map(|m| m.as_ref()?.get("generation")?.as_u64()).collect::<Option<_>>()?;
        for (via, g) in [1, 2, 3].into_iter().zip(&gens) {
            assert!(*g >= generation, "node {via} showed generation {g} after node 1 showed {generation}");
        }
        if gens.iter().any(|g| *g != gens[0]) {
            return None;
        }
        let rows: Vec<_> = maps.iter().map(|m| v1_paths(m.as_ref().expect("map"))).collect();
        for via in [2, 3] {
            assert_eq!(rows[via - 1], rows[0], "node {via} and node 1 differ at generation {}", gens[0]);
        }
        Some((gens[0], rows[0].clone()))
    });
    if g == generation {
        assert_eq!(agreed, rows, "generation {g} differs from node 1's first read");
    }
    let hb = wait_map(&c, 3, "hb", "a map with four paths", LEADER_WAIT, |m| v1_paths(m).len() == 4);
    let names: Vec<String> = v1_paths(&hb).into_iter().map(|r| r.0).collect();
    assert_eq!(names, ["n2p0", "n2p1", "n3p0", "n1p0"], "{hb}");

    // The CLI: a table like multipath -ll, and JSON.
    let table = run_ok(&["paths", "--host", "ha", "--endpoint", &c.api(3), "--cluster", c.path_str()]);
    for needle in ["generation", "n2p1", &extra, "active-optimized", "active-non-optimized", "in-sync replica"] {
        assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
    }
    let doc: Value = serde_json::from_str(&run_ok(&[
        "paths",
        "--host",
        "ha",
        "--volume",
        "v1",
        "--json",
        "--endpoint",
        &c.api(2),
        "--cluster",
        c.path_str(),
    ]))
    .expect("paths --json is JSON");
    assert_eq!(v1_paths(&doc).len(), 4, "{doc}");
    let listed: Value =
        serde_json::from_str(&run_ok(&["host", "list", "--json", "--endpoint", &c.api(1), "--cluster", c.path_str()]))
            .expect("json");
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|h| h["name"] == "hb" && h["site"] == "b" && h["volumes"] == json!(["v1"]))),
        "{listed}"
    );

    // Metrics: the map's generation and its paths per state.
    let metrics = c.http().get(format!("{}/metrics", c.api(3))).send().expect("metrics").text().expect("text");
    assert!(metrics.contains("tandem_host_path_generation{host=\"ha\"}"), "{metrics}");
    assert!(metrics.contains("tandem_host_paths{host=\"ha\",state=\"active-optimized\"} 2"), "{metrics}");
    assert!(metrics.contains("tandem_host_paths{host=\"ha\",state=\"active-non-optimized\"} 2"), "{metrics}");

    // Every path that is not unavailable serves I/O: a pattern written through each path reads
    // back through the next one.
    let addrs: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    for (i, addr) in addrs.iter().enumerate() {
        let off = i as u64 * MIB;
        qemu_io_ok(&format!("nbd://{addr}/v1"), &[&format!("write -P {} {off} 64k", 0x41 + i)]);
    }
    for (i, _) in addrs.iter().enumerate() {
        let off = i as u64 * MIB;
        qemu_io_ok(
            &format!("nbd://{}/v1", addrs[(i + 1) % addrs.len()]),
            &[&format!("read -P {} {off} 64k", 0x41 + i)],
        );
    }

    // Unknown names: 404 with a clear message, from the API and the CLI.
    let resp = c.http().get(format!("{}/v1/hosts/nosuch/paths", c.api(2))).send().expect("get");
    assert_eq!(resp.status().as_u16(), 404);
    assert!(resp.text().expect("body").contains("no host named \\\"nosuch\\\""));
    let resp = c.http().get(format!("{}/v1/hosts/ha/paths?volume=nosuch", c.api(2))).send().expect("get");
    assert_eq!(resp.status().as_u16(), 404);
    assert!(resp.text().expect("body").contains("no volume named"));
    run_ok(&["volume", "create", "v2", "--size", "4M", "--endpoint", &c.api(1), "--cluster", c.path_str()]);
    let resp = c.http().get(format!("{}/v1/hosts/ha/paths?volume=v2", c.api(2))).send().expect("get");
    assert_eq!(resp.status().as_u16(), 404);
    assert!(resp.text().expect("body").contains("not connected"));
    let (status, body) = post_probes(&c, 3, "nosuch", json!([ok_probe(1, &c.nbd_addr(1).to_string(), 100)]));
    assert_eq!(status, 404, "{body}");
    let (status, body) = post_probes(&c, 3, "ha", json!([ok_probe(1, "127.0.0.1:1", 100)]));
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("not one of its target ports")), "{body}");
    for (args, needle) in [
        (vec!["paths", "--host", "nosuch"], "no host named"),
        (vec!["host", "connect", "ha", "nosuch"], "no volume named"),
        (vec!["host", "connect", "nosuch", "v1"], "no host named"),
    ] {
        let mut args = args.clone();
        let api = c.api(1);
        args.extend(["--endpoint", &api, "--cluster", c.path_str()]);
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
    }

    // Host ha's probes to node 3 fail: only ha's node-3 path becomes unavailable, and only
    // after three failures in a row.
    let n3 = c.nbd_addr(3).to_string();
    let hb_before = paths(&c, 1, "hb").expect("hb");
    for _ in 0..2 {
        assert_eq!(post_probes(&c, 2, "ha", json!([failed_probe(3, &n3)])).0, 200);
    }
    holds_for(&c, "ha", Duration::from_millis(500), "n3p0 active after two failures", |m| {
        state_of(m, "n3p0") == "active-non-optimized"
    });
    assert_eq!(post_probes(&c, 2, "ha", json!([failed_probe(3, &n3)])).0, 200);
    let ha =
        wait_map(&c, 1, "ha", "n3p0 unavailable", Duration::from_secs(3), |m| state_of(m, "n3p0") == "unavailable");
    let n3_row = v1_paths(&ha).into_iter().find(|r| r.0 == "n3p0").expect("n3p0");
    assert!(n3_row.4.contains("unreachable from this host") && n3_row.4.contains("timed out"), "{n3_row:?}");
    assert_eq!(state_of(&ha, "n1p0"), "active-non-optimized", "{ha}");
    assert_eq!(state_of(&ha, "n2p0"), "active-optimized", "{ha}");
    let hb_now = paths(&c, 1, "hb").expect("hb");
    assert_eq!(hb_now, hb_before, "host hb must be unaffected");
    // It comes back only after 2 s of success.
    let first_ok = Instant::now();
    assert_eq!(post_probes(&c, 2, "ha", json!([ok_probe(3, &n3, 300)])).0, 200);
    holds_for(&c, "ha", Duration::from_millis(600), "n3p0 unavailable after one success", |m| {
        state_of(m, "n3p0") == "unavailable"
    });
    wait_for("ha: n3p0 back after sustained success", Duration::from_secs(8), || {
        assert_eq!(post_probes(&c, 2, "ha", json!([ok_probe(3, &n3, 300)])).0, 200);
        std::thread::sleep(Duration::from_millis(150));
        (state_of(&paths(&c, 1, "ha")?, "n3p0") == "active-non-optimized").then_some(())
    });
    let took = first_ok.elapsed();
    assert!(took >= Duration::from_millis(1900), "n3p0 came back after {took:?}, before 2 s of success");

    // Noisy latency (50 us to 3 ms on every path, reported every 100 ms for 6 s) changes
    // nothing in hb's map: no new generation.
    let seed = seed("PATHS_SEED");
    let mut rng = Rng::new(seed);
    let hb_before = paths(&c, 1, "hb").expect("hb");
    let all: Vec<(u64, String)> = v1_paths(&hb_before).into_iter().map(|r| (r.1, r.2)).collect();
    let end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < end {
        let probes: Vec<Value> = all.iter().map(|(n, a)| ok_probe(*n, a, 50 + rng.below(2950))).collect();
        assert_eq!(post_probes(&c, 1, "hb", json!(probes)).0, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    let hb_after = paths(&c, 1, "hb").expect("hb");
    assert_eq!(hb_after, hb_before, "noisy probes changed hb's map (seed {seed})");

    // One of the primary's ports is 100x slower than the other for ha: after the sustain
    // window it is no longer optimized; the fast one stays optimized.
    let n2p0 = c.nbd_addr(2).to_string();
    let slow_since = Instant::now();
    wait_for("ha: the slow port n2p1 is demoted", Duration::from_secs(10), || {
        let probes = json!([
            ok_probe(2, &n2p0, 200),
            ok_probe(2, &extra, 20_000),
            ok_probe(1, &c.nbd_addr(1).to_string(), 200),
            ok_probe(3, &n3, 200)
        ]);
        assert_eq!(post_probes(&c, 3, "ha", probes).0, 200);
        std::thread::sleep(Duration::from_millis(200));
        let m = paths(&c, 1, "ha")?;
        (state_of(&m, "n2p1") == "active-non-optimized").then_some(m)
    });
    assert!(slow_since.elapsed() >= Duration::from_millis(2900), "demoted after {:?}", slow_since.elapsed());
    let m = paths(&c, 1, "ha").expect("ha");
    assert_eq!(state_of(&m, "n2p0"), "active-optimized", "{m}");
}

/// Reads `tandem paths --watch --json` output: each map with the time it arrived.
fn watch(c: &Cluster, via: u64, host: &str) -> (Child, mpsc::Receiver<(Instant, Value)>) {
    let mut child = Command::new(tandem_bin())
        .args(["paths", "--host", host, "--watch", "--json", "--endpoint", &c.api(via), "--cluster", c.path_str()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn paths --watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
        }
    });
    (child, rx)
}

/// `tandem host agent` for `host` (probing every 200 ms, talking to node `via`), writing its map
/// to `map_file`; stopped when the returned guard is dropped.
fn agent(c: &Cluster, via: u64, host: &str, map_file: &std::path::Path, more: &[&str]) -> Reap {
    let child = Command::new(tandem_bin())
        .args([
            "host",
            "agent",
            "--host",
            host,
            "--interval-ms",
            "200",
            "--endpoint",
            &c.api(via),
            "--cluster",
            c.path_str(),
        ])
        .args(more)
        .arg("--map-file")
        .arg(map_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agent");
    Reap(child)
}

#[test]
fn a_watching_host_sees_the_dead_primary_unavailable_and_the_failover_follows_its_map() {
    let Setup { c, .. } = setup();
    // A second volume: its primary is node 1, v1's is node 2. The test kills the primary of the
    // one whose primary is not the Raft leader: when the primary also leads Raft, an election
    // (1.5-2 s in openraft 0.9) must come first, and failovers keep primaries off the leader's
    // node anyway (docs/BENCHMARKS.md measures that case).
    run_ok(&[
        "volume",
        "create",
        "v2",
        "--size",
        "64M",
        "--dataset",
        "pod",
        "--endpoint",
        &c.api(1),
        "--cluster",
        c.path_str(),
    ]);
    run_ok(&["host", "connect", "ha", "v2", "--endpoint", &c.api(1), "--cluster", c.path_str()]);
    let leader = c.agreed_leader(&[1, 2, 3], LEADER_WAIT);
    let (vol, p) = ["v1", "v2"]
        .into_iter()
        .map(|v| (v, primary_of(&c, 1, v)))
        .find(|(_, p)| *p != leader)
        .expect("v1 and v2 have different primaries");
    let vol_paths = |m: &Value| paths_of(m, vol);
    let via = [1, 2, 3].into_iter().find(|&n| n != p).expect("a survivor");
    wait_map(&c, via, "ha", "a map with the volume's paths", LEADER_WAIT, |m| vol_paths(m).len() == 4);

    // The host agent of ha: probes every path, follows the map, writes it to a file.
    let map_file = c.path().join("ha-paths.json");
    let _agent = agent(&c, via, "ha", &map_file, &[]);
    let file_map = |want: &dyn Fn(&Value) -> bool| -> Option<Value> {
        let text = std::fs::read_to_string(&map_file).ok()?;
        serde_json::from_str::<Value>(&text).ok().filter(|m| want(m))
    };
    wait_for("the agent's map file", Duration::from_secs(10), || file_map(&|m| vol_paths(m).len() == 4));

    let (child, rx) = watch(&c, via, "ha");
    let _watch = Reap(child);
    let (_, first) = rx.recv_timeout(Duration::from_secs(10)).expect("the watch prints the current map");
    assert_eq!(vol_paths(&first).len(), 4, "{first}");

    let killed = Instant::now();
    c.kill(p);
    let dead_paths_gone = |m: &Value| {
        let rows = paths_of(m, vol);
        rows.iter().filter(|r| r.1 == p).all(|r| r.3 == "unavailable")
            && rows.iter().any(|r| r.1 != p && r.3 == "active-optimized")
    };
    // Generous: how fast the map moves is measured by `tandem bench failover` (path map,
    // docs/BENCHMARKS.md), not here, where a starved machine would only make it flaky.
    let mut seen = None;
    while seen.is_none() {
        let left = Duration::from_secs(30).saturating_sub(killed.elapsed());
        let (at, m) = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no map without node {p} within 30 s"));
        if dead_paths_gone(&m) {
            seen = Some((at.duration_since(killed), m));
        }
    }
    let (after, m) = seen.expect("seen");
    println!(
        "killed primary {p} (Raft leader {leader}); the watching host had the new map after {} ms: {m}",
        after.as_millis()
    );
    let ao: Vec<u64> = vol_paths(&m).into_iter().filter(|r| r.3 == "active-optimized").map(|r| r.1).collect();
    assert!(ao.iter().all(|&n| n != p), "{m}");

    // The agent's file follows; the failover commits to the node the map pointed at.
    wait_for("the agent's map file without the dead node", Duration::from_secs(5), || file_map(&dead_paths_gone));
    let new_primary = wait_for("the failover", Duration::from_secs(15), || {
        let q = primary_of(&c, via, vol);
        (q != p).then_some(q)
    });
    assert!(ao.contains(&new_primary), "the map pointed at {ao:?}, the failover chose {new_primary}");
    wait_map(&c, via, "ha", "the new primary's paths optimized as primary", Duration::from_secs(10), |m| {
        vol_paths(m).iter().any(|r| r.1 == new_primary && r.3 == "active-optimized" && r.4 == "primary")
    });

    // The node returns: after resync it is an in-sync replica again, its paths active.
    c.restart_missing();
    wait_map(&c, via, "ha", "the returned node's paths active again", Duration::from_secs(60), |m| {
        let rows = vol_paths(m);
        rows.iter().filter(|r| r.1 == p).all(|r| r.3 == "active-non-optimized")
    });
}

#[test]
fn an_agent_whose_probes_to_one_node_time_out_sees_only_that_node_unavailable() {
    require_tools(&["nft"]);
    let Setup { c, .. } = setup();
    wait_map(&c, 1, "ha", "a map with v1's paths", LEADER_WAIT, |m| v1_paths(m).len() == 4);
    let map_file = c.path().join("ha-paths.json");
    let _agent = agent(&c, 1, "ha", &map_file, &["--probe-timeout-ms", "300"]);
    wait_for("the agent's map file", Duration::from_secs(10), || std::fs::read_to_string(&map_file).ok());
    let hb_before = paths(&c, 1, "hb").expect("hb");

    // Node 3's NBD port stops answering (SYNs dropped): the agent's probes time out.
    let port = c.nbd_addr(3).port();
    let blocked = BlockedPorts::new(&[port]);
    let ha =
        wait_map(&c, 1, "ha", "n3p0 unavailable", Duration::from_secs(10), |m| state_of(m, "n3p0") == "unavailable");
    let row = v1_paths(&ha).into_iter().find(|r| r.0 == "n3p0").expect("n3p0");
    assert!(row.4.contains("unreachable from this host") && row.4.contains("timed out"), "{row:?}");
    for (path, want) in [("n2p0", "active-optimized"), ("n2p1", "active-optimized"), ("n1p0", "active-non-optimized")] {
        assert_eq!(state_of(&ha, path), want, "{ha}");
    }
    assert_eq!(paths(&c, 1, "hb").expect("hb"), hb_before, "host hb must be unaffected");
    wait_for("the agent's map file to show n3p0 unavailable", Duration::from_secs(5), || {
        let file: Value = serde_json::from_str(&std::fs::read_to_string(&map_file).ok()?).ok()?;
        (state_of(&file, "n3p0") == "unavailable").then_some(())
    });

    // Unblocked, the path comes back after sustained success.
    drop(blocked);
    wait_map(&c, 1, "ha", "n3p0 back", Duration::from_secs(10), |m| state_of(m, "n3p0") == "active-non-optimized");
}

/// The path manager recomputes only the maps a change can affect: settings writes recompute
/// none, connecting a volume to one host recomputes that host (and compares it once more after
/// its new map is published), whatever the number of other hosts.
#[test]
fn the_path_manager_recomputes_only_the_hosts_a_change_affects() {
    const HOSTS: u64 = 6;
    let c = Cluster::up(3);
    let leader = c.agreed_leader(&[1, 2, 3], LEADER_WAIT);
    let api = c.api(leader);
    for i in 1..=HOSTS {
        run_ok(&["volume", "create", &format!("v{i}"), "--size", "4M", "--endpoint", &api, "--cluster", c.path_str()]);
        run_ok(&["host", "add", &format!("h{i}"), "--site", "local", "--endpoint", &api, "--cluster", c.path_str()]);
        run_ok(&["host", "connect", &format!("h{i}"), &format!("v{i}"), "--endpoint", &api, "--cluster", c.path_str()]);
    }
    for i in 1..=HOSTS {
        wait_map(&c, leader, &format!("h{i}"), "a published map with its volume", LEADER_WAIT, |m| {
            m["volumes"].as_array().is_some_and(|v| v.len() == 1)
        });
    }
    let counters = |c: &Cluster| {
        let m = |name| c.metric(leader, name).unwrap_or_else(|| panic!("no {name} in the leader's /metrics"));
        (m("tandem_paths_hosts_recomputed_total"), m("tandem_paths_full_recomputes_total"))
    };
    // A full recompute for another reason (a node's lease renewal late on a starved machine
    // changes its liveness, which every host's map shows) spoils a round: up to three rounds.
    let mut rounds = Vec::new();
    for round in 0..3 {
        let (hosts_before, full_before) = counters(&c);
        for i in 0..40 {
            c.put_setting(leader, &format!("unrelated{round}.{i}"), "x");
        }
        // Then one change to one host; once its new map is out, the manager has seen every
        // write before it (it takes changes in log order).
        let (verb, want) = if round % 2 == 0 { ("connect", 2) } else { ("disconnect", 1) };
        run_ok(&["host", verb, "h1", "v2", "--endpoint", &api, "--cluster", c.path_str()]);
        wait_map(&c, leader, "h1", "h1's map with its volumes", LEADER_WAIT, |m| {
            m["volumes"].as_array().is_some_and(|v| v.len() == want)
        });
        let (hosts_after, full_after) = counters(&c);
        rounds.push((hosts_after - hosts_before, full_after - full_before));
        if full_after == full_before {
            break;
        }
    }
    let (recomputed, _) = *rounds
        .iter()
        .find(|(_, full)| *full == 0.0)
        .unwrap_or_else(|| panic!("every round recomputed every host (hosts recomputed, full recomputes): {rounds:?}"));
    // h1 for the connect, h1 again for its own publication; a tick may split them. Recomputing
    // every host per write would be 40 × 6.
    assert!(
        (1.0..=4.0).contains(&recomputed),
        "{recomputed} host maps recomputed for 40 settings writes and one change to one host ({rounds:?})"
    );
    c.down();
}
