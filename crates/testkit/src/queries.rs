//! What tests ask a running cluster: a node's view and Raft leader, settings, volume records
//! and each node's own copy, the agreed leader, and "every replica identical". Each query
//! answers `None` when a node does not (yet) answer; the `wait_*` forms poll with a deadline.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;
pub use crate::http::http;
use crate::wait::{poll, POLL_INTERVAL};
use crate::Error;

/// A probe of one node gives up after this long: a stopped node must not stall a poll.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A created volume's primary serves it within this long.
pub const SERVE_WAIT: Duration = Duration::from_secs(30);

/// An unlabelled sample of Prometheus text (`name value`), if the text has it.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// `GET url` with [`PROBE_TIMEOUT`] and the cluster's admin token: the JSON of a successful
/// answer, else `None`.
pub fn probe(c: &Cluster, url: &str) -> Option<Value> {
    let resp = c.http().get(url).timeout(PROBE_TIMEOUT).send().ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().ok()
}

/// The node ids of a JSON array (an ISR, voters); panics on anything else.
pub fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array of ids: {v}"))
        .iter()
        .map(|i| i.as_u64().unwrap_or_else(|| panic!("not an id: {i} in {v}")))
        .collect()
}

impl Cluster {
    /// The admin's API token `tandem up` wrote into the cluster's dir.
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.path().join("admin.token")).ok().map(|t| t.trim().to_string())
    }

    /// An HTTP client that sends the admin's token.
    pub fn http(&self) -> reqwest::blocking::Client {
        crate::http::http_as(self.admin_token().as_deref())
    }

    /// An unlabelled sample of node `id`'s `GET /metrics`, if it answers and exports it.
    pub fn metric(&self, id: u64, name: &str) -> Option<f64> {
        let text =
            self.http().get(format!("{}/metrics", self.api(id))).timeout(PROBE_TIMEOUT).send().ok()?.text().ok()?;
        metric_value(&text, name)
    }

    /// `GET /v1/cluster` of one node; `None` if it does not answer.
    pub fn view(&self, id: u64) -> Option<Value> {
        probe(self, &format!("{}/v1/cluster", self.api(id)))
    }

    pub fn status_json(&self, endpoint_node: u64) -> Value {
        let out =
            self.tandem(&["status", "--json", "--endpoint", &self.api(endpoint_node), "--cluster", self.path_str()]);
        serde_json::from_str(&out).expect("status --json is JSON")
    }

    /// Waits until every given node reports the same leader, and returns it.
    pub fn try_agreed_leader(&self, nodes: &[u64], timeout: Duration) -> Result<u64, Error> {
        poll("all nodes to agree on a leader", timeout, || {
            let leaders: Vec<Option<u64>> =
                nodes.iter().map(|id| self.view(*id).and_then(|v| v["raft"]["leader"].as_u64())).collect();
            let first = leaders[0]?;
            leaders.iter().all(|l| *l == Some(first)).then_some(first)
        })
    }

    pub fn agreed_leader(&self, nodes: &[u64], timeout: Duration) -> u64 {
        self.try_agreed_leader(nodes, timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn put_setting(&self, via: u64, key: &str, value: &str) {
        let resp = self
            .http()
            .put(format!("{}/v1/settings/{key}", self.api(via)))
            .json(&serde_json::json!({ "value": value }))
            .send()
            .expect("put");
        assert!(
            resp.status().is_success(),
            "put {key} via node {via}: {} {}",
            resp.status(),
            resp.text().unwrap_or_default()
        );
    }

    pub fn get_setting(&self, via: u64, key: &str) -> Option<String> {
        let resp = self.http().get(format!("{}/v1/settings/{key}", self.api(via))).send().ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let v: Value = resp.json().ok()?;
        v["value"].as_str().map(str::to_string)
    }
}

/// The volume's record as `tandem volume list --json` shows it through node `via`.
pub fn volume(c: &Cluster, via: u64, name: &str) -> Option<Value> {
    let out = c.try_tandem(&["volume", "list", "--json", "--endpoint", &c.api(via), "--cluster", c.path_str()]).ok()?;
    let list: Value = serde_json::from_str(&out).ok()?;
    list.as_array()?.iter().find(|v| v["name"] == name).cloned()
}

/// This node's own copy of `name`, from `GET /v1/local/volumes` (never forwarded).
pub fn local_copy(c: &Cluster, id: u64, name: &str) -> Option<Value> {
    let v = probe(c, &format!("{}/v1/local/volumes", c.api(id)))?;
    v["volumes"].as_array()?.iter().find(|x| x["name"] == name).cloned()
}

/// The digest node `id` reports of its copy of `name`.
pub fn digest(c: &Cluster, id: u64, name: &str) -> Option<String> {
    local_copy(c, id, name).and_then(|v| v["digest"].as_str().map(str::to_string))
}

/// Creates a volume (`tandem volume create` against the cluster) and waits until its primary
/// serves it; its record.
pub fn try_create_served_volume(c: &Cluster, name: &str, size: &str) -> Result<Value, Error> {
    try_create_served_volume_in(c, name, size, None)
}

/// [`try_create_served_volume`] in dataset `dataset` (the default one: a replica on every node).
pub fn try_create_served_volume_in(c: &Cluster, name: &str, size: &str, dataset: Option<&str>) -> Result<Value, Error> {
    let mut args = vec!["volume", "create", name, "--size", size, "--cluster", c.path_str()];
    if let Some(d) = dataset {
        args.extend(["--dataset", d]);
    }
    c.try_tandem(&args)?;
    poll(&format!("{name} to be served"), SERVE_WAIT, || {
        let v = volume(c, 1, name)?;
        let primary = v["primary"].as_u64()?;
        local_copy(c, primary, name).filter(|l| l["serving"] == true).map(|_| v)
    })
}

pub fn create_served_volume(c: &Cluster, name: &str, size: &str) -> Value {
    try_create_served_volume(c, name, size).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until the volume's ISR, seen through `via`, is exactly `want` and every member's copy
/// has one digest; the record and the digest. On a timeout it shows the volume as last seen
/// (ISR, resync progress).
pub fn wait_identical(c: &Cluster, via: u64, name: &str, want: &[u64], timeout: Duration) -> (Value, String) {
    let mut last = None;
    let deadline = Instant::now() + timeout;
    loop {
        let found = volume(c, via, name).and_then(|v| {
            last = Some(v.clone());
            if ids(&v["isr"]) != want {
                return None;
            }
            let digests: Vec<String> = want.iter().map(|&n| digest(c, n, name)).collect::<Option<_>>()?;
            (!digests[0].is_empty() && digests.iter().all(|d| *d == digests[0])).then(|| (v, digests[0].clone()))
        });
        if let Some(found) = found {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {name}: ISR {want:?} with identical copies; last seen: {}",
            last.as_ref().map(Value::to_string).unwrap_or_default()
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}
