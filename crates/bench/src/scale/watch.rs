//! The failover of `bench scale`: every host whose map has an active-optimized path through
//! the victim long-polls its map (`GET /v1/hosts/{name}/paths?since=G`) through a surviving
//! node, as a host agent does; the victim (the node that is primary of the most volumes, not
//! the Raft leader, so that a failover is timed and not an election) is killed with SIGKILL;
//! per host, the time from the kill until its map has no active-optimized path through it.
//! With `--kill-leader` the same is done once more with the Raft leader as the victim: an
//! election first, then the failover.
//!
//! All watchers hold a connection open at once (1,000 at 10,000 volumes). The HTTP client has
//! no connection cap; the nodes' API (axum) has none either, so the bound is the processes'
//! open-file limit, reported beside the figures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde::Serialize;
use tandem_client::PROBE_TIMEOUT;
use tandem_node::api::VolumeView;
use tandem_node::host_api::PathMapView;
use tandem_paths::PathState;
use tandem_types::NodeId;

use super::host_name;
use super::observe::open_files_limit;
use crate::cluster_api::BenchCluster;

/// One long-poll's wait; a watcher polls again right after.
const WATCH_WAIT_MS: u64 = 5_000;
/// The first long-poll of each watcher is this short: its answer says the connection is open.
const WARM_WAIT_MS: u64 = 50;
/// Maps read at once before the kill.
const READ_CONCURRENCY: usize = 64;
/// Every watcher has its connection open within this long, or the benchmark fails.
const READY_WAIT: Duration = Duration::from_secs(60);
/// A host whose map has not changed this long after the kill is counted as not updated.
const UPDATE_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);
/// Every volume of the victim has a new primary within this long of the kill, or the
/// benchmark reports how many do not and goes on (the failovers are Raft writes, one per
/// volume: thousands of them take as long as thousands of writes).
const COMMIT_WAIT: Duration = Duration::from_secs(90);
/// Between two reads of every volume, waiting for the failover to commit.
const COMMITTED_POLL: Duration = Duration::from_millis(200);
/// After a failed long-poll (a survivor busy or restarting its listener).
const RETRY: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, Serialize)]
pub struct Failover {
    pub victim: NodeId,
    /// Volumes whose primary the victim was.
    pub victim_primaries: u64,
    pub raft_leader: NodeId,
    /// Hosts whose map had an active-optimized path through the victim before the kill: the
    /// hosts watched.
    pub hosts_affected: u64,
    /// Watched hosts whose map still had one [`UPDATE_WAIT`] after the kill.
    pub hosts_not_updated: u64,
    /// From the kill until a watching host's map has no active-optimized path through the
    /// victim, over the hosts updated.
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub max_s: Option<f64>,
    /// From the kill until no volume has the victim as primary any more (the leader's failover
    /// committed for each); `None`: not within [`COMMIT_WAIT`].
    pub failover_committed_s: Option<f64>,
    /// Volumes that still had the victim as primary when that wait ended (0 when it did not).
    pub volumes_not_failed_over: Option<u64>,
    /// The open-file limit of the nodes whose API the watchers held connections to.
    pub open_files_limit: Option<u64>,
}

fn has_optimized_path(map: &PathMapView, node: NodeId) -> bool {
    map.volumes.iter().flat_map(|v| v.paths.iter()).any(|p| p.node == node && p.state == PathState::ActiveOptimized)
}

fn http(token: Option<String>) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .default_headers(tandem_testkit::bearer_headers(token.as_deref()))
        .timeout(Duration::from_millis(WATCH_WAIT_MS) + Duration::from_secs(10))
        .connect_timeout(PROBE_TIMEOUT)
        .tcp_nodelay(true)
        .build()
        .context("cannot build an HTTP client")
}

async fn get_map(http: &reqwest::Client, url: &str) -> anyhow::Result<PathMapView> {
    let resp = http.get(url).send().await?.error_for_status()?;
    Ok(resp.json().await?)
}

/// Which node a failover kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victim {
    /// The node that is primary of the most volumes, not the Raft leader: a failover alone.
    MostPrimaries,
    /// The Raft leader: an election, then the failover of the leader's volumes.
    Leader,
}

/// Kills the victim (see [`Victim`]) under the watch of every host `0..hosts` whose map goes
/// through it.
pub async fn failover(tandem: &BenchCluster, hosts: u64, which: Victim) -> anyhow::Result<Failover> {
    let (leader, leader_api) = tandem.leader().await?;
    let volumes: Vec<VolumeView> =
        tandem.api(leader_api).with_timeout(Duration::from_secs(30)).get("/v1/volumes").await.context("the volumes")?;
    let nodes = tandem.node_apis()?;
    let primaries = |id: NodeId| volumes.iter().filter(|v| v.primary == id).count() as u64;
    let (victim, victim_primaries) = match which {
        Victim::Leader => (leader, primaries(leader)),
        Victim::MostPrimaries => nodes
            .iter()
            .filter(|(id, _)| *id != leader)
            .map(|(id, _)| (*id, primaries(*id)))
            .max_by_key(|(id, n)| (*n, std::cmp::Reverse(*id)))
            .ok_or_else(|| anyhow!("the cluster has no node besides the leader"))?,
    };
    let survivors: Vec<(NodeId, SocketAddr)> = nodes.iter().copied().filter(|(id, _)| *id != victim).collect();
    let http = http(tandem.token())?;

    // Each host's map as it is now, read through the survivors in turn.
    let url = |h: u64| {
        let (_, addr) = survivors[(h as usize) % survivors.len()];
        format!("http://{addr}/v1/hosts/{}/paths", host_name(h))
    };
    let maps: Vec<(u64, PathMapView)> = futures::stream::iter(0..hosts)
        .map(|h| {
            let (http, url) = (http.clone(), url(h));
            async move { get_map(&http, &url).await.map(|m| (h, m)).with_context(|| format!("GET {url}")) }
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let affected: Vec<(u64, u64)> =
        maps.iter().filter(|(_, m)| has_optimized_path(m, victim)).map(|(h, m)| (*h, m.generation)).collect();

    let ready = Arc::new(AtomicUsize::new(0));
    let watchers: Vec<_> = affected
        .iter()
        .map(|&(h, generation)| {
            let (http, ready, url) = (http.clone(), ready.clone(), url(h));
            tokio::spawn(watch(http, url, generation, victim, ready))
        })
        .collect();
    let deadline = Instant::now() + READY_WAIT;
    while ready.load(Ordering::Relaxed) < affected.len() {
        if Instant::now() >= deadline {
            watchers.iter().for_each(|w| w.abort());
            bail!(
                "only {} of {} watchers have their connection open within {READY_WAIT:?}",
                ready.load(Ordering::Relaxed),
                affected.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    eprintln!(
        "  {} hosts watch their map through nodes {:?}; killing node {victim} (primary of {victim_primaries} volumes; the Raft leader is node {leader})",
        affected.len(),
        survivors.iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
    tandem.kill9(victim)?;
    let killed_at = Instant::now();
    let mut delays_s = Vec::new();
    let mut not_updated = 0;
    for w in watchers {
        match w.await.context("a watcher crashed")? {
            Some(at) => delays_s.push(at.saturating_duration_since(killed_at).as_secs_f64()),
            None => not_updated += 1,
        }
    }
    // Read through a survivor: the leader may be the victim.
    let (failover_committed_s, volumes_not_failed_over) =
        failover_committed(tandem, survivors[0].1, victim, killed_at).await;
    delays_s.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        (!delays_s.is_empty())
            .then(|| delays_s[((p * delays_s.len() as f64).ceil() as usize).clamp(1, delays_s.len()) - 1])
    };
    Ok(Failover {
        victim,
        victim_primaries,
        raft_leader: leader,
        hosts_affected: affected.len() as u64,
        hosts_not_updated: not_updated,
        p50_s: pct(0.50),
        p99_s: pct(0.99),
        max_s: delays_s.last().copied(),
        failover_committed_s,
        volumes_not_failed_over,
        open_files_limit: survivors.iter().filter_map(|(id, _)| open_files_limit(tandem, *id)).min(),
    })
}

/// Seconds from the kill until no volume names `victim` as its primary, as a survivor shows
/// them, or `None` if not within [`COMMIT_WAIT`]; and how many volumes still
/// did at the last look. The hosts' maps may change before that: a map shows the failover's
/// candidate as soon as the victim is known dead.
async fn failover_committed(
    tandem: &BenchCluster,
    survivor: SocketAddr,
    victim: NodeId,
    killed_at: Instant,
) -> (Option<f64>, Option<u64>) {
    let api = tandem.api(survivor).with_timeout(Duration::from_secs(30));
    let mut left = None;
    while killed_at.elapsed() < COMMIT_WAIT {
        if let Ok(volumes) = api.get::<Vec<VolumeView>>("/v1/volumes").await {
            let n = volumes.iter().filter(|v| v.primary == victim).count() as u64;
            left = Some(n);
            if n == 0 {
                return (Some(killed_at.elapsed().as_secs_f64()), left);
            }
        }
        tokio::time::sleep(COMMITTED_POLL).await;
    }
    (None, left)
}

/// One host's watcher: a short long-poll first (its answer means the connection is open:
/// `ready`), then long-polls until a map without an active-optimized path through `victim`;
/// when it saw that, or `None` if not within [`UPDATE_WAIT`] of becoming ready.
async fn watch(
    http: reqwest::Client,
    url: String,
    mut generation: u64,
    victim: NodeId,
    ready: Arc<AtomicUsize>,
) -> Option<Instant> {
    let mut wait_ms = WARM_WAIT_MS;
    let mut deadline = None;
    loop {
        let answer = get_map(&http, &format!("{url}?since={generation}&wait_ms={wait_ms}")).await;
        let now = Instant::now();
        if wait_ms == WARM_WAIT_MS && answer.is_ok() {
            ready.fetch_add(1, Ordering::Relaxed);
            wait_ms = WATCH_WAIT_MS;
            deadline = Some(now + READY_WAIT + UPDATE_WAIT);
        }
        match answer {
            Ok(map) if map.generation > generation => {
                generation = map.generation;
                if !has_optimized_path(&map, victim) {
                    return Some(now);
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(RETRY).await,
        }
        if deadline.is_some_and(|d| now >= d) {
            return None;
        }
    }
}
