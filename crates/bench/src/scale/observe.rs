//! Reading the nodes for `bench scale`: their `/metrics` (a figure a node does not export yet
//! is `None`, shown as "n/a"), the leader's memory, waiting for a step to settle, the catch-up
//! of a new node, and waiting for every ISR to be full again after a failover.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tandem_client::config_path;
use tandem_node::api::VolumeView;
use tandem_node::config::ClusterConfig;
use tandem_node::host_api::HostView;
use tandem_types::NodeId;

use crate::cluster_api::BenchCluster;

/// Between two looks at something the benchmark waits for.
const POLL: Duration = Duration::from_millis(20);
/// Between two looks at a large answer (every volume), so that looking costs little.
const POLL_LARGE: Duration = Duration::from_millis(500);
/// A step's volumes are served by their primaries, and its hosts have path maps, within this
/// long; otherwise the benchmark reports how far they got and goes on.
const SETTLE_WAIT: Duration = Duration::from_secs(300);
/// A new node catches up within this long, or the benchmark fails.
const JOIN_WAIT: Duration = Duration::from_secs(300);
/// Every ISR is full again within this long of the killed node's restart, or the benchmark
/// reports that it was not and goes on.
const REJOIN_WAIT: Duration = Duration::from_secs(600);
/// Answers listing every volume or every host are large at 10,000 of them.
const LARGE_TIMEOUT: Duration = Duration::from_secs(30);

/// `GET /metrics` of one node, as text.
pub async fn scrape(api: SocketAddr) -> anyhow::Result<String> {
    let http = reqwest::Client::builder().timeout(LARGE_TIMEOUT).build().context("an HTTP client")?;
    let url = format!("http://{api}/metrics");
    let resp = http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
    let resp = resp.error_for_status().with_context(|| format!("GET {url}"))?;
    resp.text().await.with_context(|| format!("GET {url}"))
}

/// An unlabelled sample of Prometheus text (`name value`), if the node exports it.
pub use tandem_testkit::queries::metric_value as metric;

/// The path manager's counters on the leader (another engineer adds them; absent until then).
#[derive(Clone, Copy, Debug)]
pub struct PathMetrics {
    seconds_total: Option<f64>,
    recomputes_total: Option<f64>,
    hosts_recomputed_total: Option<f64>,
}

/// The path manager's work over a stretch of time (the counters' differences).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PathFigures {
    pub recomputes: Option<f64>,
    pub seconds: Option<f64>,
    /// The mean time of one recompute.
    pub ms_per_recompute: Option<f64>,
    /// How many hosts' maps one recompute computed, on average: "linear in what changed"
    /// keeps this near the hosts a change touches, not all of them.
    pub hosts_per_recompute: Option<f64>,
}

impl PathMetrics {
    pub fn of(text: &str) -> PathMetrics {
        PathMetrics {
            seconds_total: metric(text, "tandem_paths_recompute_seconds_total"),
            recomputes_total: metric(text, "tandem_paths_recomputes_total"),
            hosts_recomputed_total: metric(text, "tandem_paths_hosts_recomputed_total"),
        }
    }

    /// The longest recompute so far (a gauge).
    pub fn max_seconds(text: &str) -> Option<f64> {
        metric(text, "tandem_paths_recompute_max_seconds")
    }

    pub fn since(&self, before: &PathMetrics) -> PathFigures {
        let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        let recomputes = diff(self.recomputes_total, before.recomputes_total);
        let seconds = diff(self.seconds_total, before.seconds_total);
        let hosts = diff(self.hosts_recomputed_total, before.hosts_recomputed_total);
        let per = |x: Option<f64>| match (x, recomputes) {
            (Some(x), Some(n)) if n > 0.0 => Some(x / n),
            _ => None,
        };
        PathFigures {
            recomputes,
            seconds,
            ms_per_recompute: per(seconds).map(|s| s * 1e3),
            hosts_per_recompute: per(hosts),
        }
    }
}

/// Node `id`'s resident memory (VmRSS), in bytes; `None` where /proc does not show it.
pub fn node_memory(tandem: &BenchCluster, id: NodeId) -> anyhow::Result<Option<u64>> {
    let pid = tandem.pid(id)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024))
}

/// The open-file limit of node `id`'s process (its API's connections count against it).
pub fn open_files_limit(tandem: &BenchCluster, id: NodeId) -> Option<u64> {
    let pid = tandem.pid(id).ok()?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How a step settled after it was created.
#[derive(Clone, Debug, Serialize)]
pub struct Settle {
    pub seconds: f64,
    /// Volumes whose primary says it serves them.
    pub volumes_served: u64,
    /// Hosts with a published path map (generation > 0).
    pub hosts_mapped: u64,
    /// Whether everything settled within the wait.
    pub complete: bool,
}

/// Until every volume is served by its primary and every host has a path map (or the wait
/// ends: then what was reached is reported).
pub async fn settle(tandem: &BenchCluster, volumes: u64, hosts: u64) -> anyhow::Result<Settle> {
    let start = Instant::now();
    loop {
        let volumes_served = served(tandem).await;
        let hosts_mapped = mapped(tandem).await;
        let complete = volumes_served >= volumes && hosts_mapped >= hosts;
        if complete || start.elapsed() >= SETTLE_WAIT {
            return Ok(Settle { seconds: start.elapsed().as_secs_f64(), volumes_served, hosts_mapped, complete });
        }
        tokio::time::sleep(POLL_LARGE).await;
    }
}

/// Volumes served by their primary, summed over the nodes (each answers for its own copies).
async fn served(tandem: &BenchCluster) -> u64 {
    let mut n = 0;
    for (_, addr) in tandem.node_apis().unwrap_or_default() {
        let api = tandem.api(addr).with_timeout(LARGE_TIMEOUT);
        if let Ok(local) = api.get::<serde_json::Value>("/v1/local/volumes").await {
            n += local["volumes"].as_array().map_or(0, |a| a.iter().filter(|v| v["serving"] == true).count()) as u64;
        }
    }
    n
}

async fn mapped(tandem: &BenchCluster) -> u64 {
    let Ok(leader) = tandem.leader_api().await else { return 0 };
    let api = tandem.api(leader).with_timeout(LARGE_TIMEOUT);
    api.get::<Vec<HostView>>("/v1/hosts").await.map_or(0, |h| h.iter().filter(|h| h.generation > 0).count() as u64)
}

/// A new node's catch-up.
#[derive(Clone, Debug, Serialize)]
pub struct Join {
    pub node: NodeId,
    /// From `tandem node add` until the new node's API answered (its start).
    pub api_up_s: f64,
    /// From `tandem node add` until its applied index reached the leader's.
    pub caught_up_s: f64,
    /// The leader's `tandem_raft_snapshot_bytes` before the add (`None`: not exported).
    pub snapshot_bytes: Option<u64>,
    /// The leader's Raft state before the add: with a purged log, the new node is sent the
    /// snapshot; without, it replays the log.
    pub leader_snapshot_index: Option<u64>,
    pub leader_purged_index: Option<u64>,
    pub leader_applied_index: Option<u64>,
}

/// Adds node `id` (`tandem node add`) and times it until its applied index reaches the
/// leader's, polling both nodes' `/metrics` meanwhile.
pub async fn join_new_node(tandem: &BenchCluster, id: NodeId, leader_api: SocketAddr) -> anyhow::Result<Join> {
    let metrics = scrape(leader_api).await?;
    let snapshot_bytes = metric(&metrics, "tandem_raft_snapshot_bytes").map(|b| b as u64);
    let view: serde_json::Value = tandem
        .api(leader_api)
        .with_timeout(LARGE_TIMEOUT)
        .get("/v1/cluster")
        .await
        .context("the leader's Raft status")?;
    let index = |field: &str| view["raft"][field].as_u64();
    let (leader_snapshot_index, leader_purged_index, leader_applied_index) =
        (index("snapshot_index"), index("purged_index"), index("applied_index"));
    let config = config_path(tandem.dir());
    let start = Instant::now();
    let watcher = tokio::spawn(watch_catch_up(config, id, leader_api, start));
    let added = tandem.add_node(id).await;
    if let Err(e) = added {
        watcher.abort();
        return Err(e);
    }
    let (api_up, caught_up) = watcher.await.context("the catch-up watcher crashed")??;
    Ok(Join {
        node: id,
        api_up_s: api_up.as_secs_f64(),
        caught_up_s: caught_up.as_secs_f64(),
        snapshot_bytes,
        leader_snapshot_index,
        leader_purged_index,
        leader_applied_index,
    })
}

/// When node `id` first answered and when its applied index reached the leader's, since `start`.
async fn watch_catch_up(
    config: std::path::PathBuf,
    id: NodeId,
    leader_api: SocketAddr,
    start: Instant,
) -> anyhow::Result<(Duration, Duration)> {
    let mut api_up = None;
    loop {
        // cluster.toml gets the node's entry while `node add` runs; a half-written file is read
        // again on the next poll.
        let addr = ClusterConfig::load(&config).ok().and_then(|c| c.node(id).map(|n| n.api_addr));
        if let Some(addr) = addr {
            let leader = scrape(leader_api).await.ok().and_then(|t| metric(&t, "tandem_raft_applied_index"));
            if let Ok(text) = scrape(addr).await {
                api_up.get_or_insert(start.elapsed());
                let applied = metric(&text, "tandem_raft_applied_index");
                if let (Some(leader), Some(applied)) = (leader, applied) {
                    if leader > 0.0 && applied >= leader {
                        return Ok((api_up.unwrap_or_default(), start.elapsed()));
                    }
                }
            }
        }
        if start.elapsed() >= JOIN_WAIT {
            anyhow::bail!("node {id}'s applied index does not reach the leader's within {JOIN_WAIT:?} of `node add`");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Restarts the stopped node and waits until every volume's ISR holds all its replicas again;
/// the seconds that took, or `None` if not within [`REJOIN_WAIT`].
pub async fn wait_full_isr(tandem: &BenchCluster, node: NodeId) -> anyhow::Result<Option<f64>> {
    let start = Instant::now();
    tandem.restart_missing().await?;
    loop {
        let leader = tandem.leader_api().await?;
        let api = tandem.api(leader).with_timeout(LARGE_TIMEOUT);
        if let Ok(volumes) = api.get::<Vec<VolumeView>>("/v1/volumes").await {
            let short = volumes.iter().filter(|v| v.isr.len() < v.replicas.len()).count();
            if short == 0 {
                return Ok(Some(start.elapsed().as_secs_f64()));
            }
            if start.elapsed() >= REJOIN_WAIT {
                eprintln!("  {short} volumes still lack node {node} in their ISR {REJOIN_WAIT:?} after its restart");
                return Ok(None);
            }
        }
        tokio::time::sleep(POLL_LARGE).await;
    }
}

/// What one node holds once a step is created: what a volume (and a host) costs it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeCost {
    pub node: NodeId,
    pub rss_bytes: Option<u64>,
    /// Open file descriptors (sockets included).
    pub fds: Option<u64>,
    pub threads: Option<u64>,
    /// Bytes of files under its data dir (Raft log and state, block store).
    pub data_bytes: u64,
}

/// Every node's memory, descriptors, threads and data on disk.
pub fn node_costs(tandem: &BenchCluster) -> anyhow::Result<Vec<NodeCost>> {
    let config = tandem.config()?;
    let mut costs = Vec::new();
    for n in &config.nodes {
        let pid = tandem.pid(n.id).ok();
        let count = |what: &str| {
            pid.and_then(|p| std::fs::read_dir(format!("/proc/{p}/{what}")).ok()).map(|d| d.count() as u64)
        };
        let rss_bytes = node_memory(tandem, n.id).ok().flatten();
        costs.push(NodeCost {
            node: n.id,
            rss_bytes,
            fds: count("fd"),
            threads: count("task"),
            data_bytes: dir_bytes(&config.resolve(&n.data_dir)),
        });
    }
    Ok(costs)
}

/// The bytes of the files under `dir` (allocated size is not asked for: sparse files count
/// at their length).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE tandem_raft_applied_index gauge\n\
        tandem_raft_applied_index 8451\n\
        tandem_host_paths{host=\"h\",state=\"unavailable\"} 3\n\
        tandem_paths_recomputes_total 10\n\
        tandem_paths_recompute_seconds_total 0.5\n\
        tandem_paths_hosts_recomputed_total 40\n";

    #[test]
    fn metric_reads_unlabelled_samples_only() {
        assert_eq!(metric(TEXT, "tandem_raft_applied_index"), Some(8451.0));
        assert_eq!(metric(TEXT, "tandem_host_paths"), None);
        assert_eq!(metric(TEXT, "tandem_raft_snapshot_bytes"), None);
    }

    #[test]
    fn path_figures_are_differences_and_absent_metrics_stay_absent() {
        let before = PathMetrics::of("tandem_paths_recomputes_total 2\ntandem_paths_recompute_seconds_total 0.1\ntandem_paths_hosts_recomputed_total 8\n");
        let f = PathMetrics::of(TEXT).since(&before);
        assert_eq!(f.recomputes, Some(8.0));
        assert_eq!(f.hosts_per_recompute, Some(4.0));
        assert!((f.ms_per_recompute.expect("ms") - 50.0).abs() < 1e-9);
        let none = PathMetrics::of("").since(&PathMetrics::of(""));
        assert_eq!((none.recomputes, none.ms_per_recompute), (None, None));
    }
}
