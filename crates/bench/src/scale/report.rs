//! `bench scale`'s result: the figures of each step, their growth from the first step to the
//! last beside the growth of the state, the goal, and the table (or the JSON document).

use serde::Serialize;
use tandem_types::NodeId;

use super::create::CreateFigures;
use super::observe::{Join, NodeCost, PathFigures, Settle};
use super::watch::Failover;
use super::{ScaleArgs, NODES, VOLUME_BYTES};
use crate::goal::{ratio, Goal, Op};
use crate::load::RunFigures;

/// BENCH.md: a watching host has its new map within 1 s of the kill.
const PATH_MAP_P50_TARGET_S: f64 = 1.0;

/// Setting writes (256 B) at 1 and at 64 clients.
#[derive(Clone, Debug, Serialize)]
pub struct WriteRates {
    pub one_client: RunFigures,
    pub many_clients: RunFigures,
}

#[derive(Serialize)]
pub struct Step {
    pub volumes: u64,
    pub hosts: u64,
    pub connections: u64,
    /// The Raft leader while the step was created.
    pub leader: NodeId,
    /// Volumes, hosts and connections: how many this step added and how fast.
    pub created: Vec<CreateFigures>,
    pub settle: Settle,
    /// Setting writes once the step is created.
    pub writes: WriteRates,
    pub leader_rss_bytes: Option<u64>,
    /// Every node's memory, descriptors, threads and data once the step is created.
    pub nodes: Vec<NodeCost>,
    /// The path manager's work while the step was created.
    pub paths: PathFigures,
    pub paths_recompute_max_s: Option<f64>,
    pub join: Join,
    pub failover: Failover,
    /// From the victim's restart until every ISR was full again (`None`: not within the wait).
    pub rejoin_s: Option<f64>,
    /// `--kill-leader`: the same with the Raft leader killed, and its rejoin.
    pub leader_failover: Option<(Failover, Option<f64>)>,
}

/// One figure's growth from the first step to the last.
#[derive(Serialize)]
struct Growth {
    figure: &'static str,
    first: Option<f64>,
    last: Option<f64>,
    /// last / first.
    ratio: Option<f64>,
    /// What the design promises: `flat` (~1x whatever the state) or `linear` (in proportion to
    /// the state, or to what changed).
    expected: &'static str,
}

#[derive(Serialize)]
pub struct Report {
    benchmark: &'static str,
    nodes: u32,
    volume_bytes: u64,
    volumes_per_host: u64,
    seconds_per_run: u64,
    cores: usize,
    /// Setting writes before anything was created.
    before: WriteRates,
    steps: Vec<Step>,
    /// How much the state grew from the first step to the last (volumes).
    state_growth: f64,
    growth: Vec<Growth>,
    goals: Vec<Goal>,
}

type Figure = fn(&Step, &WriteRates) -> Option<f64>;

/// The figures shown per step and in the growth: label, unit decimals, expectation, value.
const FIGURES: [(&str, usize, &str, Figure); 19] = [
    ("volumes created/s", 0, "flat", |s, _| created(s, "volumes")),
    ("hosts created/s", 0, "flat", |s, _| created(s, "hosts")),
    ("connections made/s", 0, "flat", |s, _| created(s, "connections")),
    ("writes/s, 1 client", 0, "flat", |s, _| Some(s.writes.one_client.writes_per_s)),
    ("writes/s, 64 clients", 0, "flat", |s, _| Some(s.writes.many_clients.writes_per_s)),
    ("  after/before, 1 client", 2, "flat", |s, b| {
        Some(ratio(s.writes.one_client.writes_per_s, b.one_client.writes_per_s))
    }),
    ("  after/before, 64 clients", 2, "flat", |s, b| {
        Some(ratio(s.writes.many_clients.writes_per_s, b.many_clients.writes_per_s))
    }),
    ("p50 ms, 1 client", 3, "flat", |s, _| Some(s.writes.one_client.p50_ms)),
    ("leader RSS MiB", 1, "linear", |s, _| s.leader_rss_bytes.map(|b| b as f64 / (1 << 20) as f64)),
    ("snapshot MiB", 2, "linear", |s, _| s.join.snapshot_bytes.map(|b| b as f64 / (1 << 20) as f64)),
    ("new node caught up s", 2, "linear", |s, _| Some(s.join.caught_up_s)),
    ("path recompute ms (mean)", 3, "linear", |s, _| s.paths.ms_per_recompute),
    ("  hosts per recompute", 1, "linear", |s, _| s.paths.hosts_per_recompute),
    ("path recompute max ms", 3, "linear", |s, _| s.paths_recompute_max_s.map(|x| x * 1e3)),
    ("failover: map p50 s", 2, "linear", |s, _| s.failover.p50_s),
    ("failover: map max s", 2, "linear", |s, _| s.failover.max_s),
    ("failover: all committed s", 2, "linear", |s, _| s.failover.failover_committed_s),
    ("leader killed: map p50 s", 2, "linear", |s, _| s.leader_failover.as_ref().and_then(|f| f.0.p50_s)),
    ("leader killed: committed s", 2, "linear", |s, _| {
        s.leader_failover.as_ref().and_then(|f| f.0.failover_committed_s)
    }),
];

fn created(s: &Step, what: &str) -> Option<f64> {
    s.created.iter().find(|c| c.what == what && c.count > 0).map(|c| c.per_s)
}

pub fn secs(s: Option<f64>) -> String {
    s.map_or("n/a".to_string(), |s| format!("{s:.2} s"))
}

pub fn report(args: &ScaleArgs, before: WriteRates, steps: Vec<Step>) -> Report {
    let (first, last) = (steps.first(), steps.last());
    let state_growth = match (first, last) {
        (Some(f), Some(l)) => ratio(l.volumes as f64, f.volumes as f64),
        _ => f64::NAN,
    };
    let growth = FIGURES
        .iter()
        .map(|&(figure, _, expected, value)| {
            let first = first.and_then(|s| value(s, &before));
            let last = last.and_then(|s| value(s, &before));
            let ratio = match (first, last) {
                (Some(f), Some(l)) if f > 0.0 => Some(l / f),
                _ => None,
            };
            Growth { figure: figure.trim(), first, last, ratio, expected }
        })
        .collect();
    let p50 = last.and_then(|s| s.failover.p50_s).unwrap_or(f64::NAN);
    let goals = vec![Goal::absolute_in("scale-path-map-p50", p50, 2, "s", Op::AtMost, PATH_MAP_P50_TARGET_S)];
    Report {
        benchmark: "scale",
        nodes: NODES,
        volume_bytes: VOLUME_BYTES,
        volumes_per_host: args.volumes_per_host,
        seconds_per_run: args.seconds,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        before,
        steps,
        state_growth,
        growth,
        goals,
    }
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.filter(|v| v.is_finite()).map_or("n/a".to_string(), |v| format!("{v:.decimals$}"))
}

pub fn print_table(r: &Report) {
    println!(
        "bench scale: {} nodes, {} KiB volumes, {} volumes per host; setting writes of 256 B for {} s per run; {} cores",
        r.nodes,
        r.volume_bytes / 1024,
        r.volumes_per_host,
        r.seconds_per_run,
        r.cores
    );
    println!(
        "before anything was created: {:.0} writes/s at 1 client (p50 {:.3} ms), {:.0} at 64",
        r.before.one_client.writes_per_s, r.before.one_client.p50_ms, r.before.many_clients.writes_per_s
    );
    println!();
    let mut header = format!("{:<28}", "figure");
    for s in &r.steps {
        header.push_str(&format!(" {:>14}", format!("{} vol", s.volumes)));
    }
    header.push_str(&format!(" {:>9}  expected", "growth"));
    println!("{header}");
    let mut counts = format!("{:<28}", "hosts / connections");
    for s in &r.steps {
        counts.push_str(&format!(" {:>14}", format!("{} / {}", s.hosts, s.connections)));
    }
    println!("{counts}");
    for (&(label, decimals, _, value), g) in FIGURES.iter().zip(&r.growth) {
        let mut line = format!("{label:<28}");
        for s in &r.steps {
            line.push_str(&format!(" {:>14}", cell(value(s, &r.before), decimals)));
        }
        line.push_str(&format!(" {:>9}  {}", cell(g.ratio, 2).to_string() + "x", g.expected));
        println!("{line}");
    }
    println!();
    for s in &r.steps {
        println!(
            "{} volumes: settled in {:.1} s ({}/{} served, {}/{} hosts mapped); leader node {}; new node {} after `node add`: API {:.2} s, caught up {:.2} s (leader snapshot at {}, log purged to {}); failover of node {} (primary of {}): {} hosts watched, {} not updated, p99 {}, all failovers committed {} ({} volumes left), open-file limit {}; ISR full again {}",
            s.volumes,
            s.settle.seconds,
            s.settle.volumes_served,
            s.volumes,
            s.settle.hosts_mapped,
            s.hosts,
            s.leader,
            s.join.node,
            s.join.api_up_s,
            s.join.caught_up_s,
            s.join.leader_snapshot_index.map_or("none".into(), |i| i.to_string()),
            s.join.leader_purged_index.map_or("none".into(), |i| i.to_string()),
            s.failover.victim,
            s.failover.victim_primaries,
            s.failover.hosts_affected,
            s.failover.hosts_not_updated,
            secs(s.failover.p99_s),
            secs(s.failover.failover_committed_s),
            s.failover.volumes_not_failed_over.map_or("n/a".into(), |n| n.to_string()),
            s.failover.open_files_limit.map_or("n/a".into(), |l| l.to_string()),
            s.rejoin_s.map_or("not within the wait".into(), |t| format!("{t:.1} s after the restart")),
        );
    }
    for s in &r.steps {
        if let Some((f, rejoin)) = &s.leader_failover {
            println!(
                "{} volumes, the Raft leader (node {}, primary of {}) killed: {} hosts watched, {} not updated, map p50 {} p99 {} max {}, all failovers committed {} ({} volumes left); ISR full again {}",
                s.volumes,
                f.victim,
                f.victim_primaries,
                f.hosts_affected,
                f.hosts_not_updated,
                secs(f.p50_s),
                secs(f.p99_s),
                secs(f.max_s),
                secs(f.failover_committed_s),
                f.volumes_not_failed_over.map_or("n/a".into(), |n| n.to_string()),
                rejoin.map_or("not within the wait".into(), |t| format!("{t:.1} s after the restart")),
            );
        }
    }
    println!();
    println!("what each node holds once a step is created:");
    for s in &r.steps {
        for n in &s.nodes {
            println!(
                "  {:>6} volumes: node {}: RSS {} MiB, {} open fds, {} threads, {:.1} MiB of data",
                s.volumes,
                n.node,
                n.rss_bytes.map_or("n/a".into(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64)),
                n.fds.map_or("n/a".into(), |f| f.to_string()),
                n.threads.map_or("n/a".into(), |t| t.to_string()),
                n.data_bytes as f64 / (1 << 20) as f64
            );
        }
    }
    println!(
        "state grew {:.1}x from the first step to the last; \"flat\" figures should stay ~1x, \"linear\" ones grow with the state (or with what changed)",
        r.state_growth
    );
    println!();
    for g in &r.goals {
        println!("{}", g.line);
    }
}
