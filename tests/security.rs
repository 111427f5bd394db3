//! Who may connect, against real `tandem` processes: the admin API's credentials and roles
//! (every write endpoint refuses no credential with 401 and a host's with 403, accepts the
//! admin's, and a refused request changes nothing; a host reads its own path map and nobody
//! else's; new credentials revoke the old; an audit line names who wrote).

use reqwest::blocking::RequestBuilder;
use reqwest::Method;
use serde_json::{json, Value};
use tandem_testkit::{http, http_as, Cluster};

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

/// Issues credentials to `host` into a temp dir and returns its token.
fn host_token(c: &Cluster, host: &str, dir: &std::path::Path) -> String {
    let out = dir.join(host);
    c.admin(&["host", "credentials", host, "--out", out.to_str().expect("utf-8")]);
    std::fs::read_to_string(out.join("token")).expect("token").trim().to_string()
}

#[test]
fn the_api_refuses_requests_without_the_right_credential_and_changes_nothing() {
    let c = Cluster::up(3);
    c.agreed_leader(&[1, 2, 3], std::time::Duration::from_secs(20));
    for v in ["v1", "v2"] {
        c.admin(&["volume", "create", v, "--size", "4M"]);
    }
    for h in ["h1", "h2"] {
        c.admin(&["host", "add", h, "--site", "local"]);
    }
    c.admin(&["host", "connect", "h1", "v1"]);
    c.admin(&["host", "connect", "h2", "v2"]);
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
    tandem_testkit::wait_for("the old token to be refused", std::time::Duration::from_secs(10), || {
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
