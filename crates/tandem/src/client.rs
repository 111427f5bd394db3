//! Admin commands: requests to the HTTP API (through `tandem-client`), and how the answers are
//! shown.

use std::time::Duration;

use anyhow::{anyhow, bail};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use tandem_client::{config_path, format_size, Api, PROBE_TIMEOUT};
use tandem_node::api::{
    ClusterView, DatasetRequest, DatasetView, NodeView, SettingBody, TransportView, VolumeRequest, VolumeView,
};
use tandem_node::config::ClusterConfig;
use tandem_types::NodeId;
use tandem_types::{Layer, TransportKind};

use crate::{DatasetCmd, SettingCmd, Target, TransportCmd, VolumeCmd};

/// Finds a node that answers: `--endpoint`, else each node of the `--cluster` dir's config.
pub async fn find_api(target: &Target) -> anyhow::Result<Api> {
    if let Some(e) = &target.endpoint {
        return target.api(e);
    }
    let dir = target.dir();
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
        let api = target.api(&n.api_addr.to_string())?;
        match api.clone().with_timeout(PROBE_TIMEOUT).get::<ClusterView>("/v1/cluster").await {
            Ok(_) => return Ok(api),
            // It answers, and a host's token may not read the cluster: the request it is for
            // says whether it may do that.
            Err(e) if e.downcast_ref::<tandem_client::StatusError>().is_some_and(|s| s.status.as_u16() == 403) => {
                return Ok(api)
            }
            Err(e) => errors.push(format!("node {}: {e:#}", n.id)),
        }
    }
    bail!("no node of the cluster in {} answers:\n  {}", dir.display(), errors.join("\n  "))
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
        let api = api.at(&n.record.api_addr.to_string()).with_timeout(PROBE_TIMEOUT);
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
fn nbd_addrs(n: &tandem_clustermap::NodeRecord) -> String {
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
                n.node.record.iscsi_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
                n.node.record.raft_addr.to_string(),
                match (n.transport_data, n.transport_control) {
                    (Some(d), Some(c)) => format!("data {d}, control {c}"),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    print_table(&["ID", "SITE", "ROLE", "MEMBER", "STATE", "API", "NBD", "ISCSI", "RAFT", "TRANSPORT"], &rows);
    println!();
    if r.volumes.is_empty() {
        println!("no volumes");
    } else {
        print_volumes(&r.volumes);
    }
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
    let api = find_api(target).await?;
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
    let api = find_api(target).await?;
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
        VolumeCmd::Clone { src, new } => crate::copy::made_from(target, &src, new, false).await?,
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
        Some(addr) => Ok(status_report(&api.at(&addr.to_string())).await.unwrap_or(report)),
        None => Ok(report),
    }
}

pub async fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let api = find_api(target).await?;
    let report = leader_status_report(&api).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    Ok(())
}

pub async fn node_list(target: &Target, json: bool) -> anyhow::Result<()> {
    let api = find_api(target).await?;
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
                n.record.iscsi_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
                n.record.raft_addr.to_string(),
            ]
        })
        .collect();
    print_table(&["ID", "SITE", "MEMBER", "API", "NBD", "ISCSI", "RAFT"], &rows);
    Ok(())
}

pub async fn setting(target: &Target, cmd: SettingCmd) -> anyhow::Result<()> {
    let api = find_api(target).await?;
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
        let api = api.at(&n.node.record.api_addr.to_string()).with_timeout(PROBE_TIMEOUT);
        let id = n.node.record.id;
        async move { (id, api.get::<TransportView>("/v1/transport").await) }
    });
    Ok(futures::future::join_all(probes).await)
}

pub async fn transport(target: &Target, cmd: TransportCmd) -> anyhow::Result<()> {
    let api = find_api(target).await?;
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

/// `tandem admin credentials`: minted from the secret file, or issued by the cluster.
pub async fn admin_credentials(target: &Target, name: &str, secret: Option<&std::path::Path>) -> anyhow::Result<()> {
    let token = match secret {
        Some(path) => {
            tandem_types::validate_name(name).map_err(|e| anyhow!("operator name {name:?} {e}"))?;
            let secret = tandem_node::security::ClusterSecret::load(path).map_err(|e| anyhow!(e))?;
            let principal = tandem_clustermap::Principal::Admin(name.to_string());
            secret.mint(&principal, &tandem_node::security::new_credential_id()).expect("an admin has a token")
        }
        None => {
            let api = find_api(target).await?;
            let req = tandem_node::host_api::AdminCredentialsRequest { name: name.to_string() };
            let c: tandem_node::host_api::AdminCredentials =
                api.request(Method::POST, "/v1/admin/credentials", Some(&req)).await?;
            c.token
        }
    };
    println!("{token}");
    Ok(())
}
