//! The benchmarks' throwaway local Tandem cluster: the test kit's [`Cluster`] (`tandem up
//! --detach` of this very binary in a fresh temporary dir, `tandem down` when the benchmark
//! ends, even when it fails or panics: the cluster's `Drop`), and the HTTP calls the
//! benchmarks make of it: find the leader, create a volume and wait until its primary serves
//! it, read its record. The kit's verbs block; they run here under `block_in_place`, so the
//! runtime's other tasks (the failover's path-map watcher) go on meanwhile.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::Method;
use tandem_client::{config_path, Api, PROBE_TIMEOUT};
use tandem_node::api::{ClusterView, VolumeRequest, VolumeView};
use tandem_node::config::ClusterConfig;
use tandem_testkit::Cluster;
use tandem_types::NodeId;

/// Finding the leader right after `up` (it has one by then) or between runs.
const LEADER_WAIT: Duration = Duration::from_secs(15);
/// A new volume's primary opens its members and starts serving within a few seconds.
const SERVE_WAIT: Duration = Duration::from_secs(60);

pub struct BenchCluster {
    cluster: Cluster,
    api_addrs: Vec<SocketAddr>,
}

impl BenchCluster {
    pub async fn start(nodes: u32) -> anyhow::Result<BenchCluster> {
        BenchCluster::start_with(nodes, None).await
    }

    /// A cluster whose cluster.toml is edited by `edit` before its nodes serve (the kit restarts
    /// them on the edited file).
    pub async fn start_with(nodes: u32, edit: Option<&dyn Fn(&str) -> String>) -> anyhow::Result<BenchCluster> {
        let exe = std::env::current_exe().context("cannot find the tandem executable")?;
        let cluster = tokio::task::block_in_place(|| {
            let builder =
                Cluster::builder().nodes(nodes).exe(exe).prefix("tandem-bench-").without_turn().log_level_from_env();
            match edit {
                Some(edit) => builder.edit_config(edit).start(),
                None => builder.start(),
            }
        })
        .with_context(|| format!("cannot start a {nodes}-node Tandem cluster"))?;
        // From here on the cluster's `Drop` stops the nodes if anything fails.
        let cfg = ClusterConfig::load(&config_path(cluster.path()))?;
        let api_addrs = cfg.nodes.iter().map(|n| n.api_addr).collect();
        Ok(BenchCluster { cluster, api_addrs })
    }

    pub fn dir(&self) -> &Path {
        self.cluster.path()
    }

    /// The admin's API token of this cluster.
    pub fn token(&self) -> Option<String> {
        self.cluster.admin_token()
    }

    /// A client of the node API at `addr`, with the admin's token.
    pub fn api(&self, addr: impl std::fmt::Display) -> Api {
        Api::new(&addr.to_string()).with_token(self.token())
    }

    /// The leader's API address, as the nodes report it.
    pub async fn leader_api(&self) -> anyhow::Result<SocketAddr> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let mut last_error = None;
            for addr in &self.api_addrs {
                let api = self.api(addr).with_timeout(PROBE_TIMEOUT);
                match api.get::<ClusterView>("/v1/cluster").await {
                    Ok(view) => {
                        let leader = view
                            .raft
                            .leader
                            .and_then(|id| view.nodes.iter().find(|n| n.record.id == id).map(|n| n.record.api_addr));
                        if let Some(leader) = leader {
                            return Ok(leader);
                        }
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let why = last_error.map(|e| format!(": {e:#}")).unwrap_or_default();
                bail!("the Tandem cluster has no leader within {LEADER_WAIT:?}{why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader's id and API address, as the nodes report it.
    pub async fn leader(&self) -> anyhow::Result<(NodeId, SocketAddr)> {
        let addr = self.leader_api().await?;
        let id = self
            .node_apis()?
            .into_iter()
            .find(|(_, a)| *a == addr)
            .map(|(id, _)| id)
            .ok_or_else(|| anyhow::anyhow!("the leader's API {addr} is not in cluster.toml"))?;
        Ok((id, addr))
    }

    /// Node `id`'s process id.
    pub fn pid(&self, id: NodeId) -> anyhow::Result<i32> {
        self.cluster.try_pid(id.get()).with_context(|| format!("node {id}'s pid"))
    }

    /// `tandem node add --id ID --cluster DIR`: makes node `id` (certificate, config entry,
    /// process) and registers it with the leader; it catches up on its own afterwards.
    pub async fn add_node(&self, id: NodeId) -> anyhow::Result<()> {
        let added = tokio::task::block_in_place(|| self.cluster.try_add_node(Some(id.get())))
            .with_context(|| format!("cannot add node {id}"))?;
        if added != id.get() {
            bail!("`tandem node add --id {id}` added node {added}");
        }
        Ok(())
    }

    /// `tandem node remove ID --cluster DIR`: the leader drops the node and its process stops.
    pub async fn remove_node(&self, id: NodeId) -> anyhow::Result<()> {
        tokio::task::block_in_place(|| self.cluster.try_remove_node(id.get()))
            .with_context(|| format!("cannot remove node {id}"))
    }

    /// The cluster's `cluster.toml`: each node's id and addresses.
    pub fn config(&self) -> anyhow::Result<ClusterConfig> {
        Ok(ClusterConfig::load(&config_path(self.cluster.path()))?)
    }

    /// Every node's id with its API address, in the config's order.
    pub fn node_apis(&self) -> anyhow::Result<Vec<(NodeId, SocketAddr)>> {
        Ok(self.config()?.nodes.iter().map(|n| (n.id, n.api_addr)).collect())
    }

    /// Creates a volume in the default dataset (a copy on every node) through any node that
    /// answers, then waits until its primary says it serves it (`GET /v1/local/volumes`).
    pub async fn create_volume(&self, name: &str, size_bytes: u64) -> anyhow::Result<VolumeView> {
        let req = VolumeRequest { name: name.to_string(), size_bytes, dataset: None };
        let mut last_error = None;
        let mut created = None;
        for addr in &self.api_addrs {
            match self.api(addr).request::<_, VolumeView>(Method::POST, "/v1/volumes", Some(&req)).await {
                Ok(v) => {
                    created = Some(v);
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        let Some(created) = created else {
            let why = last_error.map(|e| format!(": {e:#}")).unwrap_or_default();
            bail!("no node created volume {name}{why}");
        };
        let deadline = tokio::time::Instant::now() + SERVE_WAIT;
        loop {
            let v = self.volume(name, None).await?;
            let primary_api = self.node_apis()?.into_iter().find(|(id, _)| *id == v.primary).map(|(_, a)| a);
            if let Some(api) = primary_api {
                let local: anyhow::Result<serde_json::Value> =
                    self.api(api).with_timeout(PROBE_TIMEOUT).get("/v1/local/volumes").await;
                let serving = local.ok().and_then(|l| {
                    l["volumes"]
                        .as_array()
                        .map(|a| a.iter().any(|x| x["id"] == created.id.get() && x["serving"] == true))
                });
                if serving == Some(true) {
                    return Ok(v);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("volume {name}'s primary (node {}) does not serve it within {SERVE_WAIT:?}", v.primary);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The volume's record (primary, ISR, epoch) as the first answering node holds it, asking
    /// every node but `except` (a node known to be down).
    pub async fn volume(&self, name: &str, except: Option<NodeId>) -> anyhow::Result<VolumeView> {
        let mut last_error = None;
        for (id, addr) in self.node_apis()? {
            if Some(id) == except {
                continue;
            }
            match self.api(addr).with_timeout(PROBE_TIMEOUT).get(&format!("/v1/volumes/{name}")).await {
                Ok(v) => return Ok(v),
                Err(e) => last_error = Some(e),
            }
        }
        let why = last_error.map(|e| format!(": {e:#}")).unwrap_or_default();
        bail!("no node answers for volume {name}{why}")
    }

    /// `kill -9` of node `id`'s process, returning as soon as the signal is sent: the crash a
    /// failover benchmark times from.
    pub fn kill9(&self, id: NodeId) -> anyhow::Result<()> {
        self.cluster.try_sigkill(id.get()).with_context(|| format!("cannot kill node {id}"))?;
        Ok(())
    }

    /// `tandem up --detach --dir DIR`, which starts the nodes that are not running and waits
    /// for their APIs and a leader.
    pub async fn restart_missing(&self) -> anyhow::Result<()> {
        tokio::task::block_in_place(|| self.cluster.try_restart_missing()).context("cannot restart the stopped nodes")
    }

    /// Runs `tandem down` and reports how it went; dropping the cluster does the same silently.
    pub async fn stop(self) -> anyhow::Result<()> {
        tokio::task::block_in_place(|| self.cluster.stop()).context("cannot stop the Tandem cluster")
    }
}
