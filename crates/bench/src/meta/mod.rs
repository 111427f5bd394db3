//! `tandem bench meta`: small metadata writes against a local 3-node Tandem cluster, beside a
//! 3-member etcd on the same machine in the same run (see ../../shared/design/BENCH.md).
//!
//! Both systems are driven by the one client loop of `load.rs`: 1 client, then 64, each doing
//! sequential 256-byte puts to distinct keys, sent to the leader. The four runs (Tandem 1, etcd 1,
//! Tandem 64, etcd 64) are interleaved within each repeat so that the machine's noise hits both
//! alike; every figure is the median over the repeats, and the ratios are of those medians.
//! Every repeat's rate is shown too, with its spread (min/median/max), and Tandem's last repeat
//! is compared with its first (`meta-rate-flat-*`): a store whose cost per write grows with
//! its state slows down from one repeat to the next, since every run adds keys. `--keys N`
//! preloads both systems with N keys first, so that the runs write against a large state.
//!
//! - `etcd.rs`: the 3-member etcd reference; `etcd_client.rs`: its gRPC client.
//! - `tandem_client.rs`: Tandem's side of the client loop (settings over the HTTP API).
//! - `report.rs`: the medians, ratios, goals and the table.

mod etcd;
mod etcd_client;
mod report;
pub(crate) mod tandem_client;

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use serde::Serialize;

use self::etcd::EtcdCluster;
use self::etcd_client::EtcdClient;
use self::report::{print_table, report, Preload, Run};
use self::tandem_client::TandemClient;
use crate::cluster_api::BenchCluster;
use crate::load;

const NODES: u32 = 3;
/// "Small metadata": about the size of a volume or host record.
const VALUE_BYTES: usize = 256;
const CLIENT_COUNTS: [usize; 2] = [1, 64];
/// Bounds on the flags, and so on the run time and on the latencies held in memory.
const REPEATS_MAX: i64 = 100;
const SECONDS_MAX: u64 = 600;
/// The largest preload: a million 256-byte keys is about 300 MB of state on each system.
const KEYS_MAX: u64 = 1_000_000;
/// Clients that preload the keys, each one put in flight, as fast as they go.
const PRELOAD_CLIENTS: usize = 64;

#[derive(Args)]
pub struct MetaArgs {
    /// How many times the four runs are repeated; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    pub(super) repeats: u32,
    /// How long each run writes, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=SECONDS_MAX))]
    pub(super) seconds: u64,
    /// Before the runs, put this many distinct 256-byte keys into each system (64 clients, as
    /// fast as they go), so that the runs write against a large state; 0: none.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=KEYS_MAX))]
    pub(super) keys: u64,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum System {
    Tandem,
    Etcd,
}

impl System {
    pub(super) fn name(self) -> &'static str {
        match self {
            System::Tandem => "tandem",
            System::Etcd => "etcd",
        }
    }
}

pub async fn run(args: MetaArgs) -> anyhow::Result<()> {
    let etcd_bin = etcd::ensure_installed().await?;
    let etcd_version = etcd::version(&etcd_bin)?;
    eprintln!("starting a {NODES}-node Tandem cluster (tandem up --detach)");
    let tandem = BenchCluster::start(NODES).await?;
    eprintln!("  in {}", tandem.dir().display());
    eprintln!("starting a {}-member etcd {etcd_version} ({}) on 127.0.0.1", etcd::MEMBERS, etcd_bin.display());
    let etcd = EtcdCluster::start(&etcd_bin).await?;
    let measured = async {
        let preload = preload(&args, &tandem, &etcd).await?;
        let runs = measure(&args, &tandem, &etcd).await?;
        anyhow::Ok((preload, runs))
    }
    .await;
    eprintln!("stopping etcd and the Tandem cluster");
    drop(etcd);
    let stopped = tandem.stop().await;
    let (preload, runs) = measured?;
    stopped?;
    let report = report(&args, etcd_version, preload, runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn value() -> Bytes {
    Bytes::from((0..VALUE_BYTES).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>())
}

/// `--keys N`: N distinct keys into Tandem, then into etcd (one system at a time, so that
/// neither's rate is the other's loss), each with [`PRELOAD_CLIENTS`] clients.
async fn preload(args: &MetaArgs, tandem: &BenchCluster, etcd: &EtcdCluster) -> anyhow::Result<Option<Preload>> {
    if args.keys == 0 {
        return Ok(None);
    }
    let prefix = "bench.preload";
    eprintln!("preloading {} keys of {VALUE_BYTES} B into Tandem ({PRELOAD_CLIENTS} clients)", args.keys);
    let leader = tandem.leader_api().await?;
    let cs =
        (0..PRELOAD_CLIENTS).map(|_| TandemClient::new(leader, tandem.token())).collect::<anyhow::Result<Vec<_>>>()?;
    let t = load::fill(cs, args.keys, prefix, value()).await.context("preloading Tandem")?;
    eprintln!("  tandem: {} keys in {:.1} s, {:.0} keys/s", t.keys, t.elapsed_s, t.keys_per_s);
    eprintln!("preloading {} keys of {VALUE_BYTES} B into etcd ({PRELOAD_CLIENTS} clients)", args.keys);
    let leader = etcd.leader_addr().await?;
    let cs = futures::future::try_join_all((0..PRELOAD_CLIENTS).map(|_| EtcdClient::connect(leader))).await?;
    let e = load::fill(cs, args.keys, prefix, value()).await.context("preloading etcd")?;
    eprintln!("  etcd: {} keys in {:.1} s, {:.0} keys/s", e.keys, e.elapsed_s, e.keys_per_s);
    Ok(Some(Preload { keys: args.keys, value_bytes: VALUE_BYTES, tandem: t, etcd: e }))
}

async fn measure(args: &MetaArgs, tandem: &BenchCluster, etcd: &EtcdCluster) -> anyhow::Result<Vec<Run>> {
    let duration = Duration::from_secs(args.seconds);
    let value = value();
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
                        let cs = (0..clients)
                            .map(|_| TandemClient::new(leader, tandem.token()))
                            .collect::<anyhow::Result<Vec<_>>>()?;
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
