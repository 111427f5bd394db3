//! Admin commands: a small client of the HTTP API, and how its answers are shown.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use reqwest::Method;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tandem_node::api::{
    ClusterView, DatasetRequest, DatasetView, NodeView, SettingBody, TransportView, VolumeRequest, VolumeView,
};
use tandem_node::config::ClusterConfig;
use tandem_transport::{Layer, TransportKind};
use tandem_types::NodeId;

use crate::{DatasetCmd, SettingCmd, Target, TransportCmd, VolumeCmd};

/// A request to a node that does not answer within this long counts that node as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Writes may wait for an election or for a new node to catch up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

pub const DEFAULT_DIR: &str = "tandem-data";

pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("cluster.toml")
}

/// One node's API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("an HTTP client without TLS always builds")
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// A node answered with an error status; `message` is its `{"error": ...}` text. Callers that
/// retry find it with `anyhow::Error::downcast_ref` to tell a refusal (4xx) from a node in
/// trouble (5xx).
#[derive(Debug)]
pub struct StatusError {
    pub status: reqwest::StatusCode,
    pub message: String,
}

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for StatusError {}

impl Api {
    pub fn new(base: &str) -> Api {
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", base.trim_end_matches('/'))
        };
        Api { base, http: http_client(REQUEST_TIMEOUT) }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Api {
        self.http = http_client(timeout);
        self
    }

    /// Finds a node that answers: `--endpoint`, else each node of the `--cluster` dir's config.
    pub async fn find(target: &Target) -> anyhow::Result<Api> {
        if let Some(e) = &target.endpoint {
            return Ok(Api::new(e));
        }
        let dir = target.cluster.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        let path = config_path(&dir);
        if !path.exists() {
            bail!(
                "no cluster at {}: give --endpoint URL, or --cluster DIR of a cluster made by `tandem up`",
                dir.display()
            );
        }
        let cfg = ClusterConfig::load(&path)?;
        let mut errors = Vec::new();
        for n in &cfg.nodes {
            let api = Api::new(&n.api_addr.to_string()).with_timeout(PROBE_TIMEOUT);
            match api.get::<ClusterView>("/v1/cluster").await {
                Ok(_) => return Ok(Api::new(&n.api_addr.to_string())),
                Err(e) => errors.push(format!("node {}: {e:#}", n.id)),
            }
        }
        bail!("no node of the cluster in {} answers:\n  {}", dir.display(), errors.join("\n  "))
    }

    pub async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        Ok(self.request_with_status(method, path, body).await?.1)
    }

    /// [`Api::request`], also returning the (successful) HTTP status.
    pub async fn request_with_status<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<(reqwest::StatusCode, T)> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.with_context(|| format!("{method} {url}: reading the answer"))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(StatusError { status, message }).with_context(|| format!("{method} {url}"));
        }
        let answer = serde_json::from_slice(&bytes).with_context(|| format!("{method} {url}: unexpected answer"))?;
        Ok((status, answer))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.request::<(), T>(Method::GET, path, None).await
    }
}

/// One node's line in `tandem status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub node: NodeView,
    pub up: bool,
    /// The node's own Raft role (`leader`, `follower`, ...), or `unknown` when it is down.
    pub role: String,
    pub term: Option<u64>,
    /// The leader as this node sees it.
    pub leader: Option<NodeId>,
    pub applied_index: Option<u64>,
    /// The network layers the node uses now for data and control traffic.
    pub transport_data: Option<TransportKind>,
    pub transport_control: Option<TransportKind>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub cluster_name: String,
    pub answered_by: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub nodes: Vec<NodeStatus>,
    /// Every volume, as the answering node's map holds it.
    pub volumes: Vec<VolumeView>,
}

pub async fn status_report(api: &Api) -> anyhow::Result<StatusReport> {
    let view: ClusterView = api.get("/v1/cluster").await?;
    let probes = view.nodes.iter().map(|n| {
        let api = Api::new(&n.record.api_addr.to_string()).with_timeout(PROBE_TIMEOUT);
        async move {
            let view = api.get::<ClusterView>("/v1/cluster").await?;
            let transport = api.get::<TransportView>("/v1/transport").await?;
            anyhow::Ok((view, transport))
        }
    });
    let answers = futures::future::join_all(probes).await;
    let nodes = view
        .nodes
        .iter()
        .zip(answers)
        .map(|(n, answer)| match answer {
            Ok((v, t)) => NodeStatus {
                node: n.clone(),
                up: true,
                role: v.raft.role.to_string(),
                term: Some(v.raft.term),
                leader: v.raft.leader,
                applied_index: v.raft.applied_index,
                transport_data: Some(t.data),
                transport_control: Some(t.control),
                error: None,
            },
            Err(e) => NodeStatus {
                node: n.clone(),
                up: false,
                role: "unknown".into(),
                term: None,
                leader: None,
                applied_index: None,
                transport_data: None,
                transport_control: None,
                error: Some(format!("{e:#}")),
            },
        })
        .collect();
    Ok(StatusReport {
        cluster_name: view.cluster_name,
        answered_by: view.node_id,
        leader: view.raft.leader,
        term: view.raft.term,
        last_log_index: view.raft.last_log_index,
        applied_index: view.raft.applied_index,
        voters: view.raft.voters,
        learners: view.raft.learners,
        nodes,
        volumes: view.volumes,
    })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Prints rows as left-aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{:w$}", c, w = widths[i])).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// A node's NBD addresses (target ports) for a table cell, `nbd_addr` first.
fn nbd_addrs(n: &tandem_meta::NodeRecord) -> String {
    n.targets().iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

pub fn print_status(r: &StatusReport) {
    println!(
        "cluster {}  leader {}  term {}  last log {}  applied {}  (answered by node {})",
        r.cluster_name,
        opt(r.leader),
        r.term,
        opt(r.last_log_index),
        opt(r.applied_index),
        r.answered_by
    );
    let rows: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.record.id.to_string(),
                n.node.record.site.clone(),
                n.role.clone(),
                n.node.membership.clone(),
                if n.up { "up".into() } else { "down".into() },
                n.node.record.api_addr.to_string(),
                nbd_addrs(&n.node.record),
                n.node.record.raft_addr.to_string(),
                match (n.transport_data, n.transport_control) {
                    (Some(d), Some(c)) => format!("data {d}, control {c}"),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    print_table(&["ID", "SITE", "ROLE", "MEMBER", "STATE", "API", "NBD", "RAFT", "TRANSPORT"], &rows);
    println!();
    if r.volumes.is_empty() {
        println!("no volumes");
    } else {
        print_volumes(&r.volumes);
    }
}

/// Parses a size: plain bytes, or a number with a suffix K, M, G or T (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "size {s:?} is not a number of bytes with an optional suffix K, M, G or T (powers of 1024), e.g. 64M or 1G"
        )
    };
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?} is too large"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

/// A size for people: exact with the largest suffix that divides it (`64M`, `12K`, `5000`),
/// else one decimal of the largest unit it reaches (`1.5G`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    for (shift, unit) in UNITS {
        if bytes >= 1 << shift {
            return format!("{:.1}{unit}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    bytes.to_string()
}

fn ids(list: &[NodeId]) -> String {
    list.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
}

pub fn print_volumes(volumes: &[VolumeView]) {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let resync = if v.resync.is_empty() {
                "-".to_string()
            } else {
                v.resync
                    .iter()
                    .map(|r| format!("{}:{}/{}", r.node, format_size(r.done_bytes), format_size(r.total_bytes)))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            vec![
                v.name.clone(),
                v.id.to_string(),
                format_size(v.size_bytes),
                v.dataset.clone(),
                v.primary.to_string(),
                ids(&v.isr),
                ids(&v.replicas),
                v.epoch.to_string(),
                resync,
            ]
        })
        .collect();
    print_table(&["VOLUME", "ID", "SIZE", "DATASET", "PRIMARY", "ISR", "REPLICAS", "EPOCH", "RESYNC"], &rows);
}

pub fn created(status: reqwest::StatusCode) -> &'static str {
    if status == reqwest::StatusCode::CREATED {
        "created"
    } else {
        "already exists as requested"
    }
}

pub async fn dataset(target: &Target, cmd: DatasetCmd) -> anyhow::Result<()> {
    let api = Api::find(target).await?;
    match cmd {
        DatasetCmd::Create { name, replicas, preferred_site } => {
            let req = DatasetRequest { name, replicas, preferred_site };
            let (status, d): (_, DatasetView) =
                api.request_with_status(Method::POST, "/v1/datasets", Some(&req)).await?;
            println!(
                "dataset {} {}: replicas {}, preferred site {}",
                d.record.name,
                created(status),
                ids(&d.record.replicas),
                d.record.preferred_site.as_deref().unwrap_or("none")
            );
        }
        DatasetCmd::List { json } => {
            let all: Vec<DatasetView> = api.get("/v1/datasets").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|d| {
                        vec![
                            d.record.name.clone(),
                            ids(&d.record.replicas),
                            d.record.preferred_site.clone().unwrap_or_else(|| "-".into()),
                            d.volumes.join(","),
                        ]
                    })
                    .collect();
                print_table(&["DATASET", "REPLICAS", "PREFERRED-SITE", "VOLUMES"], &rows);
            }
        }
        DatasetCmd::Delete { name } => {
            let _: serde_json::Value =
                api.request::<(), _>(Method::DELETE, &format!("/v1/datasets/{name}"), None).await?;
            println!("dataset {name} deleted");
        }
    }
    Ok(())
}

pub async fn volume(target: &Target, cmd: VolumeCmd) -> anyhow::Result<()> {
    let api = Api::find(target).await?;
    match cmd {
        VolumeCmd::Create { name, size, dataset } => {
            let req = VolumeRequest { name, size_bytes: size, dataset };
            let (status, v): (_, VolumeView) = api.request_with_status(Method::POST, "/v1/volumes", Some(&req)).await?;
            println!(
                "volume {} {}: id {}, {}, dataset {}, primary {}, replicas {}",
                v.name,
                created(status),
                v.id,
                format_size(v.size_bytes),
                v.dataset,
                v.primary,
                ids(&v.replicas)
            );
        }
        VolumeCmd::List { json } => {
            let all: Vec<VolumeView> = api.get("/v1/volumes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_volumes(&all);
            }
        }
        VolumeCmd::Delete { name } => {
            let _: serde_json::Value =
                api.request::<(), _>(Method::DELETE, &format!("/v1/volumes/{name}"), None).await?;
            println!("volume {name} deleted");
        }
    }
    Ok(())
}

/// The status as the leader sees it when there is one (a node that just restarted may still
/// hold an old map), else as the answering node sees it.
pub async fn leader_status_report(api: &Api) -> anyhow::Result<StatusReport> {
    let report = status_report(api).await?;
    let leader_api = report
        .leader
        .filter(|l| *l != report.answered_by)
        .and_then(|l| report.nodes.iter().find(|n| n.node.record.id == l && n.up).map(|n| n.node.record.api_addr));
    match leader_api {
        Some(addr) => Ok(status_report(&Api::new(&addr.to_string())).await.unwrap_or(report)),
        None => Ok(report),
    }
}

pub async fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let api = Api::find(target).await?;
    let report = leader_status_report(&api).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    Ok(())
}

pub async fn node_list(target: &Target, json: bool) -> anyhow::Result<()> {
    let api = Api::find(target).await?;
    let nodes: Vec<NodeView> = api.get("/v1/nodes").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.record.id.to_string(),
                n.record.site.clone(),
                n.membership.clone(),
                n.record.api_addr.to_string(),
                nbd_addrs(&n.record),
                n.record.raft_addr.to_string(),
            ]
        })
        .collect();
    print_table(&["ID", "SITE", "MEMBER", "API", "NBD", "RAFT"], &rows);
    Ok(())
}

pub async fn setting(target: &Target, cmd: SettingCmd) -> anyhow::Result<()> {
    let api = Api::find(target).await?;
    match cmd {
        SettingCmd::Set { key, value } => {
            let _: serde_json::Value =
                api.request(Method::PUT, &format!("/v1/settings/{key}"), Some(&SettingBody { value })).await?;
        }
        SettingCmd::Get { key } => {
            let b: SettingBody = api.get(&format!("/v1/settings/{key}")).await?;
            println!("{}", b.value);
        }
        SettingCmd::Delete { key } => {
            let _: serde_json::Value =
                api.request::<(), _>(Method::DELETE, &format!("/v1/settings/{key}"), None).await?;
        }
        SettingCmd::List { json } => {
            let all: std::collections::BTreeMap<String, String> = api.get("/v1/settings").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let rows: Vec<Vec<String>> = all.into_iter().map(|(k, v)| vec![k, v]).collect();
                print_table(&["KEY", "VALUE"], &rows);
            }
        }
    }
    Ok(())
}

/// Waits until `api` reports a leader; returns the report.
pub async fn wait_for_leader(api: &Api, timeout: Duration) -> anyhow::Result<StatusReport> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match leader_status_report(api).await {
            Ok(r) if r.leader == Some(r.answered_by) => return Ok(r),
            Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(_) => return Err(anyhow!("no leader elected within {timeout:?}")),
            Err(e) => return Err(e.context(format!("no leader elected within {timeout:?}"))),
        }
    }
}

/// How long `transport set` waits for every node to report the new layer.
const SWITCH_WAIT: Duration = Duration::from_secs(15);

async fn transport_views(api: &Api) -> anyhow::Result<Vec<(NodeId, anyhow::Result<TransportView>)>> {
    let report = leader_status_report(api).await?;
    let probes = report.nodes.iter().map(|n| {
        let api = Api::new(&n.node.record.api_addr.to_string()).with_timeout(PROBE_TIMEOUT);
        let id = n.node.record.id;
        async move { (id, api.get::<TransportView>("/v1/transport").await) }
    });
    Ok(futures::future::join_all(probes).await)
}

pub async fn transport(target: &Target, cmd: TransportCmd) -> anyhow::Result<()> {
    let api = Api::find(target).await?;
    match cmd {
        TransportCmd::Set { transport, layer } => {
            let body = serde_json::json!({ "transport": transport, "layer": layer });
            let _: serde_json::Value = api.request(Method::PUT, "/v1/transport", Some(&body)).await?;
            // The change is committed; wait until every reachable node has moved to it.
            let deadline = tokio::time::Instant::now() + SWITCH_WAIT;
            loop {
                let views = transport_views(&api).await?;
                let lagging: Vec<NodeId> = views
                    .iter()
                    .filter_map(|(id, v)| match v {
                        Ok(v) if (if layer == Layer::Data { v.data } else { v.control }) == transport => None,
                        Ok(_) => Some(*id),
                        Err(_) => None, // down: it follows the map when it comes back
                    })
                    .collect();
                if lagging.is_empty() {
                    println!("{layer} layer now on {transport} on every reachable node");
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("the change is committed, but nodes {lagging:?} did not report {transport} within {SWITCH_WAIT:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        TransportCmd::Status { json } => {
            let views = transport_views(&api).await?;
            if json {
                let ok: Vec<&TransportView> = views.iter().filter_map(|(_, v)| v.as_ref().ok()).collect();
                println!("{}", serde_json::to_string_pretty(&ok)?);
                return Ok(());
            }
            let mut rows = Vec::new();
            for (id, v) in &views {
                match v {
                    Ok(v) => {
                        for l in &v.links {
                            rows.push(vec![
                                id.to_string(),
                                l.peer.to_string(),
                                l.channel.to_string(),
                                l.transport.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                                l.pipes.to_string(),
                                l.pending.to_string(),
                                l.queue_depth.to_string(),
                                l.bytes_sent.to_string(),
                                l.messages_sent.to_string(),
                                l.reconnects.to_string(),
                                l.switches.to_string(),
                            ]);
                        }
                    }
                    Err(e) => rows.push(vec![id.to_string(), format!("down: {e:#}")]),
                }
            }
            let header = [
                "NODE",
                "PEER",
                "CHANNEL",
                "TRANSPORT",
                "PIPES",
                "PENDING",
                "QUEUE",
                "BYTES",
                "MSGS",
                "RECONNECTS",
                "SWITCHES",
            ];
            print_table(&header, &rows);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_the_rest() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert_eq!(parse_size("8k"), Ok(8192));
        for bad in ["", "M", "12Q", "1.5G", "-1", "64MB", "1 G", "0x10", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_size("12Q").unwrap_err().contains("K, M, G or T"));
    }

    #[test]
    fn sizes_format_exactly_when_they_can() {
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(12288), "12K");
        assert_eq!(format_size(5000), "4.9K");
        assert_eq!(format_size(3 << 29), "1536M");
        assert_eq!(format_size(100), "100");
        assert_eq!(format_size(0), "0");
    }
}
