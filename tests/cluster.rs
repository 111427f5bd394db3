//! The metadata cluster end to end: real `tandem` processes started by `tandem up --detach`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_testkit::{
    create_served_volume, poll, run_tandem as run, run_tandem_ok, take_turn, tandem_bin, wait_for, Cluster, Reap,
};

const LEADER_WAIT: Duration = Duration::from_secs(20);

/// Runs a cluster test once with node-to-node traffic on TCP and once on QUIC.
macro_rules! on_both_transports {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn tcp() {
                    super::$name("tcp")
                }
                #[test]
                fn quic() {
                    super::$name("quic")
                }
            }
        )*
    };
}

on_both_transports!(
    three_nodes_elect_exactly_one_leader_and_status_agrees_everywhere,
    killing_the_leader_elects_a_new_one_and_it_rejoins_with_its_state,
    metadata_survives_stopping_and_starting_every_node,
    add_a_node_that_catches_up_by_snapshot_then_remove_one,
    a_node_with_a_certificate_from_another_ca_cannot_join,
);

fn three_nodes_elect_exactly_one_leader_and_status_agrees_everywhere(transport: &str) {
    let c = Cluster::up_on(3, transport);
    let ids = c.node_ids();
    assert_eq!(ids, vec![1, 2, 3]);
    let leader = c.agreed_leader(&ids, LEADER_WAIT);
    let roles: Vec<String> =
        ids.iter().map(|id| c.view(*id).expect("view")["raft"]["role"].as_str().expect("role").to_string()).collect();
    assert_eq!(roles.iter().filter(|r| *r == "leader").count(), 1, "roles: {roles:?}");
    assert_eq!(roles[(leader - 1) as usize], "leader");

    // `tandem status --json`, asked through each node, tells the same story.
    let reports: Vec<Value> = ids.iter().map(|id| c.status_json(*id)).collect();
    for r in &reports {
        assert_eq!(r["leader"].as_u64(), Some(leader), "{r}");
        assert_eq!(r["term"], reports[0]["term"]);
        assert_eq!(r["voters"], serde_json::json!([1, 2, 3]));
        let nodes = r["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 3);
        for n in nodes {
            assert_eq!(n["up"], true, "{n}");
            assert_eq!(n["leader"].as_u64(), Some(leader), "{n}");
            let expected = if n["id"].as_u64() == Some(leader) { "leader" } else { "follower" };
            assert_eq!(n["role"], expected, "{n}");
            assert!(n["nbd_addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{n}");
        }
    }
    // Prometheus metrics tell the same: exactly the leader reports itself as leader.
    for id in &ids {
        let text = c.http().get(format!("{}/metrics", c.api(*id))).send().expect("metrics").text().expect("text");
        let expected = format!("tandem_raft_is_leader {}", u8::from(*id == leader));
        assert!(text.contains(&expected), "node {id}: {text}");
        assert!(text.contains("# TYPE tandem_transport_bytes_sent counter"), "{text}");
    }
    // The human form names the leader too.
    let table = c.admin(&["status"]);
    assert!(table.contains(&format!("leader {leader}")), "{table}");
}

fn killing_the_leader_elects_a_new_one_and_it_rejoins_with_its_state(transport: &str) {
    let c = Cluster::up_on(3, transport);
    let ids = c.node_ids();
    let old = c.agreed_leader(&ids, LEADER_WAIT);
    c.put_setting(old, "before-kill", "1");

    c.kill(old);
    let killed_at = Instant::now();
    let survivors: Vec<u64> = ids.iter().copied().filter(|i| *i != old).collect();
    // Generous: on a starved machine an election can take far longer than its timeouts. How
    // fast a failover is, is for `tandem bench failover` (docs/BENCHMARKS.md).
    let new = wait_for("a new leader", Duration::from_secs(30), || {
        let leaders: Vec<Option<u64>> =
            survivors.iter().map(|id| c.view(*id).and_then(|v| v["raft"]["leader"].as_u64())).collect();
        match leaders[0] {
            Some(l) if l != old && leaders.iter().all(|x| *x == Some(l)) => Some(l),
            _ => None,
        }
    });
    println!("new leader {new} agreed on by the survivors {:?} after the kill", killed_at.elapsed());

    // The cluster keeps working without the old leader.
    c.put_setting(survivors[0], "after-kill", "2");

    // Restart it: it comes back as a follower of the new leader, with the old and new state.
    c.restart_missing();
    wait_for("the old leader to rejoin as a follower", LEADER_WAIT, || {
        let v = c.view(old)?;
        (v["raft"]["role"] == "follower" && v["raft"]["leader"].as_u64() == Some(new)).then_some(())
    });
    // A read through it may be refused for a moment while the cluster settles (it may force an
    // election with its higher term); it must then show both writes.
    for (key, value) in [("before-kill", "1"), ("after-kill", "2")] {
        let got = wait_for(&format!("{key} through the rejoined node"), LEADER_WAIT, || c.get_setting(old, key));
        assert_eq!(got, value, "{key} through the rejoined node {old}");
    }
}

fn metadata_survives_stopping_and_starting_every_node(transport: &str) {
    let c = Cluster::up_on(3, transport);
    let ids = c.node_ids();
    c.agreed_leader(&ids, LEADER_WAIT);
    // Writes through every node: followers forward to the leader.
    for i in 0..30u64 {
        let via = ids[(i % 3) as usize];
        c.put_setting(via, &format!("key-{i}"), &format!("value-{i}"));
    }
    c.admin(&["setting", "delete", "key-7"]);
    c.down();
    for id in &ids {
        assert!(c.view(*id).is_none(), "node {id} still answers after down");
    }
    c.restart_missing();
    c.agreed_leader(&ids, LEADER_WAIT);
    for id in &ids {
        for i in 0..30u64 {
            let expected = (i != 7).then(|| format!("value-{i}"));
            assert_eq!(c.get_setting(*id, &format!("key-{i}")), expected, "key-{i} read via node {id}");
        }
    }
    // The node records survived too.
    let nodes: Value = c.http().get(format!("{}/v1/nodes", c.api(2))).send().expect("get").json().expect("json");
    assert_eq!(nodes.as_array().map(Vec::len), Some(3));
}

fn add_a_node_that_catches_up_by_snapshot_then_remove_one(transport: &str) {
    // Snapshot every 20 entries and keep only 5 behind it, so the log a new node would need is
    // gone and it can only catch up from a snapshot.
    let c = Cluster::up_with(3, transport, |cfg| {
        cfg.replace("snapshot_after_entries = 10000", "snapshot_after_entries = 20")
            .replace("logs_to_keep = 2000", "logs_to_keep = 5")
    });
    let ids = c.node_ids();
    let leader = c.agreed_leader(&ids, LEADER_WAIT);
    for i in 0..80u64 {
        c.put_setting(leader, &format!("k{i}"), &"x".repeat(200));
    }
    wait_for("the leader to purge its log", LEADER_WAIT, || {
        let v = c.view(leader)?;
        (v["raft"]["purged_index"].as_u64()? > 20).then_some(())
    });

    let out = c.admin(&["node", "add"]);
    assert!(out.contains("node 4 added"), "{out}");
    let v4 = wait_for("node 4 to apply the whole log", LEADER_WAIT, || {
        let v = c.view(4)?;
        let leader_applied = c.view(leader)?["raft"]["applied_index"].as_u64()?;
        (v["raft"]["applied_index"].as_u64()? >= leader_applied).then_some(v)
    });
    assert!(v4["raft"]["snapshot_index"].as_u64().is_some(), "node 4 did not receive a snapshot: {v4}");
    // Three voters at most (`cluster.voters`): the fourth node is a learner.
    assert_eq!(v4["raft"]["voters"], serde_json::json!([1, 2, 3]));
    assert_eq!(v4["raft"]["learners"], serde_json::json!([4]));
    assert_eq!(v4["raft"]["role"], "learner");
    assert_eq!(c.get_setting(4, "k0").as_deref(), Some("x".repeat(200).as_str()));
    assert_eq!(c.get_setting(4, "k79").as_deref(), Some("x".repeat(200).as_str()));

    // Remove a voter that is not the leader: the learner takes its seat in the same change,
    // which is committed everywhere, and the node leaves the map.
    let victim = *ids.iter().find(|i| **i != leader).expect("a follower");
    let victim_api = c.api(victim);
    c.admin(&["node", "remove", &victim.to_string()]);
    let remaining: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|i| *i != victim).collect();
    wait_for("every remaining node to see the new membership", LEADER_WAIT, || {
        remaining
            .iter()
            .all(|id| {
                c.view(*id).is_some_and(|v| {
                    let voters: BTreeSet<u64> =
                        v["raft"]["voters"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
                    voters == remaining.iter().copied().collect()
                })
            })
            .then_some(())
    });
    assert!(
        c.http().get(format!("{victim_api}/v1/cluster")).timeout(Duration::from_secs(2)).send().is_err(),
        "the removed node's process was stopped"
    );
    assert!(!c.node_ids().contains(&victim), "the removed node left the local config");
    let nodes: Value =
        c.http().get(format!("{}/v1/nodes", c.api(remaining[0]))).send().expect("get").json().expect("json");
    let listed: Vec<u64> = nodes.as_array().expect("list").iter().filter_map(|n| n["id"].as_u64()).collect();
    assert_eq!(listed, remaining);
    // And the cluster still commits.
    c.put_setting(remaining[1], "after-remove", "ok");
    assert_eq!(c.get_setting(remaining[2], "after-remove").as_deref(), Some("ok"));
}

fn a_node_with_a_certificate_from_another_ca_cannot_join(transport: &str) {
    let c = Cluster::up_on(3, transport);
    let ids = c.node_ids();
    let leader = c.agreed_leader(&ids, LEADER_WAIT);
    c.put_setting(leader, "secret", "s3");
    let victim = *ids.iter().find(|i| **i != leader).expect("a follower");

    // Another cluster's CA issues a certificate for the same node id.
    let other = Cluster::also_up(3, transport);
    other.down();
    let cert = other.path().join(format!("certs/node-{victim}.pem"));
    let key = other.path().join(format!("certs/node-{victim}.key"));

    // An impostor takes the victim's place: same id and addresses, trusts our CA, but holds
    // the foreign certificate.
    c.kill(victim);
    let impostor_dir = tempfile::tempdir().expect("dir");
    let cfg = std::fs::read_to_string(c.path().join("cluster.toml")).expect("config");
    let ours_ca = c.path().join("certs/ca.pem");
    let cfg = cfg
        .replace("ca_cert = \"certs/ca.pem\"", &format!("ca_cert = {:?}", ours_ca.display().to_string()))
        .replace(&format!("cert = \"certs/node-{victim}.pem\""), &format!("cert = {:?}", cert.display().to_string()))
        .replace(&format!("key = \"certs/node-{victim}.key\""), &format!("key = {:?}", key.display().to_string()))
        // Our cluster's secret and CA key, where they are.
        .replace("\"certs/", &format!("\"{}/certs/", c.path().display()));
    let cfg_path = impostor_dir.path().join("cluster.toml");
    std::fs::write(&cfg_path, cfg).expect("write");
    let guard = Reap::spawn(
        std::process::Command::new(tandem_bin())
            .args(["node", "--config", cfg_path.to_str().expect("utf-8"), "--id", &victim.to_string()])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(impostor_dir.path().join("node.log")).expect("log")),
    );

    if let Err(e) = poll("the impostor's API", LEADER_WAIT, || c.view(victim)) {
        let log = std::fs::read_to_string(impostor_dir.path().join("node.log")).unwrap_or_default();
        panic!("{e}; the impostor's log:\n{log}");
    }
    // The cluster keeps committing without it, and sends it nothing: for a good while (many
    // heartbeats and retries) the impostor learns no term, no leader and no state.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut n = 0;
    while Instant::now() < deadline {
        c.put_setting(leader, &format!("during-{n}"), "v");
        n += 1;
        let v = c.view(victim).expect("impostor answers");
        assert_eq!(v["raft"]["term"], 0, "impostor learned a term: {v}");
        assert!(v["raft"]["leader"].is_null(), "impostor learned the leader: {v}");
        assert!(v["raft"]["applied_index"].is_null(), "impostor applied entries: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let resp = c
        .http()
        .get(format!("{}/v1/settings/secret", c.api(victim)))
        .timeout(Duration::from_secs(15))
        .send()
        .expect("get");
    assert!(!resp.status().is_success(), "impostor served a read");
    drop(guard);
}

#[test]
fn up_in_the_foreground_stops_its_nodes_cleanly_on_ctrl_c() {
    let turn = take_turn();
    let dir = tempfile::Builder::new().prefix("tandem-test-").tempdir().expect("dir");
    let dir_str = dir.path().to_str().expect("utf-8").to_string();
    // Whatever happens below, the nodes are stopped (Cluster's drop) and `up` is killed.
    let mut up = Reap::spawn(
        std::process::Command::new(tandem_bin())
            .args(["up", "--nodes", "3", "--dir", &dir_str])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    );
    let c = Cluster::adopt(dir, Some(turn));

    let out = up.0.stdout.take().expect("stdout");
    let mut reader = std::io::BufReader::new(out);
    let mut seen = String::new();
    wait_for("up to print the status table", LEADER_WAIT, || {
        use std::io::BufRead;
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        seen.push_str(&line);
        seen.contains("press Ctrl-C").then_some(())
    });
    assert!(seen.contains("leader"), "{seen}");
    let pids: Vec<i32> = c.node_ids().iter().map(|id| c.pid(*id)).collect();
    assert_eq!(pids.len(), 3);
    c.put_setting(1, "kept", "yes");

    let _ = std::process::Command::new("kill").args(["-INT", &up.0.id().to_string()]).status();
    let status = wait_for("up to exit", Duration::from_secs(30), || up.0.try_wait().expect("wait"));
    assert!(status.success(), "up exited with {status}");
    for pid in pids {
        assert!(!tandem_testkit::process::alive(pid), "node process {pid} survived Ctrl-C");
    }
    for id in c.node_ids() {
        assert!(!c.path().join(format!("node-{id}.pid")).exists(), "pid file of node {id} left behind");
    }
    // The clean stop kept the state: `up` on the same dir brings the cluster back with it.
    c.restart_missing();
    assert_eq!(c.get_setting(2, "kept").as_deref(), Some("yes"));
}

#[test]
fn bad_http_input_gets_a_4xx_with_a_json_error_and_changes_nothing() {
    let c = Cluster::up(3);
    let ids = c.node_ids();
    c.agreed_leader(&ids, LEADER_WAIT);
    let api = c.api(2);
    // A fresh connection per request: the server closes a connection after refusing an
    // oversized body unread, and a pooled connection reused after that would fail to send.
    let mut headers = reqwest::header::HeaderMap::new();
    let token = c.admin_token().expect("the admin's token");
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("header"));
    let h = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .default_headers(headers)
        .build()
        .expect("client");
    let before: Value = h.get(format!("{api}/v1/nodes")).send().expect("get").json().expect("json");

    let cases: Vec<(reqwest::blocking::RequestBuilder, u16)> = vec![
        (h.post(format!("{api}/v1/nodes")).body("{not json").header("content-type", "application/json"), 400),
        (h.post(format!("{api}/v1/nodes")).json(&serde_json::json!({"id": 9})), 422),
        (
            h.post(format!("{api}/v1/nodes")).json(&serde_json::json!({
                "id": 0, "site": "a", "raft_addr": "127.0.0.1:1", "api_addr": "127.0.0.1:2", "nbd_addr": "127.0.0.1:3"
            })),
            400,
        ),
        (h.delete(format!("{api}/v1/nodes/abc")), 400),
        (h.delete(format!("{api}/v1/nodes/99")), 404),
        (h.put(format!("{api}/v1/settings/bad%20key")).json(&serde_json::json!({"value": "v"})), 400),
        (h.put(format!("{api}/v1/settings/k")).json(&serde_json::json!({"value": "v".repeat(5000)})), 400),
        (h.put(format!("{api}/v1/settings/k")).json(&serde_json::json!({"valu": "v"})), 422),
        (
            h.put(format!("{api}/v1/settings/k")).body(vec![b'x'; 200_000]).header("content-type", "application/json"),
            413,
        ),
        (h.get(format!("{api}/v1/settings/missing")), 404),
        (h.put(format!("{api}/v1/settings/k")).json(&serde_json::json!({"value": "v", "expect": "old"})), 409),
        (h.put(format!("{api}/v1/settings/k")).json(&serde_json::json!({"value": "v", "expect": 7})), 422),
        (h.get(format!("{api}/v1/no-such-thing")), 404),
    ];
    for (i, (req, status)) in cases.into_iter().enumerate() {
        let resp = req.send().expect("send");
        assert_eq!(resp.status().as_u16(), status, "case {i}");
        let body: Value = resp.json().unwrap_or_else(|e| panic!("case {i}: error body is not JSON: {e}"));
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "case {i}: {body}");
    }
    let after: Value = h.get(format!("{api}/v1/nodes")).send().expect("get").json().expect("json");
    assert_eq!(before, after);
    let settings: Value = h.get(format!("{api}/v1/settings")).send().expect("get").json().expect("json");
    assert_eq!(settings, serde_json::json!({}));

    // Compare-and-set: `expect: null` creates, a wrong `expect` is refused naming what is
    // there, the right one replaces.
    let cas = |expect: Value, value: &str| {
        let resp = h
            .put(format!("{api}/v1/settings/reg"))
            .json(&serde_json::json!({"value": value, "expect": expect}))
            .send()
            .expect("put");
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    };
    assert_eq!(cas(Value::Null, "a").0, 200);
    let (status, body) = cas(Value::Null, "b");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("holds \\\"a\\\""), "{body}");
    assert_eq!(cas("x".into(), "b").0, 409);
    assert_eq!(cas("a".into(), "b").0, 200);
    let value: Value = h.get(format!("{api}/v1/settings/reg")).send().expect("get").json().expect("json");
    assert_eq!(value["value"], "b");

    // The CLI reports API errors on stderr with a non-zero exit.
    let out = run(&["node", "remove", "99", "--endpoint", &api, "--cluster", c.path_str()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a member"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn transports_switch_live_while_writes_and_a_membership_change_commit() {
    let c = Cluster::up_on(3, "quic");
    let ids = c.node_ids();
    let leader = c.agreed_leader(&ids, LEADER_WAIT);
    let api = c.api(leader);
    // A served volume: its primary's replication links to the backups are data-layer links
    // that every data switch must move.
    create_served_volume(&c, "vt", "16M");

    // A writer keeps committing numbered metadata writes through the whole test; every one
    // must be acknowledged.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let apis: Vec<String> = ids.iter().map(|id| c.api(*id)).collect();
        let h = c.http();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let via = &apis[(n % apis.len() as u64) as usize];
                let resp = h
                    .put(format!("{via}/v1/settings/w{n}"))
                    .json(&serde_json::json!({ "value": n.to_string() }))
                    .send()
                    .unwrap_or_else(|e| panic!("write {n} failed: {e}"));
                assert!(resp.status().is_success(), "write {n}: {}", resp.status());
                n += 1;
            }
            n
        })
    };

    let endpoint = ["--endpoint", api.as_str(), "--cluster", c.path_str()];
    let mut flips = 0;
    let mut flip = |kind: &str, layer: &str| {
        let before = links(&c);
        let out = run_tandem_ok(&[
            "transport",
            "set",
            kind,
            "--layer",
            layer,
            endpoint[0],
            endpoint[1],
            endpoint[2],
            endpoint[3],
        ]);
        assert!(out.contains(&format!("{layer} layer now on {kind}")), "{out}");
        // Every link of that layer that was connected before the switch moves to it: it
        // reports the new layer and one more completed switch.
        let moved: Vec<&(u64, u64, String)> =
            before.iter().filter(|(k, l)| layer_of(&k.2) == layer && !l.0.is_empty()).map(|(k, _)| k).collect();
        assert!(!moved.is_empty(), "no {layer} link was connected before the switch to {kind}: {before:?}");
        wait_for(&format!("every {layer} link to switch to {kind}"), Duration::from_secs(60), || {
            let now = links(&c);
            moved.iter().all(|k| now.get(*k).is_some_and(|l| l.0 == kind && l.1 > before[*k].1)).then_some(())
        });
        flips += 1;
    };
    flip("tcp", "data");
    flip("tcp", "control");
    // A membership change commits while the layers keep moving.
    let adder = {
        let dir = c.path_str().to_string();
        std::thread::spawn(move || run_tandem_ok(&["node", "add", "--cluster", &dir]))
    };
    flip("quic", "data");
    flip("quic", "control");
    flip("tcp", "data");
    let added = adder.join().expect("node add");
    assert!(added.contains("node 4 added"), "{added}");
    flip("quic", "data");
    assert_eq!(flips, 6);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("every write was acknowledged");
    assert!(written > 10, "only {written} writes");

    // Every node, the new one included, holds every acknowledged write.
    let all: Vec<u64> = c.node_ids();
    assert_eq!(all, vec![1, 2, 3, 4]);
    c.agreed_leader(&all, LEADER_WAIT);
    for id in &all {
        let settings: Value =
            c.http().get(format!("{}/v1/settings", c.api(*id))).send().expect("get").json().expect("json");
        for n in 0..written {
            assert_eq!(settings[format!("w{n}")], n.to_string(), "write {n} on node {id}");
        }
    }
}

/// Every node's links, from `tandem transport status --json`: per (node, peer, channel), the
/// layer it is on ("" when not connected) and its completed switches.
fn links(c: &Cluster) -> std::collections::BTreeMap<(u64, u64, String), (String, u64)> {
    let status: Value = serde_json::from_str(&c.admin(&["transport", "status", "--json"])).expect("json");
    let mut out = std::collections::BTreeMap::new();
    for view in status.as_array().expect("views") {
        let node = view["node_id"].as_u64().expect("node id");
        for l in view["links"].as_array().expect("links") {
            let channel = l["channel"].as_str().expect("channel").to_string();
            out.insert(
                (node, l["peer"].as_u64().expect("peer"), channel),
                (l["transport"].as_str().unwrap_or("").to_string(), l["switches"].as_u64().expect("switches")),
            );
        }
    }
    out
}

/// The layer a channel's links use: control for Raft, data for the rest.
fn layer_of(channel: &str) -> &'static str {
    if channel == "Control" {
        "control"
    } else {
        "data"
    }
}
