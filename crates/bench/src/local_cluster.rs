//! A throwaway local Tandem cluster for a benchmark: `tandem up --detach` of this very binary in
//! a fresh temporary dir, and `tandem down` when the benchmark ends, even when it fails (the
//! guard's `Drop`), and the verbs the benchmarks need: find the leader, create a volume and wait
//! until its primary serves it, read its record, `kill -9` a node, restart the missing nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use reqwest::Method;
use tandem_node::api::{ClusterView, VolumeRequest, VolumeView};
use tandem_node::config::ClusterConfig;
use tandem_types::NodeId;

use tandem_client::{config_path, Api, PROBE_TIMEOUT};

/// `up` itself waits up to a minute for the APIs and then for a leader.
const UP_WAIT: Duration = Duration::from_secs(120);
/// `down` gives each node 15 s after SIGTERM.
const DOWN_WAIT: Duration = Duration::from_secs(60);
/// Finding the leader right after `up` (it has one by then) or between runs.
const LEADER_WAIT: Duration = Duration::from_secs(15);
/// A new volume's primary opens its members and starts serving within a few seconds.
const SERVE_WAIT: Duration = Duration::from_secs(60);

pub struct LocalCluster {
    exe: PathBuf,
    /// Removed (with the nodes' data and logs) when the guard goes, after `down`.
    dir: tempfile::TempDir,
    api_addrs: Vec<SocketAddr>,
    stopped: bool,
}

impl LocalCluster {
    pub async fn start(nodes: u32) -> anyhow::Result<LocalCluster> {
        let exe = std::env::current_exe().context("cannot find the tandem executable")?;
        let dir = tempfile::Builder::new()
            .prefix("tandem-bench-")
            .tempdir()
            .context("cannot make a temporary dir for the Tandem cluster")?;
        // The guard exists before `up` runs, so that nodes of a half-started cluster are stopped.
        let mut cluster = LocalCluster { exe, dir, api_addrs: Vec::new(), stopped: false };
        let up = tokio::process::Command::new(&cluster.exe)
            .arg("up")
            .arg("--detach")
            .arg("--nodes")
            .arg(nodes.to_string())
            .arg("--dir")
            .arg(cluster.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(UP_WAIT, up)
            .await
            .map_err(|_| anyhow!("`tandem up` did not finish within {UP_WAIT:?}"))?
            .context("cannot run `tandem up`")?;
        if !out.status.success() {
            bail!(
                "`tandem up --detach --nodes {nodes} --dir {}` failed ({}):\n{}{}",
                cluster.dir.path().display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cfg = ClusterConfig::load(&config_path(cluster.dir.path()))?;
        cluster.api_addrs = cfg.nodes.iter().map(|n| n.api_addr).collect();
        Ok(cluster)
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The leader's API address, as the nodes report it.
    pub async fn leader_api(&self) -> anyhow::Result<SocketAddr> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let mut last_error = None;
            for addr in &self.api_addrs {
                let api = Api::new(&addr.to_string()).with_timeout(PROBE_TIMEOUT);
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

    /// The cluster's `cluster.toml`: each node's id and addresses.
    pub fn config(&self) -> anyhow::Result<ClusterConfig> {
        Ok(ClusterConfig::load(&config_path(self.dir.path()))?)
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
            match Api::new(&addr.to_string()).request::<_, VolumeView>(Method::POST, "/v1/volumes", Some(&req)).await {
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
                    Api::new(&api.to_string()).with_timeout(PROBE_TIMEOUT).get("/v1/local/volumes").await;
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
            match Api::new(&addr.to_string()).with_timeout(PROBE_TIMEOUT).get(&format!("/v1/volumes/{name}")).await {
                Ok(v) => return Ok(v),
                Err(e) => last_error = Some(e),
            }
        }
        let why = last_error.map(|e| format!(": {e:#}")).unwrap_or_default();
        bail!("no node answers for volume {name}{why}")
    }

    /// The pid `tandem up` recorded for node `id` (`node-<id>.pid`).
    pub fn node_pid(&self, id: NodeId) -> anyhow::Result<i32> {
        let path = self.dir.path().join(format!("node-{id}.pid"));
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        text.trim().parse().with_context(|| format!("{} does not hold a pid", path.display()))
    }

    /// `kill -9` of node `id`'s process: the crash a failover benchmark needs.
    pub fn kill9(&self, id: NodeId) -> anyhow::Result<()> {
        let pid = self.node_pid(id)?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
            .with_context(|| format!("cannot kill node {id} (pid {pid})"))
    }

    /// `tandem up --detach --dir DIR`, which starts the nodes that are not running and waits
    /// for their APIs and a leader.
    pub async fn restart_missing(&self) -> anyhow::Result<()> {
        let up = tokio::process::Command::new(&self.exe)
            .arg("up")
            .arg("--detach")
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(UP_WAIT, up)
            .await
            .map_err(|_| anyhow!("`tandem up` (restart) did not finish within {UP_WAIT:?}"))?
            .context("cannot run `tandem up`")?;
        if !out.status.success() {
            bail!(
                "`tandem up --detach --dir {}` (restart) failed ({}):\n{}{}",
                self.dir.path().display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `tandem down` and reports how it went; the guard's `Drop` does the same silently.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stopped = true;
        let down = tokio::process::Command::new(&self.exe)
            .arg("down")
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .output();
        let out = tokio::time::timeout(DOWN_WAIT, down)
            .await
            .map_err(|_| anyhow!("`tandem down` did not finish within {DOWN_WAIT:?}"))?
            .context("cannot run `tandem down`")?;
        if !out.status.success() {
            bail!(
                "`tandem down --dir {}` failed ({}): {}",
                self.dir.path().display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        // Blocking is acceptable here: the benchmark is ending, and the nodes must not outlive it.
        let _ = std::process::Command::new(&self.exe)
            .arg("down")
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
