//! `tandem bench scale`: how the metadata's costs grow with the state's size. It creates
//! volumes, hosts and their connections on a local 3-node cluster, in steps (by default 1,000
//! volumes with 100 hosts, then 10,000 with 1,000), and at each step measures:
//!
//! - the metadata write rate while creating (volumes/s, hosts/s, connects/s, from
//!   [`CREATE_CLIENTS`] concurrent clients to the leader's API), and the rate of small setting
//!   writes at 1 and 64 clients (the `bench meta` loop) after the step, against the same run
//!   before anything was created: "flat per write" is that ratio staying near 1;
//! - the leader's memory (VmRSS), its Raft snapshot's size (`tandem_raft_snapshot_bytes`) and
//!   the time a new (4th) node takes from `tandem node add` until its applied index reaches the
//!   leader's (by snapshot when the leader's log has been purged); the node is removed again;
//! - the path manager's recompute time while the step was created (the leader's
//!   `tandem_paths_recompute*` metrics; "n/a" while a node does not export them);
//! - the delay from a failover to a watching host's map: every host long-polls its map
//!   (`GET /v1/hosts/{name}/paths?since=G`), the node that is primary of the most volumes and
//!   not the Raft leader (so a failover is timed, not an election) is killed with SIGKILL, and
//!   per host whose map had an active-optimized path through it, the time until its map has
//!   none; the node is restarted and every volume's ISR is full again before the next step.
//!   With `--kill-leader`, the same once more with the Raft leader as the victim (an election,
//!   then the failover).
//!
//! Then a table per step, the growth of each figure from the first step to the last, and the
//! goal `scale-path-map-p50` at the largest step (BENCH.md: a watching host has its new map
//! within 1 s of the kill).
//!
//! - `create.rs`: the concurrent creation of volumes, hosts and connections.
//! - `observe.rs`: reading the nodes: metrics, memory, settling, a new node's catch-up.
//! - `watch.rs`: the failover and the hosts' watchers.
//! - `report.rs`: the figures of a step, the growth, the goal, the table.

mod create;
mod observe;
mod report;
mod watch;

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use tandem_types::NodeId;

use self::create::{connect_hosts, create_hosts, create_volumes};
use self::observe::{join_new_node, node_costs, node_memory, scrape, settle, wait_full_isr, PathMetrics};
use self::report::{print_table, report, Step, WriteRates};
use self::watch::{failover, Failover, Victim};
use crate::cluster_api::BenchCluster;
use crate::load;
use crate::meta::tandem_client::TandemClient;

const NODES: u32 = 3;
/// Tiny volumes: the benchmark measures metadata, not data (a volume's copies cost the same
/// few records whatever its size).
const VOLUME_BYTES: u64 = 1 << 20;
/// Clients creating volumes, hosts and connections at once, each one request in flight.
const CREATE_CLIENTS: usize = 32;
/// Setting writes after each step, as in `bench meta`.
const VALUE_BYTES: usize = 256;
const WRITE_CLIENT_COUNTS: [usize; 2] = [1, 64];
/// Bounds on the flags: the cluster map's own limits (`VOLUMES_MAX`, `HOSTS_MAX`,
/// `HOST_VOLUMES_MAX` of tandem-clustermap, which the bench does not depend on; the map refuses
/// more anyway), and on the run time.
const VOLUMES_MAX: u64 = 16 * 1024;
const HOSTS_MAX: u64 = 1024;
const VOLUMES_PER_HOST_MAX: u64 = 256;
const STEPS_MAX: usize = 10;
const SECONDS_MAX: u64 = 60;
/// Ids of the nodes added to time a catch-up: one per step, never reused (a removed node's
/// data dir stays behind).
const JOIN_NODE_ID_BASE: u64 = 100;
/// Bounds on `--snapshot-after-entries`: a snapshot at least every 10 entries (the state is
/// encoded whole each time), at most every million.
const SNAPSHOT_AFTER_MIN: u64 = 10;
const SNAPSHOT_AFTER_MAX: u64 = 1_000_000;

#[derive(Args)]
pub struct ScaleArgs {
    /// Volumes at the end (1 MiB each, a copy on each of the 3 nodes).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=VOLUMES_MAX))]
    volumes: u64,
    /// Hosts at the end; each step has hosts in proportion to its volumes.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=HOSTS_MAX))]
    hosts: u64,
    /// Volumes each host is connected to (the host i reaches volumes i*K .. i*K+K-1, modulo the
    /// step's volumes).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=VOLUMES_PER_HOST_MAX))]
    volumes_per_host: u64,
    /// The state sizes, in volumes, at which the figures are taken, ascending, each at most
    /// --volumes (which is always the last); default: --volumes/10, then --volumes.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=VOLUMES_MAX))]
    steps: Vec<u64>,
    /// Sets the cluster's `snapshot_after_entries` to N and `logs_to_keep` to N/10 (cluster.toml),
    /// so that the leader builds a snapshot and purges its log early and a new node is sent the
    /// snapshot rather than the log; default: the config's defaults (10,000 and 2,000 entries).
    #[arg(long, value_parser = clap::value_parser!(u64).range(SNAPSHOT_AFTER_MIN..=SNAPSHOT_AFTER_MAX))]
    snapshot_after_entries: Option<u64>,
    /// At each step, after the failover of a node that is not the Raft leader, kill the leader
    /// too (once every ISR is full again) and time the same: an election, then the failover.
    #[arg(long)]
    kill_leader: bool,
    /// How long each setting-write run lasts (before anything is created, and after each step).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=SECONDS_MAX))]
    seconds: u64,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

/// One step's target: volumes and hosts in the cluster once it is created.
#[derive(Clone, Copy, Debug)]
struct Target {
    volumes: u64,
    hosts: u64,
}

fn targets(args: &ScaleArgs) -> anyhow::Result<Vec<Target>> {
    let mut steps = if args.steps.is_empty() { vec![(args.volumes / 10).max(1)] } else { args.steps.clone() };
    if steps.last() != Some(&args.volumes) {
        steps.push(args.volumes);
    }
    steps.dedup();
    if steps.windows(2).any(|w| w[0] >= w[1]) || steps.iter().any(|&s| s > args.volumes) {
        bail!("--steps must ascend, each at most --volumes ({}): {steps:?}", args.volumes);
    }
    if steps.len() > STEPS_MAX {
        bail!("at most {STEPS_MAX} steps");
    }
    if args.volumes_per_host > args.volumes.min(steps[0]) {
        bail!("--volumes-per-host ({}) exceeds the first step's volumes ({})", args.volumes_per_host, steps[0]);
    }
    // Hosts in proportion to volumes, rounded, at least one when there are any.
    Ok(steps
        .into_iter()
        .map(|v| {
            let hosts = if args.hosts == 0 { 0 } else { ((args.hosts * v + args.volumes / 2) / args.volumes).max(1) };
            Target { volumes: v, hosts }
        })
        .collect())
}

/// cluster.toml with `snapshot_after_entries = n` and `logs_to_keep = n/10` (the lines `tandem
/// up` writes in its `[cluster]` section).
fn snapshot_config(text: &str, n: u64) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("snapshot_after_entries") {
                format!("snapshot_after_entries = {n}")
            } else if l.starts_with("logs_to_keep") {
                format!("logs_to_keep = {}", n / 10)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

pub fn volume_name(i: u64) -> String {
    format!("scale-v{i:05}")
}

pub fn host_name(i: u64) -> String {
    format!("scale-h{i:04}")
}

pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    let targets = targets(&args)?;
    eprintln!("starting a {NODES}-node Tandem cluster (tandem up --detach)");
    let tandem = match args.snapshot_after_entries {
        None => BenchCluster::start(NODES).await?,
        Some(n) => {
            eprintln!("  with snapshot_after_entries = {n}, logs_to_keep = {}", n / 10);
            BenchCluster::start_with(NODES, Some(&|text: &str| snapshot_config(text, n))).await?
        }
    };
    eprintln!("  in {}", tandem.dir().display());
    let measured = measure(&args, &targets, &tandem).await;
    eprintln!("stopping the Tandem cluster");
    let stopped = tandem.stop().await;
    let (before, steps) = measured?;
    stopped?;
    let report = report(&args, before, steps);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure(
    args: &ScaleArgs,
    targets: &[Target],
    tandem: &BenchCluster,
) -> anyhow::Result<(WriteRates, Vec<Step>)> {
    let duration = Duration::from_secs(args.seconds);
    let before = write_rates(tandem, duration, "before").await?;
    eprintln!(
        "before anything is created: {:.0} writes/s at 1 client, {:.0} at 64",
        before.one_client.writes_per_s, before.many_clients.writes_per_s
    );
    let site = tandem.config()?.nodes.first().map(|n| n.site.clone()).unwrap_or_else(|| "local".into());
    let mut steps = Vec::new();
    let mut done = Target { volumes: 0, hosts: 0 };
    for (i, &target) in targets.iter().enumerate() {
        let what = format!("step {}/{}: {} volumes, {} hosts", i + 1, targets.len(), target.volumes, target.hosts);
        eprintln!("{what}");
        let step = one_step(args, tandem, &site, done, target, i, duration).await.with_context(|| what.clone())?;
        steps.push(step);
        done = target;
    }
    Ok((before, steps))
}

async fn one_step(
    args: &ScaleArgs,
    tandem: &BenchCluster,
    site: &str,
    done: Target,
    target: Target,
    index: usize,
    duration: Duration,
) -> anyhow::Result<Step> {
    let (leader, leader_api) = tandem.leader().await?;
    let paths_before = PathMetrics::of(&scrape(leader_api).await?);
    let volumes = create_volumes(leader_api, done.volumes, target.volumes, VOLUME_BYTES).await?;
    eprintln!("  created {} volumes: {:.0}/s", volumes.count, volumes.per_s);
    let hosts = create_hosts(leader_api, done.hosts, target.hosts, site).await?;
    eprintln!("  created {} hosts: {:.0}/s", hosts.count, hosts.per_s);
    let connects = connect_hosts(leader_api, done.hosts, target.hosts, args.volumes_per_host, target.volumes).await?;
    eprintln!("  made {} connections: {:.0}/s", connects.count, connects.per_s);
    // The path manager's work for what was just created, counted on the leader that did it.
    let created_metrics = scrape(leader_api).await?;
    let paths = PathMetrics::of(&created_metrics).since(&paths_before);
    let settled = settle(tandem, target.volumes, target.hosts).await?;
    eprintln!(
        "  settled in {:.1} s: {} of {} volumes served by their primary, {} of {} hosts with a path map",
        settled.seconds, settled.volumes_served, target.volumes, settled.hosts_mapped, target.hosts
    );
    let writes = write_rates(tandem, duration, &format!("step{index}")).await?;
    eprintln!(
        "  setting writes: {:.0}/s at 1 client, {:.0}/s at 64",
        writes.one_client.writes_per_s, writes.many_clients.writes_per_s
    );
    let (leader, leader_api) = match tandem.leader().await? {
        l if l.0 == leader => l,
        l => {
            eprintln!("  the leader moved from node {leader} to node {}", l.0);
            l
        }
    };
    let memory = node_memory(tandem, leader)?;
    let nodes = node_costs(tandem)?;
    let join_id = NodeId(JOIN_NODE_ID_BASE + index as u64);
    let join = join_new_node(tandem, join_id, leader_api).await?;
    eprintln!(
        "  node {join_id} caught up {:.2} s after `node add` (its API answered after {:.2} s; leader's snapshot: {}, log purged to {})",
        join.caught_up_s,
        join.api_up_s,
        join.snapshot_bytes.map_or("n/a".to_string(), |b| format!("{b} B")),
        join.leader_purged_index.map_or("none".to_string(), |i| i.to_string()),
    );
    tandem.remove_node(join_id).await?;
    let (fail, rejoin_s) = fail_and_rejoin(tandem, target.hosts, Victim::MostPrimaries).await?;
    let leader_failover = match args.kill_leader {
        true => Some(fail_and_rejoin(tandem, target.hosts, Victim::Leader).await?),
        false => None,
    };
    Ok(Step {
        volumes: target.volumes,
        hosts: target.hosts,
        connections: target.hosts * args.volumes_per_host,
        leader,
        created: vec![volumes, hosts, connects],
        settle: settled,
        writes,
        leader_rss_bytes: memory,
        nodes,
        paths,
        paths_recompute_max_s: PathMetrics::max_seconds(&created_metrics),
        join,
        failover: fail,
        rejoin_s,
        leader_failover,
    })
}

/// One failover (see `watch.rs`), then the victim's restart and the wait for every ISR to be
/// full again (`None`: not within the wait).
async fn fail_and_rejoin(tandem: &BenchCluster, hosts: u64, which: Victim) -> anyhow::Result<(Failover, Option<f64>)> {
    let fail = failover(tandem, hosts, which).await?;
    eprintln!(
        "  failover of node {}{}: {} hosts affected, map updated p50 {} p99 {} max {} ({} never within the wait); every failover committed {} ({} volumes left)",
        fail.victim,
        if which == Victim::Leader { " (the Raft leader)" } else { "" },
        fail.hosts_affected,
        report::secs(fail.p50_s),
        report::secs(fail.p99_s),
        report::secs(fail.max_s),
        fail.hosts_not_updated,
        report::secs(fail.failover_committed_s),
        fail.volumes_not_failed_over.map_or("n/a".to_string(), |n| n.to_string()),
    );
    let rejoin_s = wait_full_isr(tandem, fail.victim).await?;
    eprintln!(
        "  node {} restarted; every ISR full again: {}",
        fail.victim,
        rejoin_s.map_or("not within the wait".to_string(), |s| format!("after {s:.1} s"))
    );
    Ok((fail, rejoin_s))
}

async fn write_rates(tandem: &BenchCluster, duration: Duration, tag: &str) -> anyhow::Result<WriteRates> {
    let value = Bytes::from((0..VALUE_BYTES).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>());
    let mut figures = Vec::new();
    for clients in WRITE_CLIENT_COUNTS {
        let leader = tandem.leader_api().await?;
        let cs = (0..clients).map(|_| TandemClient::new(leader, tandem.token())).collect::<anyhow::Result<Vec<_>>>()?;
        let prefix = format!("scale.{tag}.n{clients}");
        figures.push(
            load::run(cs, duration, &prefix, value.clone())
                .await
                .with_context(|| format!("setting writes with {clients} client(s)"))?,
        );
    }
    let many_clients = figures.pop().expect("two runs");
    let one_client = figures.pop().expect("two runs");
    Ok(WriteRates { one_client, many_clients })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(volumes: u64, hosts: u64, steps: Vec<u64>) -> ScaleArgs {
        ScaleArgs {
            volumes,
            hosts,
            volumes_per_host: 10,
            steps,
            snapshot_after_entries: None,
            kill_leader: false,
            seconds: 1,
            json: false,
        }
    }

    fn pairs(t: &[Target]) -> Vec<(u64, u64)> {
        t.iter().map(|t| (t.volumes, t.hosts)).collect()
    }

    #[test]
    fn default_steps_are_a_tenth_then_all_with_hosts_in_proportion() {
        let t = targets(&args(10_000, 1_000, vec![])).expect("targets");
        assert_eq!(pairs(&t), vec![(1_000, 100), (10_000, 1_000)]);
    }

    #[test]
    fn the_last_step_is_always_all_volumes() {
        let t = targets(&args(3_000, 300, vec![100, 1_000])).expect("targets");
        assert_eq!(pairs(&t), vec![(100, 10), (1_000, 100), (3_000, 300)]);
    }

    #[test]
    fn snapshot_config_sets_both_lines() {
        let text = "[cluster]\nname = \"x\"\nsnapshot_after_entries = 10000\nlogs_to_keep = 2000\n";
        let edited = snapshot_config(text, 500);
        assert_eq!(edited, "[cluster]\nname = \"x\"\nsnapshot_after_entries = 500\nlogs_to_keep = 50\n");
    }

    #[test]
    fn steps_must_ascend_within_the_volumes() {
        assert!(targets(&args(1_000, 100, vec![500, 200])).is_err());
        assert!(targets(&args(1_000, 100, vec![2_000])).is_err());
        // A first step smaller than the volumes each host is connected to.
        assert!(targets(&args(1_000, 100, vec![5])).is_err());
    }
}
