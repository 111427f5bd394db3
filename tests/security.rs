//! Who may connect, against real `tandem` processes:
//! - the admin API's credentials and roles: every write endpoint refuses no credential with 401
//!   and a host's with 403, accepts the admin's, and a refused request changes nothing; a host
//!   reads its own path map and nobody else's; new credentials revoke the old; an audit line
//!   names who wrote; a node refuses a secret file others can read;
//! - NBD under each access policy (`tls`: TLS optional; `open`: none), then over TLS under
//!   `tls-required`, with qemu-io, nbdcopy and nbdinfo as hosts: a host's
//!   certificate opens its own volume through every node (primary and proxying) and lists only
//!   it; another host's volume, plaintext, TLS without a certificate and a certificate of
//!   another CA are refused; disconnecting a volume ends the host's open connection within
//!   [`REVOKE_BOUND`]; a replaced certificate stops working, and its open connection ends.

use std::time::{Duration, Instant};

use reqwest::blocking::RequestBuilder;
use reqwest::Method;
use serde_json::{json, Value};
use tandem_testkit::qemu::{io_ok, nbd_image_opts, nbds_url, qemu_io_tls, run, run_ok, tls_object};
use tandem_testkit::{http, http_as, require_tools, Cluster};

/// Every endpoint that changes something, with a body an admin's request could carry.
fn write_endpoints() -> Vec<(Method, &'static str, Value)> {
    vec![
        (Method::POST, "/v1/cluster/init", json!({})),
        (Method::POST, "/v1/nodes", json!({})),
        (Method::DELETE, "/v1/nodes/99", Value::Null),
        (Method::PUT, "/v1/settings/k", json!({ "value": "changed" })),
        (Method::DELETE, "/v1/settings/k", Value::Null),
        (Method::PUT, "/v1/transport", json!({ "transport": "tcp" })),
        (Method::POST, "/v1/datasets", json!({ "name": "d2" })),
        (Method::DELETE, "/v1/datasets/default", Value::Null),
        (Method::POST, "/v1/volumes", json!({ "name": "v9", "size_bytes": 1048576 })),
        (Method::DELETE, "/v1/volumes/v1", Value::Null),
        (Method::POST, "/v1/hosts", json!({ "name": "h9", "site": "local" })),
        (Method::DELETE, "/v1/hosts/h2", Value::Null),
        (Method::POST, "/v1/hosts/h1/volumes", json!({ "volume": "v2" })),
        (Method::DELETE, "/v1/hosts/h1/volumes/v1", Value::Null),
        (Method::POST, "/v1/hosts/h2/probes", json!({ "probes": [] })),
        (Method::POST, "/v1/hosts/h2/credentials", json!({ "public_key": "00" })),
        (Method::POST, "/v1/admin/credentials", json!({ "name": "intruder" })),
    ]
}

fn send(client: &reqwest::blocking::Client, c: &Cluster, method: &Method, path: &str, body: &Value) -> (u16, String) {
    let url = format!("{}{path}", c.api(1));
    let mut req: RequestBuilder = client.request(method.clone(), &url);
    if !body.is_null() {
        req = req.json(body);
    }
    let resp = req.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().unwrap_or_default())
}

/// What a refused request must not have changed.
fn state(c: &Cluster) -> Value {
    let get =
        |p: &str| -> Value { c.http().get(format!("{}{p}", c.api(2))).send().expect("get").json().expect("json") };
    json!({
        "volumes": get("/v1/volumes"),
        "hosts": get("/v1/hosts"),
        "settings": get("/v1/settings"),
        "datasets": get("/v1/datasets"),
        "nodes": get("/v1/nodes"),
    })
}

/// A 3-node cluster with volumes v1 and v2 of `size`, host h1 connected to v1 and h2 to v2.
fn two_hosts(size: &str) -> Cluster {
    let c = Cluster::up(3);
    c.agreed_leader(&[1, 2, 3], Duration::from_secs(20));
    for v in ["v1", "v2"] {
        c.admin(&["volume", "create", v, "--size", size]);
    }
    for h in ["h1", "h2"] {
        c.admin(&["host", "add", h, "--site", "local"]);
    }
    c.admin(&["host", "connect", "h1", "v1"]);
    c.admin(&["host", "connect", "h2", "v2"]);
    c
}

/// Issues credentials to `host` into a temp dir and returns its token.
fn host_token(c: &Cluster, host: &str, dir: &std::path::Path) -> String {
    let out = dir.join(host);
    c.admin(&["host", "credentials", host, "--out", out.to_str().expect("utf-8")]);
    std::fs::read_to_string(out.join("token")).expect("token").trim().to_string()
}

#[test]
fn the_api_refuses_requests_without_the_right_credential_and_changes_nothing() {
    let c = two_hosts("4M");
    c.put_setting(1, "k", "v");
    let dir = tempfile::tempdir().expect("tempdir");
    let h1 = host_token(&c, "h1", dir.path());
    let before = state(&c);

    let anonymous = http();
    let host = http_as(Some(&h1));
    let forged = http_as(Some(&h1.replacen("_h_", "_a_", 1)));
    let garbage = http_as(Some("not-a-token"));
    for (method, path, body) in write_endpoints() {
        let (status, text) = send(&anonymous, &c, &method, path, &body);
        assert_eq!(status, 401, "{method} {path} without a credential: {text}");
        assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v["error"].is_string()), "{text}");
        for (who, client) in [("a forged token", &forged), ("a garbage token", &garbage)] {
            let (status, text) = send(client, &c, &method, path, &body);
            assert_eq!(status, 401, "{method} {path} with {who}: {text}");
        }
        let (status, text) = send(&host, &c, &method, path, &body);
        assert_eq!(status, 403, "{method} {path} with host h1's credential: {text}");
        assert!(text.contains("host:h1"), "{text}");
    }
    // Reads too: the cluster, the volumes, another host's map, the metrics.
    for path in ["/v1/cluster", "/v1/volumes", "/v1/hosts", "/v1/hosts/h2/paths", "/v1/hosts/h2", "/metrics"] {
        assert_eq!(send(&anonymous, &c, &Method::GET, path, &Value::Null).0, 401, "GET {path}");
        assert_eq!(send(&host, &c, &Method::GET, path, &Value::Null).0, 403, "GET {path} as h1");
    }
    assert_eq!(state(&c), before, "a refused request changed the cluster");

    // A host reads its own map (on every node) and may report its own probes.
    for id in [1, 2, 3] {
        let url = format!("{}/v1/hosts/h1/paths", c.api(id));
        let map: Value = host.get(&url).send().expect("get").json().expect("json");
        assert_eq!(map["host"], "h1", "{map}");
        assert_eq!(map["volumes"][0]["volume"], "v1", "{map}");
    }
    let (status, text) = send(&host, &c, &Method::POST, "/v1/hosts/h1/probes", &json!({ "probes": [] }));
    assert!(status < 300, "h1's own probe report: {status} {text}");

    // The admin's token is accepted everywhere: no write endpoint refuses it for who it is.
    let admin = c.http();
    for (method, path, body) in write_endpoints() {
        let (status, text) = send(&admin, &c, &method, path, &body);
        assert!(status != 401 && status != 403, "{method} {path} as admin: {status} {text}");
    }
    // ... and each accepted write left an audit line naming its principal.
    let logs: String = (1..=3).map(|id| std::fs::read_to_string(c.log_path(id)).unwrap_or_default()).collect();
    assert!(logs.contains("principal=admin:admin method=POST path=/v1/volumes"), "no audit line for the volume");
    assert!(logs.contains("refused: not permitted principal=host:h1"), "no audit line for a refusal");

    // New credentials revoke the old token.
    let h1_again = host_token(&c, "h1", dir.path());
    assert_ne!(h1, h1_again);
    let url = format!("{}/v1/hosts/h1/paths", c.api(3));
    tandem_testkit::wait_for("the old token to be refused", Duration::from_secs(10), || {
        (http_as(Some(&h1)).get(&url).send().ok()?.status().as_u16() == 401).then_some(())
    });
    assert_eq!(http_as(Some(&h1_again)).get(&url).send().expect("get").status().as_u16(), 200);
    // Private files are private.
    use std::os::unix::fs::PermissionsExt;
    for f in ["h1/client-key.pem", "h1/token"] {
        let mode = std::fs::metadata(dir.path().join(f)).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let mode = std::fs::metadata(c.path().join("admin.token")).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin.token");
}

#[test]
fn a_node_refuses_to_start_with_a_secret_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::up(1);
    c.down();
    let secret = c.path().join("certs/cluster.secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = c.try_restart_missing().expect_err("a node must not start");
    let log = std::fs::read_to_string(c.log_path(1)).unwrap_or_default();
    let both = format!("{err}\n{log}");
    assert!(both.contains("cluster.secret") && both.contains("chmod 600"), "{both}");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    c.restart_missing();
    assert!(c.view(1).is_some());
}

/// qemu's block options for `volume` through `nbd`, over TLS with the object `tls0` or not.
#[test]
fn nbd_over_tls_admits_each_host_to_its_own_volumes_only_and_a_disconnect_ends_its_connection() {
    require_tools(&["qemu-io", "nbdcopy", "nbdinfo"]);
    let c = two_hosts("16M");
    let dir = tempfile::tempdir().expect("tempdir");
    host_token(&c, "h1", dir.path());
    host_token(&c, "h2", dir.path());
    let (h1, h2) = (dir.path().join("h1"), dir.path().join("h2"));
    // A certificate of another cluster's CA, for a host of the same name.
    let other = Cluster::also_up(1, "tcp");
    other.admin(&["host", "add", "h1", "--site", "local"]);
    let foreign = dir.path().join("foreign");
    other.admin(&["host", "credentials", "h1", "--out", foreign.to_str().expect("utf-8")]);
    // Its CA is not ours: give it our CA to check the server with, so only its own
    // certificate is foreign.
    std::fs::copy(h1.join("ca-cert.pem"), foreign.join("ca-cert.pem")).expect("copy CA");
    drop(other);
    // Without a certificate at all: only our CA.
    let no_cert = dir.path().join("no-cert");
    std::fs::create_dir(&no_cert).expect("mkdir");
    std::fs::copy(h1.join("ca-cert.pem"), no_cert.join("ca-cert.pem")).expect("copy CA");

    let nbd: Vec<std::net::SocketAddr> = (1..=3).map(|id| c.nbd_addr(id)).collect();
    // `tandem up`'s policy, `tls`: TLS offered and optional. A plaintext client is anonymous
    // and reaches every volume; h1's certificate reaches its own only.
    for addr in &nbd {
        assert!(io_ok(&qemu_io_tls(*addr, "v2", None, &["read 0 4k"])), "anonymous via {addr}");
        assert!(io_ok(&qemu_io_tls(*addr, "v1", Some(&h1), &["read 0 4k"])), "h1 via {addr}");
        assert!(!io_ok(&qemu_io_tls(*addr, "v2", Some(&h1), &["read 0 4k"])), "h1 opened v2 via {addr}");
    }
    // `open`: no TLS at all (STARTTLS refused), everyone anonymous.
    c.admin(&["setting", "set", "access", "open"]);
    tandem_testkit::wait_for("every node to stop offering TLS", Duration::from_secs(10), || {
        nbd.iter().all(|a| !io_ok(&qemu_io_tls(*a, "v1", Some(&h1), &["read 0 4k"]))).then_some(())
    });
    assert!(io_ok(&qemu_io_tls(nbd[1], "v2", None, &["read 0 4k"])), "anonymous under open");
    // libnbd, told to require TLS, gives up when STARTTLS is refused.
    let ran = run("nbdinfo", &[&nbds_url(nbd[1], "v1", &h1)]);
    assert!(!ran.status.success(), "nbds under open: {}", ran.text);

    c.admin(&["setting", "set", "access", "tls-required"]);
    // Every node (the primary and the proxying ones) applies the setting.
    tandem_testkit::wait_for("every node to require identities", Duration::from_secs(10), || {
        nbd.iter().all(|a| !io_ok(&qemu_io_tls(*a, "v1", None, &["read 0 4k"]))).then_some(())
    });

    // h1 writes and reads its volume through every node, with qemu-io and nbdcopy.
    for (i, addr) in nbd.iter().enumerate() {
        let pattern = format!("{}", 0x40 + i);
        let write = format!("write -P {pattern} {} 64k", i * 65536);
        let read = format!("read -P {pattern} {} 64k", i * 65536);
        let ran = qemu_io_tls(*addr, "v1", Some(&h1), &[&write, &read]);
        assert!(io_ok(&ran), "h1 through {addr}: {}", ran.text);
    }
    let image = dir.path().join("v1.img");
    run_ok("nbdcopy", &[&nbds_url(nbd[2], "v1", &h1), image.to_str().expect("utf-8")]);
    let bytes = std::fs::read(&image).expect("copied image");
    for i in 0..3 {
        assert!(bytes[i * 65536..(i + 1) * 65536].iter().all(|b| *b == 0x40 + i as u8), "block {i} of v1");
    }
    // It lists only its own volume.
    let list = run_ok("nbdinfo", &["--list", &nbds_url(nbd[1], "", &h1)]);
    assert!(list.contains("v1") && !list.contains("v2"), "{list}");

    // Refused: another host's volume, no TLS, TLS without a certificate, a foreign certificate.
    for addr in &nbd {
        let ran = qemu_io_tls(*addr, "v2", Some(&h1), &["read 0 4k"]);
        assert!(!io_ok(&ran) && ran.text.contains("not connected to host"), "h1 opened v2 via {addr}: {}", ran.text);
        let ran = qemu_io_tls(*addr, "v1", None, &["read 0 4k"]);
        assert!(!io_ok(&ran), "plaintext via {addr}: {}", ran.text);
        let ran = run("nbdinfo", &[&nbds_url(*addr, "v1", &no_cert)]);
        assert!(!ran.status.success(), "TLS without a certificate via {addr}: {}", ran.text);
        let ran = run("nbdinfo", &[&nbds_url(*addr, "v1", &foreign)]);
        assert!(!ran.status.success(), "a foreign certificate via {addr}: {}", ran.text);
    }
    let ran = run("nbdinfo", &[&format!("nbd://{}/v1", nbd[0])]);
    assert!(!ran.status.success() && ran.text.contains("TLS"), "plaintext nbdinfo: {}", ran.text);
    // h2 reads its own volume, and not h1's.
    assert!(io_ok(&qemu_io_tls(nbd[0], "v2", Some(&h2), &["read -P 0 0 64k"])));
    assert!(!io_ok(&qemu_io_tls(nbd[0], "v1", Some(&h2), &["read 0 4k"])));

    // A host's open connection ends when its volume is disconnected from it.
    for via in [0, 2] {
        let addr = nbd[via];
        let mut session =
            qemu_io_session(&["--object", &tls_object(&h1), "--image-opts", &nbd_image_opts(addr, "v1", true)]);
        let port = addr.port();
        tandem_testkit::wait_for("h1's connection to be up", Duration::from_secs(30), || {
            (established(port) == 1).then_some(())
        });
        c.admin(&["host", "disconnect", "h1", "v1"]);
        let start = Instant::now();
        tandem_testkit::wait_for("the node to end h1's connection", REVOKE_BOUND, || {
            (established(port) == 0).then_some(())
        });
        eprintln!("h1's connection through {addr} ended {:?} after the disconnect committed", start.elapsed());
        let ran = qemu_io_tls(addr, "v1", Some(&h1), &["read 0 4k"]);
        assert!(!io_ok(&ran) && ran.text.contains("not connected to host"), "reconnect via {addr}: {}", ran.text);
        let _ = session.kill();
        let _ = session.wait();
        c.admin(&["host", "connect", "h1", "v1"]);
    }
    // New credentials: a connection open with the old certificate ends, the old certificate is
    // refused, the new one works.
    let old = dir.path().join("h1-old");
    std::fs::rename(&h1, &old).expect("keep the old credentials");
    let port = nbd[1].port();
    let mut session =
        qemu_io_session(&["--object", &tls_object(&old), "--image-opts", &nbd_image_opts(nbd[1], "v1", true)]);
    tandem_testkit::wait_for("h1's connection to be up", Duration::from_secs(30), || {
        (established(port) == 1).then_some(())
    });
    host_token(&c, "h1", dir.path());
    tandem_testkit::wait_for("the node to end the old certificate's connection", REVOKE_BOUND, || {
        (established(port) == 0).then_some(())
    });
    let _ = session.kill();
    let _ = session.wait();
    tandem_testkit::wait_for("the old certificate to be refused", Duration::from_secs(10), || {
        (!io_ok(&qemu_io_tls(nbd[1], "v1", Some(&old), &["read 0 4k"]))).then_some(())
    });
    assert!(io_ok(&qemu_io_tls(nbd[1], "v1", Some(&h1), &["read -P 0x40 0 64k"])));
}

/// How long after a disconnect commits a host's connection to the volume may live, at most
/// (docs/OPERATIONS.md, "Security": the node ends it as soon as it applies the change).
const REVOKE_BOUND: Duration = Duration::from_secs(5);

/// A qemu-io that keeps its connection open, waiting for commands on stdin.
fn qemu_io_session(args: &[&str]) -> std::process::Child {
    std::process::Command::new("qemu-io")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io")
}

/// Established TCP connections to local port `port`.
fn established(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", &format!("( sport = :{port} )")])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

const IQN1: &str = "iqn.2026-12.test:h1";
const IQN2: &str = "iqn.2026-12.test:h2";
const STRANGER: &str = "iqn.2026-12.test:stranger";

fn target(volume: &str) -> String {
    format!("iqn.2026-12.io.tandem:local:{volume}")
}

/// A libiscsi tool run as initiator `iqn` with `env` set; whether it succeeded, and its output.
fn libiscsi(tool: &str, iqn: &str, url: &str, env: &[(&str, &str)]) -> (bool, String) {
    let out = tandem_testkit::process::output_within(
        std::process::Command::new(tool).args(["-i", iqn, url]).envs(env.iter().copied()),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The value of `key = value` in a host's `chap` file.
fn chap_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .to_string()
}

#[test]
fn iscsi_initiators_reach_only_their_hosts_volumes_with_chap_when_the_host_has_it() {
    require_tools(&["iscsi-ls", "iscsi-inq", "qemu-io"]);
    let c = Cluster::up(3);
    c.agreed_leader(&[1, 2, 3], Duration::from_secs(20));
    for v in ["v1", "v2"] {
        tandem_testkit::create_served_volume(&c, v, "16M");
    }
    c.admin(&["host", "add", "h1", "--site", "local", "--iqn", IQN1]);
    c.admin(&["host", "add", "h2", "--site", "local", "--iqn", IQN2]);
    c.admin(&["host", "connect", "h1", "v1"]);
    c.admin(&["host", "connect", "h2", "v2"]);
    let portals: Vec<String> = (1..=3).map(|id| c.iscsi_addr(id).to_string()).collect();
    let lun = |portal: &str, volume: &str| format!("iscsi://{portal}/{}/0", target(volume));

    // A host's initiator discovers and logs in to its own volume only, through every node; an
    // initiator of no host is anonymous, which the `open` policy lets reach everything.
    for portal in &portals {
        let (ok, listed) = libiscsi("iscsi-ls", IQN1, &format!("iscsi://{portal}"), &[]);
        assert!(ok && listed.contains(&target("v1")) && !listed.contains(&target("v2")), "{portal}: {listed}");
        let (ok, listed) = libiscsi("iscsi-ls", STRANGER, &format!("iscsi://{portal}"), &[]);
        assert!(ok && listed.contains(&target("v1")) && listed.contains(&target("v2")), "{portal}: {listed}");
        let (ok, text) = libiscsi("iscsi-inq", IQN1, &lun(portal, "v1"), &[]);
        assert!(ok, "h1 inquiry of v1 via {portal}: {text}");
        let (ok, text) = libiscsi("iscsi-inq", IQN1, &lun(portal, "v2"), &[]);
        assert!(!ok && text.to_lowercase().contains("authorization"), "h1 logged in to v2 via {portal}: {text}");
    }

    // CHAP, mutual: h1's initiator must prove its secret, and the target proves its own.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("h1");
    c.admin(&["host", "credentials", "h1", "--out", out.to_str().expect("utf-8"), "--mutual-chap"]);
    let chap = std::fs::read_to_string(out.join("chap")).expect("chap file");
    let secret = chap_value(&chap, "node.session.auth.password");
    let target_user = chap_value(&chap, "node.session.auth.username_in");
    let target_secret = chap_value(&chap, "node.session.auth.password_in");
    let mutual = [
        ("LIBISCSI_CHAP_TARGET_USERNAME", target_user.as_str()),
        ("LIBISCSI_CHAP_TARGET_PASSWORD", target_secret.as_str()),
    ];
    let with = |portal: &str, secret: &str| format!("iscsi://h1%{secret}@{portal}/{}/0", target("v1"));
    for portal in &portals {
        let (ok, text) = libiscsi("iscsi-inq", IQN1, &lun(portal, "v1"), &[]);
        assert!(!ok, "h1 logged in without CHAP via {portal}: {text}");
        let (ok, text) = libiscsi("iscsi-inq", IQN1, &with(portal, "a-wrong-secret-0"), &[]);
        assert!(!ok, "h1 logged in with a wrong secret via {portal}: {text}");
        let (ok, text) = libiscsi("iscsi-inq", IQN1, &with(portal, &secret), &mutual);
        assert!(ok, "h1 with mutual CHAP via {portal}: {text}");
        let wrong_target = [mutual[0], ("LIBISCSI_CHAP_TARGET_PASSWORD", "not-the-target-secret")];
        let (ok, text) = libiscsi("iscsi-inq", IQN1, &with(portal, &secret), &wrong_target);
        assert!(!ok, "h1 accepted a target with the wrong secret via {portal}: {text}");
    }
    // The secrets are never shown, logged or stored in clear.
    let listing = c.admin(&["host", "list", "--json"]);
    assert!(listing.contains("\"chap\": \"mutual\""), "{listing}");
    for s in [&secret, &target_secret] {
        assert!(!listing.contains(s.as_str()), "a listing shows a CHAP secret");
        for id in 1..=3 {
            let log = std::fs::read_to_string(c.log_path(id)).unwrap_or_default();
            assert!(!log.contains(s.as_str()), "node {id}'s log holds a CHAP secret");
            assert!(!tree_contains(&c.data_dir(id), s.as_bytes()), "node {id}'s data dir holds a CHAP secret in clear");
        }
    }

    // A session ends when its host loses the volume.
    let portal = &portals[2];
    let port: u16 = c.iscsi_addr(3).port();
    let opts = format!(
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={portal},file.target={},file.lun=0,file.initiator-name={IQN2}",
        target("v2")
    );
    let mut session = qemu_io_session(&["--image-opts", &opts]);
    tandem_testkit::wait_for("h2's iSCSI session to be up", Duration::from_secs(30), || {
        (established(port) == 1).then_some(())
    });
    c.admin(&["host", "disconnect", "h2", "v2"]);
    tandem_testkit::wait_for("the node to end h2's session", REVOKE_BOUND, || (established(port) == 0).then_some(()));
    let _ = session.kill();
    let _ = session.wait();
    let (ok, text) = libiscsi("iscsi-inq", IQN2, &lun(portal, "v2"), &[]);
    assert!(!ok, "h2 logged in to v2 after the disconnect: {text}");

    // tls-required: an initiator of no host is refused, and so is a host without CHAP.
    c.admin(&["host", "connect", "h2", "v2"]);
    c.admin(&["setting", "set", "access", "tls-required"]);
    tandem_testkit::wait_for("every node to refuse strangers", Duration::from_secs(10), || {
        portals.iter().all(|p| !libiscsi("iscsi-ls", STRANGER, &format!("iscsi://{p}"), &[]).0).then_some(())
    });
    for portal in &portals {
        let (ok, text) = libiscsi("iscsi-inq", STRANGER, &lun(portal, "v1"), &[]);
        assert!(!ok, "a stranger logged in via {portal}: {text}");
        let (ok, text) = libiscsi("iscsi-inq", IQN2, &lun(portal, "v2"), &[]);
        assert!(!ok, "h2 without CHAP logged in under tls-required via {portal}: {text}");
        let (ok, text) = libiscsi("iscsi-inq", IQN1, &with(portal, &secret), &mutual);
        assert!(ok, "h1 with CHAP under tls-required via {portal}: {text}");
    }
}

/// Whether any file under `dir` holds `needle`.
fn tree_contains(dir: &std::path::Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            tree_contains(&path, needle)
        } else {
            std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        }
    })
}
