//! A throwaway local Tandem cluster for a benchmark: `tandem up --detach` of this very binary in
//! a fresh temporary dir, and `tandem down` when the benchmark ends, even when it fails (the
//! guard's `Drop`). Also Tandem's side of the benchmark client: HTTP/1.1 with keep-alive to the
//! leader's API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tandem_node::api::{ClusterView, SettingBody};
use tandem_node::config::ClusterConfig;

use super::load::{KvClient, PUT_TIMEOUT};
use crate::client::{config_path, Api};

/// `up` itself waits up to a minute for the APIs and then for a leader.
const UP_WAIT: Duration = Duration::from_secs(120);
/// `down` gives each node 15 s after SIGTERM.
const DOWN_WAIT: Duration = Duration::from_secs(60);
/// Finding the leader right after `up` (it has one by then) or between runs.
const LEADER_WAIT: Duration = Duration::from_secs(15);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

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

/// One benchmark client of Tandem: its own HTTP/1.1 connection (kept alive) to the leader's API,
/// writing settings (`PUT /v1/settings/{key}`), each one committed through Raft.
pub struct TandemClient {
    http: reqwest::Client,
    base: String,
}

impl TandemClient {
    pub fn new(leader_api: SocketAddr) -> anyhow::Result<TandemClient> {
        let http = reqwest::Client::builder()
            .timeout(PUT_TIMEOUT)
            .connect_timeout(PROBE_TIMEOUT)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1)
            .build()
            .context("cannot build an HTTP client")?;
        Ok(TandemClient { http, base: format!("http://{leader_api}/v1/settings/") })
    }
}

impl KvClient for TandemClient {
    async fn put(&self, key: &str, value: &Bytes) -> anyhow::Result<()> {
        let value = std::str::from_utf8(value).context("a setting's value must be UTF-8")?;
        let body = SettingBody { value: value.to_string() };
        let resp = self.http.put(format!("{}{key}", self.base)).json(&body).send().await?;
        let status = resp.status();
        // Reading the whole answer lets the connection be reused for the next put.
        let answer = resp.bytes().await?;
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&answer));
        }
        Ok(())
    }
}
