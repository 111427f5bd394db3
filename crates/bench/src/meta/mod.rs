//! `tandem bench meta`: small metadata writes against a local 3-node Tandem cluster, beside a
//! 3-member etcd on the same machine in the same run (see ../../shared/design/BENCH.md).
//!
//! Both systems are driven by the one client loop of `load.rs`: 1 client, then 64, each doing
//! sequential 256-byte puts to distinct keys, sent to the leader. The four runs (Tandem 1, etcd 1,
//! Tandem 64, etcd 64) are interleaved within each repeat so that the machine's noise hits both
//! alike; every figure is the median over the repeats, and the ratios are of those medians.
//!
//! - `etcd.rs`: the 3-member etcd reference; `etcd_client.rs`: its gRPC client.
//! - `tandem_client.rs`: Tandem's side of the client loop (settings over the HTTP API).
//! - `report.rs`: the medians, ratios, goals and the table.

mod etcd;
mod etcd_client;
mod report;
mod tandem_client;

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use serde::Serialize;

use self::etcd::EtcdCluster;
use self::etcd_client::EtcdClient;
use self::report::{print_table, report, Run};
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

#[derive(Args)]
pub struct MetaArgs {
    /// How many times the four runs are repeated; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    pub(super) repeats: u32,
    /// How long each run writes, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=SECONDS_MAX))]
    pub(super) seconds: u64,
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

async fn measure(args: &MetaArgs, tandem: &BenchCluster, etcd: &EtcdCluster) -> anyhow::Result<Vec<Run>> {
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
