//! `tandem bench meta`: small metadata writes against a local 3-node Tandem cluster, beside a
//! 3-member etcd on the same machine in the same run (see ../../shared/design/BENCH.md).
//!
//! Both systems are driven by the one client loop of `load.rs`: 1 client, then 64, each doing
//! sequential 256-byte puts to distinct keys, sent to the leader. The four runs (Tandem 1, etcd 1,
//! Tandem 64, etcd 64) are interleaved within each repeat so that the machine's noise hits both
//! alike; every figure is the median over the repeats, and the ratios are of those medians.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use serde::Serialize;

use crate::etcd::{self, EtcdClient, EtcdCluster};
use crate::load::{self, RunFigures};
use crate::local_cluster::{LocalCluster, TandemClient};
use crate::{Goal, Op};

const NODES: u32 = 3;
/// "Small metadata": about the size of a volume or host record.
const VALUE_BYTES: usize = 256;
const CLIENT_COUNTS: [usize; 2] = [1, 64];
/// Bounds on the flags, and so on the run time and on the latencies held in memory.
const REPEATS_MAX: i64 = 100;
const SECONDS_MAX: u64 = 600;

#[derive(Args)]
pub struct MetaArgs {
    /// How many times the four runs are repeated; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    repeats: u32,
    /// How long each run writes, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=SECONDS_MAX))]
    seconds: u64,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum System {
    Tandem,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Tandem => "tandem",
            System::Etcd => "etcd",
        }
    }
}

#[derive(Serialize)]
struct Run {
    repeat: u32,
    system: System,
    clients: usize,
    #[serde(flatten)]
    figures: RunFigures,
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
struct Report {
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

pub async fn run(args: MetaArgs) -> anyhow::Result<()> {
    let etcd_bin = etcd::ensure_installed().await?;
    let etcd_version = etcd::version(&etcd_bin)?;
    eprintln!("starting a {NODES}-node Tandem cluster (tandem up --detach)");
    let tandem = LocalCluster::start(NODES).await?;
    eprintln!("  in {}", tandem.dir().display());
    eprintln!("starting a {}-member etcd {etcd_version} ({}) on 127.0.0.1", etcd::MEMBERS, etcd_bin.display());
    let etcd = EtcdCluster::start(&etcd_bin).await?;
    let measured = measure(&args, &tandem, &etcd).await;
    eprintln!("stopping etcd and the Tandem cluster");
    drop(etcd);
    let stopped = tandem.stop().await;
    let runs = measured?;
    stopped?;
    let report = report(&args, etcd_version, runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure(args: &MetaArgs, tandem: &LocalCluster, etcd: &EtcdCluster) -> anyhow::Result<Vec<Run>> {
    let duration = Duration::from_secs(args.seconds);
    let value = Bytes::from((0..VALUE_BYTES).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>());
    let mut runs = Vec::new();
    for repeat in 1..=args.repeats {
        for clients in CLIENT_COUNTS {
            for system in [System::Tandem, System::Etcd] {
                // Distinct keys in every run: each put creates a key, on both systems.
                let prefix = format!("bench.r{repeat}.{}.n{clients}", system.name());
                let what = format!("repeat {repeat}/{}: {} with {clients} client(s)", args.repeats, system.name());
                let figures = match system {
                    System::Tandem => {
                        let leader = tandem.leader_api().await?;
                        let cs = (0..clients).map(|_| TandemClient::new(leader)).collect::<anyhow::Result<Vec<_>>>()?;
                        load::run(cs, duration, &prefix, value.clone()).await
                    }
                    System::Etcd => {
                        let leader = etcd.leader_addr().await?;
                        let cs =
                            futures::future::try_join_all((0..clients).map(|_| EtcdClient::connect(leader))).await?;
                        load::run(cs, duration, &prefix, value.clone()).await
                    }
                }
                .with_context(|| what.clone())?;
                eprintln!(
                    "{what}: {:.0} writes/s, p50 {:.3} ms, p99 {:.3} ms",
                    figures.writes_per_s, figures.p50_ms, figures.p99_ms
                );
                runs.push(Run { repeat, system, clients, figures });
            }
        }
    }
    Ok(runs)
}

fn medians(runs: &[Run], system: System, clients: usize) -> Figures {
    let of = |f: fn(&RunFigures) -> f64| {
        let v: Vec<f64> =
            runs.iter().filter(|r| r.system == system && r.clients == clients).map(|r| f(&r.figures)).collect();
        load::median(&v)
    };
    Figures { writes_per_s: of(|f| f.writes_per_s), p50_ms: of(|f| f.p50_ms), p99_ms: of(|f| f.p99_ms) }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn report(args: &MetaArgs, etcd_version: String, runs: Vec<Run>) -> Report {
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
        etcd_members: etcd::MEMBERS,
        value_bytes: VALUE_BYTES,
        seconds_per_run: args.seconds,
        repeats: args.repeats,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        rows,
        runs,
        goals,
    }
}

fn print_table(r: &Report) {
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
