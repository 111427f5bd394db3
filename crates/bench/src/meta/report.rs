//! `bench meta`'s result: medians over the repeats, Tandem's ratios to etcd's, the goals, and
//! the table (or the JSON document).

use serde::Serialize;

use super::etcd::MEMBERS;
use super::{MetaArgs, System, CLIENT_COUNTS, NODES, VALUE_BYTES};
use crate::goal::{ratio, Goal, Op};
use crate::load::{self, RunFigures};

#[derive(Serialize)]
pub(super) struct Run {
    pub(super) repeat: u32,
    pub(super) system: System,
    pub(super) clients: usize,
    #[serde(flatten)]
    pub(super) figures: RunFigures,
}

#[derive(Serialize)]
struct Figures {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Tandem's figure over etcd's.
#[derive(Serialize)]
struct Ratios {
    writes_per_s: f64,
    p50: f64,
    p99: f64,
}

#[derive(Serialize)]
struct Row {
    clients: usize,
    tandem: Figures,
    etcd: Figures,
    ratio: Ratios,
}

#[derive(Serialize)]
pub(super) struct Report {
    benchmark: &'static str,
    tandem_nodes: u32,
    etcd_version: String,
    etcd_members: usize,
    value_bytes: usize,
    seconds_per_run: u64,
    repeats: u32,
    cores: usize,
    /// Medians over the repeats.
    rows: Vec<Row>,
    runs: Vec<Run>,
    goals: Vec<Goal>,
}

fn medians(runs: &[Run], system: System, clients: usize) -> Figures {
    let of = |f: fn(&RunFigures) -> f64| {
        let v: Vec<f64> =
            runs.iter().filter(|r| r.system == system && r.clients == clients).map(|r| f(&r.figures)).collect();
        load::median(&v)
    };
    Figures { writes_per_s: of(|f| f.writes_per_s), p50_ms: of(|f| f.p50_ms), p99_ms: of(|f| f.p99_ms) }
}

pub(super) fn report(args: &MetaArgs, etcd_version: String, runs: Vec<Run>) -> Report {
    let rows: Vec<Row> = CLIENT_COUNTS
        .iter()
        .map(|&clients| {
            let tandem = medians(&runs, System::Tandem, clients);
            let etcd = medians(&runs, System::Etcd, clients);
            let ratio = Ratios {
                writes_per_s: ratio(tandem.writes_per_s, etcd.writes_per_s),
                p50: ratio(tandem.p50_ms, etcd.p50_ms),
                p99: ratio(tandem.p99_ms, etcd.p99_ms),
            };
            Row { clients, tandem, etcd, ratio }
        })
        .collect();
    let mut goals = Vec::new();
    for row in &rows {
        let (suffix, writes_target) = match row.clients {
            1 => ("1-client".to_string(), 1.0),
            n => (format!("{n}-clients"), 1.5),
        };
        goals.push(Goal::ratio(
            &format!("meta-writes-{suffix}"),
            row.ratio.writes_per_s,
            "etcd",
            Op::AtLeast,
            writes_target,
        ));
    }
    for row in &rows {
        let suffix = match row.clients {
            1 => "1-client".to_string(),
            n => format!("{n}-clients"),
        };
        goals.push(Goal::ratio(&format!("meta-p50-{suffix}"), row.ratio.p50, "etcd", Op::AtMost, 1.0));
    }
    Report {
        benchmark: "meta",
        tandem_nodes: NODES,
        etcd_version,
        etcd_members: MEMBERS,
        value_bytes: VALUE_BYTES,
        seconds_per_run: args.seconds,
        repeats: args.repeats,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        rows,
        runs,
        goals,
    }
}

pub(super) fn print_table(r: &Report) {
    println!(
        "bench meta: {} B writes to distinct keys, sent to the leader; {} s per run, median of {} interleaved repeats; {} cores",
        r.value_bytes, r.seconds_per_run, r.repeats, r.cores
    );
    println!(
        "tandem: {} nodes (this binary); etcd {}: {} members; all on 127.0.0.1, fsync on",
        r.tandem_nodes, r.etcd_version, r.etcd_members
    );
    println!();
    println!("{:>7}  {:<7} {:>10} {:>9} {:>9}", "clients", "system", "writes/s", "p50 ms", "p99 ms");
    for row in &r.rows {
        for (name, f) in [("tandem", &row.tandem), ("etcd", &row.etcd)] {
            println!("{:>7}  {:<7} {:>10.0} {:>9.3} {:>9.3}", row.clients, name, f.writes_per_s, f.p50_ms, f.p99_ms);
        }
        println!(
            "{:>7}  {:<7} {:>9.2}x {:>8.2}x {:>8.2}x",
            row.clients, "ratio", row.ratio.writes_per_s, row.ratio.p50, row.ratio.p99
        );
    }
    println!();
    for g in &r.goals {
        println!("{}", g.line);
    }
}
