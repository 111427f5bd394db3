//! Copy by reference against real `tandem` processes, with qemu-io over NBD as the host and the
//! `tandem` CLI as the operator:
//! - a token holds the bytes of its moment (the source overwritten after it was made does not
//!   change what it copies), a copy by token lands by reference on every replica (their digests
//!   agree), and expired, revoked, forged and foreign-host tokens are refused with nothing
//!   written;
//! - the primary killed (-9) between the token and the copy: the copy succeeds through the new
//!   primary;
//! - snapshots are read-only and keep their moment's bytes, clones are writable and
//!   independent, and both keep their data when the source is deleted;
//! - a revoked token's image is deleted by every replica's sweeper and its blocks are freed.

use std::time::Duration;

use serde_json::Value;
use tandem_testkit::qemu::{io_ok, qemu_io_ok, qemu_io_tls};
use tandem_testkit::queries::{create_served_volume, try_create_served_volume_in, volume, wait_identical};
use tandem_testkit::{require_tools, wait_for, Cluster};

fn url(c: &Cluster, node: u64, volume: &str) -> String {
    format!("nbd://{}/{volume}", c.nbd_addr(node))
}

/// A 3-node cluster with a leader and volume `src` of `size`, served (qemu-io is the host).
fn three_nodes_with_src(size: &str) -> Cluster {
    require_tools(&["qemu-io"]);
    let c = Cluster::up(3);
    c.agreed_leader(&[1, 2, 3], Duration::from_secs(20));
    create_served_volume(&c, "src", size);
    c
}

/// `qemu-io -r`: a read-only export opens only read-only.
fn read_only(url: &str, commands: &[&str]) -> tandem_testkit::qemu::Ran {
    let mut args = vec!["-r"];
    args.extend(tandem_testkit::qemu::qemu_io_args(url, commands));
    tandem_testkit::qemu::run("qemu-io", &args)
}

/// `tandem token create` (the value alone on stdout).
fn make_token(c: &Cluster, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    c.admin(&all).trim().to_string()
}

fn copy(c: &Cluster, token: &str, to: &str, offset: &str) -> Result<Value, String> {
    let out = c
        .try_tandem(&["copy", "--token", token, "--to", to, "--offset", offset, "--json", "--cluster", c.path_str()])
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}

#[test]
fn a_token_copies_the_bytes_of_its_moment_by_reference_and_bad_tokens_write_nothing() {
    let c = three_nodes_with_src("64M");
    create_served_volume(&c, "dst", "64M");
    qemu_io_ok(&url(&c, 2, "src"), &["write -P 0xab 0 8M", "write -P 0x5a 8M 4k"]);

    let token = make_token(&c, &["src", "--offset", "0", "--length", "8M"]);
    assert_eq!(token.len(), 1024, "a token is 512 bytes, in hex: {token}");
    // The source changes after the token was made.
    qemu_io_ok(&url(&c, 3, "src"), &["write -P 0xcd 0 8M"]);

    let copied = copy(&c, &token, "dst", "16M").expect("copy");
    assert_eq!((copied["bytes"].as_u64(), copied["by_reference"].as_bool()), (Some(8 << 20), Some(true)), "{copied}");
    qemu_io_ok(&url(&c, 3, "dst"), &["read -P 0xab 16M 8M", "read -P 0 24M 4k", "read -P 0 12M 4M"]);
    qemu_io_ok(&url(&c, 1, "src"), &["read -P 0xcd 0 8M", "read -P 0x5a 8M 4k"]);
    // Every replica holds the copy (by reference: each one cloned its own image).
    wait_identical(&c, 1, "dst", &[1, 2, 3], Duration::from_secs(30));

    // A part of the token, into another place; then the same token again (it is reusable
    // until it expires).
    let part = c.admin(&[
        "copy",
        "--token",
        &token,
        "--to",
        "src",
        "--offset",
        "32M",
        "--token-offset",
        "1M",
        "--length",
        "1M",
    ]);
    assert!(part.contains("by reference"), "{part}");
    qemu_io_ok(&url(&c, 2, "src"), &["read -P 0xab 32M 1M", "read -P 0 33M 4k"]);

    // Refused, each with its reason, and nothing written at 40M.
    let mut forged = token.clone().into_bytes();
    forged[200] = if forged[200] == b'0' { b'1' } else { b'0' };
    let forged = String::from_utf8(forged).expect("hex");
    let refused = copy(&c, &forged, "dst", "40M");
    assert!(refused.as_ref().is_err_and(|e| e.contains("not made by this cluster")), "{refused:?}");
    let refused = copy(&c, "00ff", "dst", "40M");
    assert!(refused.as_ref().is_err_and(|e| e.contains("512 bytes")), "{refused:?}");
    let past = c.try_tandem(&[
        "copy",
        "--token",
        &token,
        "--to",
        "dst",
        "--offset",
        "40M",
        "--token-offset",
        "7M",
        "--length",
        "2M",
        "--cluster",
        c.path_str(),
    ]);
    assert!(past.as_ref().is_err_and(|e| e.to_string().contains("past the token")), "{past:?}");
    let outside = copy(&c, &token, "dst", "60M");
    assert!(outside.as_ref().is_err_and(|e| e.contains("outside")), "{outside:?}");

    // A token past its lifetime is dropped by the leader, and refused from then on.
    let short: Value =
        serde_json::from_str(&c.admin(&[
            "token", "create", "src", "--offset", "0", "--length", "4k", "--ttl", "2", "--idle", "2", "--json",
        ]))
        .expect("json");
    let short_id = short["id"].as_u64().expect("id");
    wait_for("the short token to expire", Duration::from_secs(30), || {
        let listed: Value = serde_json::from_str(&c.admin(&["token", "list", "src", "--json"])).ok()?;
        listed.as_array()?.iter().all(|t| t["id"].as_u64() != Some(short_id)).then_some(())
    });
    let refused = copy(&c, short["token"].as_str().expect("value"), "dst", "40M");
    assert!(refused.as_ref().is_err_and(|e| e.contains("expired or was revoked")), "{refused:?}");
    let revoked: Value =
        serde_json::from_str(&c.admin(&["token", "create", "src", "--offset", "0", "--length", "4k", "--json"]))
            .expect("json");
    let listed: Value = serde_json::from_str(&c.admin(&["token", "list", "src", "--json"])).expect("json");
    assert!(listed.as_array().expect("list").iter().all(|t| t.get("token").is_none()), "values are not shown again");
    c.admin(&["token", "revoke", "src", &revoked["id"].as_u64().expect("id").to_string()]);
    let refused = copy(&c, revoked["token"].as_str().expect("value"), "dst", "40M");
    assert!(refused.as_ref().is_err_and(|e| e.contains("expired or was revoked")), "{refused:?}");
    qemu_io_ok(&url(&c, 1, "dst"), &["read -P 0 40M 4M"]);

    // A host may use tokens of its own volumes only.
    let dir = tempfile::tempdir().expect("tempdir");
    c.admin(&["host", "add", "h1", "--site", "local"]);
    c.admin(&["host", "add", "h2", "--site", "local"]);
    c.admin(&["host", "connect", "h1", "src"]);
    c.admin(&["host", "connect", "h1", "dst"]);
    c.admin(&["host", "connect", "h2", "dst"]);
    for h in ["h1", "h2"] {
        c.admin(&["host", "credentials", h, "--out", dir.path().join(h).to_str().expect("utf-8")]);
    }
    let bearer = |h: &str| std::fs::read_to_string(dir.path().join(h).join("token")).expect("token").trim().to_string();
    let post = |h: &str, path: &str, body: Value| {
        let resp =
            c.http().post(format!("{}{path}", c.api(2))).bearer_auth(bearer(h)).json(&body).send().expect("post");
        (resp.status().as_u16(), resp.json::<Value>().unwrap_or(Value::Null))
    };
    let (status, made) = post("h1", "/v1/volumes/src/tokens", serde_json::json!({"offset": 0, "length": 65536}));
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["host"], "h1");
    let h1_token = made["token"].as_str().expect("value").to_string();
    let (status, body) = post("h2", "/v1/volumes/src/tokens", serde_json::json!({"offset": 0, "length": 4096}));
    assert_eq!(status, 403, "h2 may not read src: {body}");
    let (status, body) = post("h2", "/v1/volumes/dst/copy", serde_json::json!({"token": h1_token, "offset": 44 << 20}));
    assert_eq!(status, 403, "h2 used a token of a volume it may not read: {body}");
    qemu_io_ok(&url(&c, 1, "dst"), &["read -P 0 44M 64k"]);
    let (status, body) = post("h1", "/v1/volumes/dst/copy", serde_json::json!({"token": h1_token, "offset": 44 << 20}));
    assert_eq!((status, body["by_reference"].as_bool()), (200, Some(true)), "{body}");
    assert!(io_ok(&qemu_io_tls(c.nbd_addr(3), "dst", Some(&dir.path().join("h1")), &["read -P 0xcd 44M 64k"])));

    // A source on one node only: the target's other replicas hold no image, so the copy is
    // streamed from that node, and lands the same.
    c.admin(&["dataset", "create", "solo", "--replicas", "1"]);
    try_create_served_volume_in(&c, "one", "16M", Some("solo")).expect("one");
    qemu_io_ok(&url(&c, 1, "one"), &["write -P 0x3c 1M 2M"]);
    let one = make_token(&c, &["one", "--offset", "1M", "--length", "2M"]);
    let copied = copy(&c, &one, "dst", "48M").expect("copy");
    assert_eq!((copied["bytes"].as_u64(), copied["by_reference"].as_bool()), (Some(2 << 20), Some(false)), "{copied}");
    qemu_io_ok(&url(&c, 2, "dst"), &["read -P 0x3c 48M 2M", "read -P 0 50M 4k"]);
    wait_identical(&c, 1, "dst", &[1, 2, 3], Duration::from_secs(30));
}

#[test]
fn a_copy_by_token_succeeds_through_the_new_primary_after_the_old_one_is_killed() {
    let c = three_nodes_with_src("32M");
    let src = volume(&c, 1, "src").expect("src");
    qemu_io_ok(&url(&c, 1, "src"), &["write -P 0x77 4M 4M"]);
    let token = make_token(&c, &["src", "--offset", "4M", "--length", "4M"]);
    // The primary that made the token's image goes; the copy goes to the same volume, so it is
    // the new primary that copies.
    let primary = src["primary"].as_u64().expect("primary");
    c.kill(primary);
    let survivors: Vec<u64> = (1..=3).filter(|&n| n != primary).collect();
    let via = survivors[0];
    let copied = wait_for("the copy through the survivors", Duration::from_secs(60), || {
        c.try_tandem(&[
            "copy",
            "--token",
            &token,
            "--to",
            "src",
            "--offset",
            "20M",
            "--json",
            "--endpoint",
            &c.api(via),
            "--cluster",
            c.path_str(),
        ])
        .ok()
    });
    let copied: Value = serde_json::from_str(&copied).expect("json");
    assert_eq!(copied["by_reference"].as_bool(), Some(true), "the survivors hold the image: {copied}");
    let now = volume(&c, via, "src").expect("src");
    assert_ne!(now["primary"].as_u64(), Some(primary), "{now}");
    qemu_io_ok(&url(&c, survivors[1], "src"), &["read -P 0x77 20M 4M", "read -P 0 24M 4k", "read -P 0x77 4M 4M"]);
    wait_identical(&c, via, "src", &survivors, Duration::from_secs(60));
}

#[test]
fn snapshots_are_read_only_and_keep_their_moment_and_clones_are_independent_of_their_source() {
    let c = three_nodes_with_src("32M");
    qemu_io_ok(&url(&c, 1, "src"), &["write -P 0x21 0 4M", "write -P 0x22 16M 1M"]);

    let made = c.admin(&["snapshot", "create", "src", "snap"]);
    assert!(made.contains("snapshot snap of src"), "{made}");
    c.admin(&["volume", "clone", "src", "copy1"]);
    qemu_io_ok(&url(&c, 2, "src"), &["write -P 0x99 0 1M"]);
    for node in 1..=3 {
        wait_for("the snapshot to be served", Duration::from_secs(30), || {
            io_ok(&read_only(&url(&c, node, "snap"), &["read -P 0x21 0 4M", "read -P 0x22 16M 1M"])).then_some(())
        });
        // Read-only: the export says so, and qemu refuses to open it for writing.
        let write = tandem_testkit::qemu::qemu_io(&url(&c, node, "snap"), &["write -P 0x55 0 4k"]);
        assert!(
            !io_ok(&write) && write.text.contains("Permission denied"),
            "a write to a snapshot through node {node}: {}",
            write.text
        );
    }
    assert!(io_ok(&read_only(&url(&c, 3, "snap"), &["read -P 0x21 0 4M"])));
    qemu_io_ok(&url(&c, 3, "copy1"), &["read -P 0x21 0 4M", "write -P 0x44 0 4k", "read -P 0x44 0 4k"]);
    qemu_io_ok(&url(&c, 1, "src"), &["read -P 0x99 0 1M", "read -P 0x21 1M 3M"]);

    let listed: Value = serde_json::from_str(&c.admin(&["snapshot", "list", "--json"])).expect("json");
    let names: Vec<&str> = listed.as_array().expect("list").iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, vec!["snap"], "{listed}");
    assert!(
        c.try_tandem(&["snapshot", "delete", "copy1", "--cluster", c.path_str()]).is_err(),
        "a clone is no snapshot"
    );

    // The source goes; the snapshot and the clone keep their data, on every replica.
    c.admin(&["volume", "delete", "src"]);
    assert!(io_ok(&read_only(&url(&c, 2, "snap"), &["read -P 0x21 0 4M", "read -P 0x22 16M 1M"])));
    qemu_io_ok(&url(&c, 2, "copy1"), &["read -P 0x44 0 4k", "read -P 0x21 4k 1M"]);
    wait_identical(&c, 1, "copy1", &[1, 2, 3], Duration::from_secs(60));
    wait_identical(&c, 1, "snap", &[1, 2, 3], Duration::from_secs(60));
    c.admin(&["snapshot", "delete", "snap"]);
    assert!(volume(&c, 1, "snap").is_none());
}

/// A token's image holds the blocks the source has overwritten since; once the token is
/// revoked, every replica's sweeper deletes the image and those blocks are freed.
#[test]
fn a_revoked_tokens_image_is_deleted_and_its_blocks_freed_on_every_replica() {
    let c = three_nodes_with_src("16M");
    qemu_io_ok(&url(&c, 1, "src"), &["write -P 0x11 0 4M"]);
    let gauge = |n: u64, name: &str| c.metric(n, name).unwrap_or_else(|| panic!("node {n} shows no {name}"));
    let live = |n: u64| gauge(n, "tandem_store_live_bytes");
    let token: Value =
        serde_json::from_str(&c.admin(&["token", "create", "src", "--offset", "0", "--length", "4M", "--json"]))
            .expect("json");
    let before: Vec<f64> = (1..=3).map(live).collect();
    for n in 1..=3 {
        assert!(gauge(n, "tandem_store_unclaimed_ids") >= 1.0, "node {n} holds the token's image");
    }
    // The source moves on: the image alone keeps the old blocks, on every replica.
    qemu_io_ok(&url(&c, 2, "src"), &["write -P 0x22 0 4M"]);
    for n in 1..=3 {
        wait_for(&format!("node {n} to hold both versions"), Duration::from_secs(30), || {
            (live(n) >= before[n as usize - 1] + (4 << 20) as f64).then_some(())
        });
    }
    let held: Vec<f64> = (1..=3).map(live).collect();
    c.admin(&["token", "revoke", "src", &token["id"].as_u64().expect("id").to_string()]);
    // Two sweeps 30 s apart find the image unclaimed, then it goes.
    for n in 1..=3 {
        wait_for(&format!("node {n} to delete the image and free its blocks"), Duration::from_secs(150), || {
            (gauge(n, "tandem_store_unclaimed_ids") == 0.0 && live(n) <= held[n as usize - 1] - (4 << 20) as f64)
                .then_some(())
        });
    }
    qemu_io_ok(&url(&c, 3, "src"), &["read -P 0x22 0 4M"]);
}
