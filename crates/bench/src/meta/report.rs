//! `bench meta`'s result: medians over the repeats, Tandem's ratios to etcd's, the goals, and
//! the table (or the JSON document).

use serde::Serialize;

use super::etcd::MEMBERS;
use super::{MetaArgs, System, CLIENT_COUNTS, NODES, VALUE_BYTES};
use crate::goal::{ratio, Goal, Op};
use crate::load::{self, FillFigures, RunFigures};

/// `meta-rate-flat-*`: Tandem's last repeat may be at most 10% below its first.
const RATE_FLAT_TARGET: f64 = 0.9;

/// `--keys N`: what preloading each system took.
#[derive(Serialize)]
pub(super) struct Preload {
    pub(super) keys: u64,
    pub(super) value_bytes: usize,
    pub(super) tandem: FillFigures,
    pub(super) etcd: FillFigures,
}

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

/// One system's writes/s in every repeat, in order, and their spread.
#[derive(Serialize)]
struct Repeats {
    writes_per_s: Vec<f64>,
    min: f64,
    median: f64,
    max: f64,
    /// The last repeat's rate over the first's (1 with one repeat).
    last_over_first: f64,
}

#[derive(Serialize)]
struct Row {
    clients: usize,
    tandem: Figures,
    etcd: Figures,
    ratio: Ratios,
    tandem_repeats: Repeats,
    etcd_repeats: Repeats,
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
    /// `--keys N`: what preloading took, before the runs.
    preload: Option<Preload>,
    /// Medians over the repeats, and every repeat's rate.
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

fn repeats(runs: &[Run], system: System, clients: usize) -> Repeats {
    let mut in_order: Vec<&Run> = runs.iter().filter(|r| r.system == system && r.clients == clients).collect();
    in_order.sort_by_key(|r| r.repeat);
    let writes_per_s: Vec<f64> = in_order.iter().map(|r| r.figures.writes_per_s).collect();
    let min = writes_per_s.iter().copied().fold(f64::INFINITY, f64::min);
    let max = writes_per_s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let last_over_first = match (writes_per_s.first(), writes_per_s.last()) {
        (Some(&first), Some(&last)) => ratio(last, first),
        _ => f64::NAN,
    };
    Repeats { median: load::median(&writes_per_s), min, max, last_over_first, writes_per_s }
}

pub(super) fn report(args: &MetaArgs, etcd_version: String, preload: Option<Preload>, runs: Vec<Run>) -> Report {
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
            let tandem_repeats = repeats(&runs, System::Tandem, clients);
            let etcd_repeats = repeats(&runs, System::Etcd, clients);
            Row { clients, tandem, etcd, ratio, tandem_repeats, etcd_repeats }
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
    // One flatness goal per client count: at 1 client a run shows the cost of one write end to
    // end, at 64 the cost per write once writes are batched; a cost that grows with the state
    // can show in either alone (a per-entry cost hides behind batching, a per-batch one does
    // not). Judged on Tandem only: etcd's repeats are printed beside it as the machine's noise.
    for row in &rows {
        let suffix = match row.clients {
            1 => "1-client".to_string(),
            n => format!("{n}-clients"),
        };
        goals.push(Goal::labelled(
            &format!("meta-rate-flat-{suffix}"),
            "last/first",
            row.tandem_repeats.last_over_first,
            Op::AtLeast,
            RATE_FLAT_TARGET,
        ));
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
        preload,
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
    if let Some(p) = &r.preload {
        println!(
            "preloaded {} keys of {} B with {} clients each: tandem {:.0} keys/s ({:.1} s), etcd {:.0} keys/s ({:.1} s)",
            p.keys, p.value_bytes, p.tandem.clients, p.tandem.keys_per_s, p.tandem.elapsed_s, p.etcd.keys_per_s, p.etcd.elapsed_s
        );
    }
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
    println!("writes/s of every repeat, in order, and their spread:");
    println!(
        "{:>7}  {:<7} {:>8} {:>8} {:>8} {:>10}  repeats",
        "clients", "system", "min", "median", "max", "last/first"
    );
    for row in &r.rows {
        for (name, rep) in [("tandem", &row.tandem_repeats), ("etcd", &row.etcd_repeats)] {
            let each: Vec<String> = rep.writes_per_s.iter().map(|w| format!("{w:.0}")).collect();
            println!(
                "{:>7}  {:<7} {:>8.0} {:>8.0} {:>8.0} {:>10.2}  {}",
                row.clients,
                name,
                rep.min,
                rep.median,
                rep.max,
                rep.last_over_first,
                each.join(" ")
            );
        }
    }
    println!();
    for g in &r.goals {
        println!("{}", g.line);
    }
}
