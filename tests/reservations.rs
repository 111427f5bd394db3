//! Persistent reservations against real `tandem` processes, with qemu-io over NBD (TLS, each
//! host by its certificate) as the hosts and `tandem reserve` as the operator:
//! - range reservations: two hosts reserve disjoint ranges of one volume and write their own,
//!   through different nodes; a write into the other's range is refused (EPERM) and changes
//!   nothing; an overlapping reservation is refused; a reservation moved to another range
//!   frees the old one and guards the new one; a host's credential acts only for itself;
//! - fencing through failover: one host holds a write-exclusive reservation, the other keeps
//!   writing through the surviving nodes while the primary is killed (-9): not one of its
//!   writes lands, the holder's writes go on at the new primary, and the reservations survive
//!   the failover, a restart of the whole cluster and a membership change (a fourth node joins
//!   and enforces them).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_testkit::qemu::{io_ok, qemu_io_tls};
use tandem_testkit::queries::wait_identical;
use tandem_testkit::{require_tools, wait_for, Cluster};

const MIB: u64 = 1 << 20;

/// A 3-node cluster with volume `v` of 16 MiB, hosts h1 and h2 both connected to it, and their
/// credentials in `dir`/h1 and `dir`/h2.
fn shared_volume(dir: &std::path::Path) -> Cluster {
    let c = Cluster::up(3);
    c.agreed_leader(&[1, 2, 3], Duration::from_secs(20));
    c.admin(&["volume", "create", "v", "--size", "16M"]);
    for h in ["h1", "h2"] {
        c.admin(&["host", "add", h, "--site", "local"]);
        c.admin(&["host", "connect", h, "v"]);
        let out = dir.join(h);
        c.admin(&["host", "credentials", h, "--out", out.to_str().expect("utf-8")]);
    }
    c
}

fn reserve(c: &Cluster, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["reserve"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--cluster", c.path_str()]);
    c.try_tandem(&all).map_err(|e| e.to_string())
}

fn reservations(c: &Cluster) -> Value {
    let text = c.admin(&["reserve", "list", "v", "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("reserve list --json: {e}: {text}"))
}

/// qemu-io as host `h` (its certificate in `dir`/`h`) through node `via`.
fn host_io(c: &Cluster, dir: &std::path::Path, h: &str, via: u64, commands: &[&str]) -> tandem_testkit::qemu::Ran {
    qemu_io_tls(c.nbd_addr(via), "v", Some(&dir.join(h)), commands)
}

#[test]
fn range_reservations_keep_each_host_to_its_own_range_through_every_node() {
    require_tools(&["qemu-io"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let c = shared_volume(dir.path());
    let (r1, r2) = (format!("0:{}", 4 * MIB), format!("{}:{}", 4 * MIB, 4 * MIB));
    reserve(&c, &["register", "v", "--host", "h1", "--key", "0x1"]).expect("h1 registers");
    reserve(&c, &["register", "v", "--host", "h2", "--key", "0x2"]).expect("h2 registers");
    reserve(&c, &["reserve", "v", "--host", "h1", "--key", "0x1", "--type", "we", "--range", &r1]).expect("h1's range");
    reserve(&c, &["reserve", "v", "--host", "h2", "--key", "0x2", "--type", "ea", "--range", &r2]).expect("h2's range");
    // Overlapping reservations are refused, whoever asks.
    let overlap = format!("{}:{}", 2 * MIB, 4 * MIB);
    for (h, key) in [("h1", "0x1"), ("h2", "0x2")] {
        let refused = reserve(&c, &["reserve", "v", "--host", h, "--key", key, "--type", "we", "--range", &overlap]);
        assert!(refused.as_ref().is_err_and(|e| e.contains("reservation conflict")), "{h}: {refused:?}");
    }
    // A wrong key is a conflict too.
    let wrong =
        reserve(&c, &["reserve", "v", "--host", "h1", "--key", "0x2", "--type", "we", "--range", "12582912:4096"]);
    assert!(wrong.is_err_and(|e| e.contains("another key")));

    // Each host writes its own range, through every node (the primary and the proxies).
    for via in 1..=3 {
        let mine = host_io(&c, dir.path(), "h1", via, &["write -P 0x11 0 64k"]);
        assert!(io_ok(&mine), "h1 via node {via}: {}", mine.text);
        let mine = host_io(&c, dir.path(), "h2", via, &["write -P 0x22 4M 64k"]);
        assert!(io_ok(&mine), "h2 via node {via}: {}", mine.text);
        // Into the other's range: refused, with EPERM.
        let theirs = host_io(&c, dir.path(), "h2", via, &["write -P 0xee 0 64k"]);
        assert!(
            !io_ok(&theirs) && theirs.text.contains("Operation not permitted"),
            "h2 into h1's range: {}",
            theirs.text
        );
        let theirs = host_io(&c, dir.path(), "h1", via, &["write -P 0xee 4M 4k"]);
        assert!(!io_ok(&theirs), "h1 into h2's range: {}", theirs.text);
        // h2's range is exclusive access: h1 may not even read it; h1's is write exclusive.
        assert!(!io_ok(&host_io(&c, dir.path(), "h1", via, &["read 4M 4k"])), "h1 read h2's range");
        assert!(io_ok(&host_io(&c, dir.path(), "h2", via, &["read -P 0x11 0 64k"])), "h2 reads h1's range");
    }
    // Nothing of the refused writes landed.
    assert!(io_ok(&host_io(&c, dir.path(), "h1", 2, &["read -P 0x11 0 64k"])));
    assert!(io_ok(&host_io(&c, dir.path(), "h2", 3, &["read -P 0x22 4M 64k"])));
    // Outside both ranges anyone registered writes.
    assert!(io_ok(&host_io(&c, dir.path(), "h2", 1, &["write -P 0x33 12M 4k"])));

    // h1 moves its reservation to 8M: its old range is free, the new one guarded.
    let moved = format!("{}:{}", 8 * MIB, 4 * MIB);
    let into_h2 = reserve(&c, &["move", "v", "--host", "h1", "--key", "0x1", "--range", &r1, "--to", &r2]);
    assert!(into_h2.is_err_and(|e| e.contains("reservation conflict")), "moved onto h2's range");
    reserve(&c, &["move", "v", "--host", "h1", "--key", "0x1", "--range", &r1, "--to", &moved]).expect("move");
    assert!(io_ok(&host_io(&c, dir.path(), "h2", 2, &["write -P 0x44 0 4k"])), "the old range is free");
    assert!(!io_ok(&host_io(&c, dir.path(), "h2", 2, &["write -P 0x44 8M 4k"])), "the new range is guarded");
    let state = reservations(&c);
    let ranges: Vec<(String, String, String)> = state["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (s("range"), s("holder"), s("type"))
        })
        .collect();
    assert_eq!(
        ranges,
        vec![
            (moved.clone(), "host:h1".into(), "write-exclusive".into()),
            (r2.clone(), "host:h2".into(), "exclusive-access".into())
        ],
        "{state}"
    );
    assert_eq!(state["registrations"].as_array().map(Vec::len), Some(2), "{state}");

    // A host's own credential acts for itself only.
    let token = |h: &str| std::fs::read_to_string(dir.path().join(h).join("token")).expect("token").trim().to_string();
    let url = format!("{}/v1/volumes/v/reservations", c.api(3));
    let body = |h: &str| serde_json::json!({"op": "clear", "host": h, "key": "0x2"});
    let as_h2 =
        |h: &str| c.http().post(&url).bearer_auth(token("h2")).json(&body(h)).send().expect("post").status().as_u16();
    assert_eq!(as_h2("h1"), 403);
    // Clearing removes every registration and reservation: everyone writes everywhere again.
    assert_eq!(as_h2("h2"), 200);
    assert!(io_ok(&host_io(&c, dir.path(), "h1", 3, &["write -P 0x55 4M 4k"])));
    let state = reservations(&c);
    assert_eq!(
        (state["registrations"].as_array().map(Vec::len), state["ranges"].as_array().map(Vec::len)),
        (Some(0), Some(0))
    );
}

#[test]
fn a_fenced_host_lands_no_write_through_a_failover_and_reservations_survive_restarts_and_new_members() {
    require_tools(&["qemu-io"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let c = shared_volume(dir.path());
    reserve(&c, &["register", "v", "--host", "h1", "--key", "0xa1"]).expect("h1 registers");
    reserve(&c, &["register", "v", "--host", "h2", "--key", "0xb2", "--aptpl"]).expect("h2 registers");
    reserve(&c, &["reserve", "v", "--host", "h1", "--key", "0xa1", "--type", "we"]).expect("h1 reserves");
    assert!(io_ok(&host_io(&c, dir.path(), "h1", 1, &["write -P 0x11 1M 64k"])));

    let volume = tandem_testkit::queries::volume(&c, 1, "v").expect("volume v");
    let primary = volume["primary"].as_u64().expect("primary");
    let survivors: Vec<u64> = (1..=3).filter(|n| *n != primary).collect();
    // h2 keeps writing through the survivors, before, during and after the failover.
    let stop = Arc::new(AtomicBool::new(false));
    let (attempts, landed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fenced = {
        let (stop, attempts, landed) = (stop.clone(), attempts.clone(), landed.clone());
        let (addrs, creds) = (survivors.iter().map(|n| c.nbd_addr(*n)).collect::<Vec<_>>(), dir.path().join("h2"));
        std::thread::spawn(move || {
            let mut texts = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let via = addrs[attempts.fetch_add(1, Ordering::Relaxed) % addrs.len()];
                let ran = qemu_io_tls(via, "v", Some(&creds), &["write -P 0xee 1M 64k"]);
                if io_ok(&ran) {
                    landed.fetch_add(1, Ordering::Relaxed);
                    texts.push(ran.text);
                }
            }
            texts
        })
    };
    wait_for("h2's first refused writes", Duration::from_secs(60), || {
        (attempts.load(Ordering::Relaxed) >= 2).then_some(())
    });
    c.kill(primary);
    let killed_at = Instant::now();
    // The holder's writes go on at the new primary (held through the failover, never failed).
    let after = host_io(&c, dir.path(), "h1", survivors[0], &["write -P 0x22 1M 64k"]);
    assert!(io_ok(&after), "the holder's write after the failover: {}", after.text);
    let failover = killed_at.elapsed();
    let seen = attempts.load(Ordering::Relaxed);
    wait_for("h2's writes to the new primary", Duration::from_secs(60), || {
        (attempts.load(Ordering::Relaxed) >= seen + 3).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let landed_texts = fenced.join().expect("the fenced host's thread");
    assert!(landed_texts.is_empty(), "a fenced host's write landed: {landed_texts:?}");
    assert_eq!(landed.load(Ordering::Relaxed), 0);
    eprintln!(
        "failover served the holder after {failover:?}; the fenced host tried {} writes",
        attempts.load(Ordering::Relaxed)
    );
    let new_primary = tandem_testkit::queries::volume(&c, survivors[0], "v").expect("volume v")["primary"].as_u64();
    assert!(new_primary.is_some_and(|p| p != primary), "no failover: {new_primary:?}");
    assert!(io_ok(&host_io(&c, dir.path(), "h2", survivors[1], &["read -P 0x22 1M 64k"])), "the holder's data");
    wait_identical(&c, survivors[0], "v", &survivors, Duration::from_secs(30));

    // The reservation holds on every node after the failover, and after the whole cluster
    // restarts.
    let before = reservations(&c);
    assert_eq!(before["reservation"]["holder"], "host:h1", "{before}");
    assert_eq!(before["aptpl"], true, "{before}");
    c.down();
    c.restart_missing();
    c.agreed_leader(&[1, 2, 3], Duration::from_secs(30));
    let restarted = reservations(&c);
    assert_eq!(restarted, before);
    let refused = host_io(&c, dir.path(), "h2", primary, &["write -P 0xee 1M 4k"]);
    assert!(!io_ok(&refused) && refused.text.contains("Operation not permitted"), "{}", refused.text);
    assert!(io_ok(&host_io(&c, dir.path(), "h1", primary, &["write -P 0x33 1M 4k"])), "the holder after the restart");

    // A membership change: a fourth node joins and serves the volume (by proxy) under the same
    // reservations.
    let added = c.try_add_node(None).expect("a fourth node");
    wait_for("the new node to serve v", Duration::from_secs(60), || {
        io_ok(&host_io(&c, dir.path(), "h1", added, &["read -P 0x33 1M 4k"])).then_some(())
    });
    let refused = host_io(&c, dir.path(), "h2", added, &["write -P 0xee 1M 4k"]);
    assert!(!io_ok(&refused) && refused.text.contains("Operation not permitted"), "via node {added}: {}", refused.text);
    assert!(io_ok(&host_io(&c, dir.path(), "h1", added, &["write -P 0x44 1M 4k"])), "the holder via the new node");
    assert_eq!(reservations(&c), before, "the reservations after the membership change");
}
