//! `tandem bench failover`: `kill -9` of a volume's primary under a write load, repeated (see
//! ../../shared/design/BENCH.md). There is no reference: the figure is absolute, judged against
//! the failure-detection timeout the cluster is configured with
//! ([`FAILURE_TIMEOUT`](tandem_node::lease::FAILURE_TIMEOUT)).
//!
//! Each kill: a minimal NBD client (below) writes 4 KiB blocks, one at a time, through a node
//! that is not the primary, so its connection survives the kill (that node proxies to the
//! primary and retries across the failover); the primary is killed; the longest gap between two
//! consecutive acknowledged writes is the stall. The killed node is then restarted and the
//! benchmark waits until it is back in the volume's ISR before the next kill, whose victim is
//! the new primary.
//!
//! A host (`bench-host`) is connected to the volume and watches its path map with the
//! long-poll (`GET /v1/hosts/bench-host/paths?since=G`) through the same surviving node, as a
//! host's agent does: the path-map time is from the kill to the first map in which every path
//! of the killed node is `unavailable` and another node's path is `active-optimized`.
//!
//! - `write_load.rs`: the write load (over the test kit's NBD client) and the stall it saw.
//! - `report.rs`: what each kill measured, the summary, the goals and the table.

mod report;
mod write_load;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use tandem_client::{format_size, Api};
use tandem_node::api::ClusterView;
use tandem_node::host_api::PathMapView;
use tandem_paths::PathState;
use tandem_types::{Epoch, NodeId};

use self::report::{print_table, report, Kill};
use self::write_load::{longest_gap, write_load};
use crate::cluster_api::BenchCluster;

const NODES: u32 = 3;
const VOLUME_NAME: &str = "bench-failover";
/// Small, because a returning node is compared with the new primary chunk by chunk over the
/// whole volume (the new primary does not know what it missed).
const VOLUME_BYTES: u64 = 256 << 20;
/// The load writes random 4 KiB blocks within this range.
const WRITE_RANGE_BYTES: u64 = 64 << 20;
const BLOCK_BYTES: usize = 4096;
/// Writes before the kill, so the stall is measured against a steady load.
const STEADY_BEFORE_KILL: Duration = Duration::from_secs(2);
/// Writes after they resumed, so a second stall right after the first would be seen too.
const STEADY_AFTER_RESUME: Duration = Duration::from_secs(2);
/// Writes that have not resumed this long after the kill: the stall is reported as at least
/// this, and the benchmark goes on.
const RESUME_WAIT: Duration = Duration::from_secs(60);
/// The restarted node must be back in the ISR within this long (restart, resync, ISR grow).
const REJOIN_WAIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);
const KILLS_MAX: i64 = 50;
const HOST_NAME: &str = "bench-host";
/// One long-poll's wait; the watcher polls again right after.
const WATCH_WAIT_MS: u64 = 5_000;
/// The goal of BENCH.md: a watching host has the new path map within this long of the kill.
const PATH_MAP_TARGET: Duration = Duration::from_secs(1);

#[derive(Args)]
pub struct FailoverArgs {
    /// How many times the primary is killed (each time the current one).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=KILLS_MAX))]
    kills: u32,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    eprintln!("starting a {NODES}-node Tandem cluster (tandem up --detach)");
    let tandem = BenchCluster::start(NODES).await?;
    eprintln!("  in {}", tandem.dir().display());
    let measured = async {
        let v = tandem.create_volume(VOLUME_NAME, VOLUME_BYTES).await?;
        eprintln!("volume {VOLUME_NAME} ({}): primary node {}, ISR {:?}", format_size(VOLUME_BYTES), v.primary, v.isr);
        let api = tandem.api(tandem.leader_api().await?);
        let site = tandem.config()?.nodes.first().map(|n| n.site.clone()).unwrap_or_else(|| "local".into());
        let host = serde_json::json!({ "name": HOST_NAME, "site": site });
        api.request::<_, serde_json::Value>(reqwest::Method::POST, "/v1/hosts", Some(&host)).await?;
        let connect = serde_json::json!({ "volume": VOLUME_NAME });
        api.request::<_, serde_json::Value>(reqwest::Method::POST, &format!("/v1/hosts/{HOST_NAME}/volumes"), Some(&connect))
            .await?;
        let mut kills = Vec::new();
        for kill in 1..=args.kills {
            let k = one_kill(&tandem, kill).await.with_context(|| format!("kill {kill}/{}", args.kills))?;
            eprintln!(
                "kill {kill}/{}: node {} (raft leader: {}), stall {:.0} ms, path map {} ms, {} failed writes, new primary {}, back in the ISR {:.1} s after its restart",
                args.kills,
                k.killed_node,
                k.killed_raft_leader,
                k.stall_ms,
                k.path_map_ms.map_or("-".to_string(), |v| format!("{v:.0}")),
                k.writes_failed,
                k.new_primary.map_or("none".to_string(), |p| p.to_string()),
                k.rejoin_s
            );
            kills.push(k);
        }
        anyhow::Ok(kills)
    }
    .await;
    eprintln!("stopping the Tandem cluster");
    let stopped = tandem.stop().await;
    let kills = measured?;
    stopped?;
    let report = report(kills);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn one_kill(tandem: &BenchCluster, kill: u32) -> anyhow::Result<Kill> {
    let all: Vec<NodeId> = tandem.node_apis()?.into_iter().map(|(id, _)| id).collect();
    let before = tandem.volume(VOLUME_NAME, None).await?;
    if sorted(&before.isr) != sorted(&all) {
        bail!("the ISR is {:?}, not every node, before the kill", before.isr);
    }
    let victim = before.primary;
    let killed_raft_leader = raft_leader(tandem).await? == Some(victim);
    let cfg = tandem.config()?;
    let client = cfg
        .nodes
        .iter()
        .find(|n| n.id != victim)
        .ok_or_else(|| anyhow!("the cluster has no node besides the primary"))?;
    let client_node = client.id;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let seed = 0x5eed_0000 + u64::from(kill);
    let writer = {
        let (stop, acked, addr) = (stop.clone(), acked.clone(), client.nbd_addr);
        std::thread::spawn(move || write_load(addr, seed, &stop, &acked))
    };
    let watch_api = tandem.api(client.api_addr).with_timeout(Duration::from_millis(WATCH_WAIT_MS + 5_000));
    let first: PathMapView = watch_api.get(&format!("/v1/hosts/{HOST_NAME}/paths")).await?;
    let watcher = tokio::spawn(watch_paths(watch_api, first.generation, victim));
    let measured = async {
        wait_until("the write load to start", Duration::from_secs(60), || acked.load(Ordering::Relaxed) > 0).await?;
        tokio::time::sleep(STEADY_BEFORE_KILL).await;
        tandem.kill9(victim)?;
        let killed_at = Instant::now();
        let acked_at_kill = acked.load(Ordering::Relaxed);
        eprintln!("kill {kill}: killed node {victim} (the primary) under load; writes through node {client_node}");
        // Until writes have resumed for a while and a survivor shows the new primary.
        let mut resumed_at = None;
        let mut failover: Option<(Instant, NodeId, Epoch)> = None;
        loop {
            let now = Instant::now();
            if resumed_at.is_none() && acked.load(Ordering::Relaxed) > acked_at_kill + 1 {
                resumed_at = Some(now);
            }
            if failover.is_none() {
                if let Ok(v) = tandem.volume(VOLUME_NAME, Some(victim)).await {
                    if v.epoch > before.epoch && v.primary != victim {
                        failover = Some((Instant::now(), v.primary, v.epoch));
                    }
                }
            }
            let settled = resumed_at.is_some_and(|t| now.duration_since(t) >= STEADY_AFTER_RESUME);
            if (settled && failover.is_some()) || now.duration_since(killed_at) >= RESUME_WAIT {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        anyhow::Ok((killed_at, failover))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = tokio::time::timeout(RESUME_WAIT, watcher).await.ok().and_then(Result::ok).unwrap_or_default();
    let load = tokio::task::spawn_blocking(move || writer.join())
        .await
        .context("cannot join the write load")?
        .map_err(|_| anyhow!("the write load crashed"))?;
    let (killed_at, failover) = measured?;

    let end = Instant::now();
    let stall = longest_gap(&load.completions, end);
    let resume = load.completions.iter().find(|&&t| t > killed_at).map(|&t| ms(t - killed_at));

    eprintln!("kill {kill}: restarting node {victim} (tandem up --detach)");
    let restarted_at = Instant::now();
    tandem.restart_missing().await?;
    let deadline = restarted_at + REJOIN_WAIT;
    loop {
        if let Ok(v) = tandem.volume(VOLUME_NAME, None).await {
            if sorted(&v.isr) == sorted(&all) {
                break;
            }
        }
        if Instant::now() >= deadline {
            bail!("node {victim} is not back in the ISR within {REJOIN_WAIT:?} of its restart");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(Kill {
        kill,
        killed_node: victim,
        killed_raft_leader,
        client_node,
        new_primary: failover.map(|f| f.1),
        new_epoch: failover.map(|f| f.2),
        stall_ms: ms(stall),
        resume_ms: resume,
        failover_seen_ms: failover.map(|f| ms(f.0 - killed_at)),
        path_map_ms: seen.without_victim.map(|t| ms(t.saturating_duration_since(killed_at))),
        path_map_first_change_ms: seen.first_change.map(|t| ms(t.saturating_duration_since(killed_at))),
        writes_acked: load.completions.len() as u64,
        writes_failed: load.failed,
        errors: load.errors,
        rejoin_s: restarted_at.elapsed().as_secs_f64(),
    })
}

/// When the watching host saw what.
#[derive(Default)]
struct Seen {
    first_change: Option<Instant>,
    without_victim: Option<Instant>,
}

/// Follows the host's path map with the long-poll, as a host agent does, until a map shows
/// every path of `victim` unavailable and another node's path active-optimized.
async fn watch_paths(api: Api, mut generation: u64, victim: NodeId) -> Seen {
    let mut seen = Seen::default();
    let deadline = Instant::now() + RESUME_WAIT;
    while Instant::now() < deadline {
        let path = format!("/v1/hosts/{HOST_NAME}/paths?since={generation}&wait_ms={WATCH_WAIT_MS}");
        let map: PathMapView = match api.get(&path).await {
            Ok(m) => m,
            Err(_) => {
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        let now = Instant::now();
        if map.generation <= generation {
            continue;
        }
        generation = map.generation;
        seen.first_change.get_or_insert(now);
        let paths = map.volumes.iter().flat_map(|v| v.paths.iter());
        let victim_gone = paths.clone().filter(|p| p.node == victim).all(|p| p.state == PathState::Unavailable);
        let other_optimized = paths.clone().any(|p| p.node != victim && p.state == PathState::ActiveOptimized);
        if victim_gone && other_optimized {
            seen.without_victim = Some(now);
            return seen;
        }
    }
    seen
}

/// The Raft leader's id, as the first node that knows it says.
async fn raft_leader(tandem: &BenchCluster) -> anyhow::Result<Option<NodeId>> {
    for (_, addr) in tandem.node_apis()? {
        let api = tandem.api(addr).with_timeout(Duration::from_secs(2));
        if let Ok(view) = api.get::<ClusterView>("/v1/cluster").await {
            if view.raft.leader.is_some() {
                return Ok(view.raft.leader);
            }
        }
    }
    Ok(None)
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            bail!("no {what} within {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

fn sorted(ids: &[NodeId]) -> Vec<NodeId> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
