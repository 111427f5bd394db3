//! `tandem bench transport`: node-to-node messaging over the Mesh (mutual TLS) on TCP and on
//! QUIC, beside plaintext TCP between the same two processes, in the same run (see
//! ../../shared/design/BENCH.md).
//!
//! The benchmark process is node 1. It writes a throwaway CA and certificates for nodes 1 and 2
//! into a temporary dir and starts this binary again as `bench transport-peer` (node 2): a Mesh
//! whose handler echoes payloads of up to 4 KiB and answers larger ones with an empty reply
//! (so throughput is one-directional), and a plaintext TCP server with the same rule and
//! length-prefixed frames (u32 BE length + payload). The peer prints its two addresses as one
//! JSON line on stdout and runs until its stdin closes; a guard kills it if the benchmark ends
//! any other way.
//!
//! Node 1 has one Mesh. Before each Mesh run its data layer is switched to the kind measured,
//! and the run starts only once both data links (Bulk and Replication) have exactly one pipe,
//! of that kind, so the measured layer is the only one carrying traffic. Every system is
//! driven by the client loop of `load.rs`:
//! - throughput: 1 MiB messages, 8 senders (8 in flight) on the Bulk channel; plaintext uses
//!   one TCP connection per sender;
//! - round trip: 4 KiB request and 4 KiB reply, 1 in flight, on the Replication channel.
//!
//! Each repeat runs plaintext, tcp+tls, quic for throughput, then the same for the round trip;
//! figures are medians over the repeats and the ratios are of those medians. Each repeat then
//! runs the switch test: 4 KiB requests pipelined 32 deep on the Replication channel, once with
//! no switch and once flipping the data layer QUIC<->TCP every 300 ms; the figure is the longest
//! gap between two consecutive completions, the worst over the repeats.
//!
//! - `mesh_setup.rs`: the certificates and a node's Mesh, for both processes.
//! - `peer.rs`: the peer process; `peer_process.rs`: the benchmark's guard on it.
//! - `plaintext.rs`: the plaintext framing; `clients.rs`: the clients the runs drive.
//! - `switch.rs`: the switch test; `report.rs`: the medians, ratios, goals and the table.

mod clients;
mod mesh_setup;
mod peer;
mod peer_process;
mod plaintext;
mod report;
mod switch;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use serde::Serialize;
use tandem_transport::link::Mesh;
use tandem_transport::Transport;
use tandem_types::NodeId;
use tandem_types::{Channel, TransportKind};

use self::clients::{settle, MeshClient, PlainClient};
use self::mesh_setup::{start_mesh, write_certificates};
pub use self::peer::{peer, PeerArgs};
use self::peer_process::PeerProcess;
use self::report::{print_table, report, Run};
use self::switch::{stall_run, StallRun};
use crate::load::{self, RunFigures};

const CLIENT_ID: NodeId = NodeId(1);
const PEER_ID: NodeId = NodeId(2);
const LOOPBACK: &str = "127.0.0.1:0";

const MIB: usize = 1024 * 1024;
/// Throughput messages; the peer answers them with an empty reply.
const BULK_BYTES: usize = MIB;
const BULK_IN_FLIGHT: usize = 8;
/// Round-trip messages, request and reply.
const SMALL_BYTES: usize = 4 * 1024;

/// The switch test: requests in flight, how often the data layer flips.
const SWITCH_IN_FLIGHT: usize = 32;
const SWITCH_INTERVAL: Duration = Duration::from_millis(300);

const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Bounds on the flags, and so on the run time and on the latencies held in memory.
const REPEATS_MAX: i64 = 100;
const SECONDS_MAX: u64 = 600;

#[derive(Args)]
pub struct TransportArgs {
    /// How many times the runs are repeated; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    repeats: u32,
    /// How long each run sends, in seconds (also the length of each switch-test run).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=SECONDS_MAX))]
    seconds: u64,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum System {
    #[serde(rename = "plaintext")]
    Plaintext,
    #[serde(rename = "tcp+tls")]
    TcpTls,
    #[serde(rename = "quic")]
    Quic,
}

const SYSTEMS: [System; 3] = [System::Plaintext, System::TcpTls, System::Quic];

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Plaintext => "plaintext",
            System::TcpTls => "tcp+tls",
            System::Quic => "quic",
        }
    }

    fn kind(self) -> Option<TransportKind> {
        match self {
            System::Plaintext => None,
            System::TcpTls => Some(TransportKind::Tcp),
            System::Quic => Some(TransportKind::Quic),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Test {
    Throughput,
    Rtt,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Throughput => "throughput",
            Test::Rtt => "round trip",
        }
    }
}

pub async fn run(args: TransportArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("tandem-bench-transport-")
        .tempdir()
        .context("cannot make a temporary dir for the certificates")?;
    write_certificates(dir.path())?;
    eprintln!("starting the peer process (node {PEER_ID})");
    let mut peer = PeerProcess::start(dir.path()).await?;
    eprintln!("  mesh on {}, plaintext on {}", peer.addrs.mesh, peer.addrs.plaintext);
    let (mesh, _) = start_mesh(dir.path(), CLIENT_ID).await?;
    mesh.set_peer_addr(PEER_ID, peer.addrs.mesh);
    let measured = measure(&args, &mesh, peer.addrs.plaintext).await;
    mesh.shutdown();
    let stopped = peer.stop().await;
    let (runs, stall_runs) = measured?;
    stopped?;
    let report = report(&args, runs, stall_runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure_run(
    test: Test,
    system: System,
    duration: Duration,
    mesh: &Mesh,
    plaintext: SocketAddr,
) -> anyhow::Result<RunFigures> {
    let (channel, bytes, senders, reply_bytes) = match test {
        Test::Throughput => (Channel::Bulk, BULK_BYTES, BULK_IN_FLIGHT, 0),
        Test::Rtt => (Channel::Replication, SMALL_BYTES, 1, SMALL_BYTES),
    };
    let payload = Bytes::from((0..bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let prefix = format!("{}.{}", test.name(), system.name());
    match system.kind() {
        None => {
            let clients =
                futures::future::try_join_all((0..senders).map(|_| PlainClient::connect(plaintext, reply_bytes)))
                    .await?;
            load::run(clients, duration, &prefix, payload).await
        }
        Some(kind) => {
            settle(mesh, kind).await?;
            let clients = (0..senders).map(|_| MeshClient { mesh: mesh.clone(), channel, reply_bytes }).collect();
            load::run(clients, duration, &prefix, payload).await
        }
    }
}

async fn measure(
    args: &TransportArgs,
    mesh: &Mesh,
    plaintext: SocketAddr,
) -> anyhow::Result<(Vec<Run>, Vec<StallRun>)> {
    let duration = Duration::from_secs(args.seconds);
    let mut runs = Vec::new();
    let mut stall_runs = Vec::new();
    for repeat in 1..=args.repeats {
        for test in [Test::Throughput, Test::Rtt] {
            for system in SYSTEMS {
                let what = format!("repeat {repeat}/{}: {} {}", args.repeats, system.name(), test.name());
                let figures =
                    measure_run(test, system, duration, mesh, plaintext).await.with_context(|| what.clone())?;
                let run = Run::new(repeat, test, system, &figures);
                match test {
                    Test::Throughput => eprintln!("{what}: {:.0} MiB/s", run.mib_per_s),
                    Test::Rtt => eprintln!("{what}: p50 {:.1} µs, p99 {:.1} µs", run.p50_us, run.p99_us),
                }
                runs.push(run);
            }
        }
        // Alternate the starting layer, so that both layers' baselines are seen.
        let start = if repeat % 2 == 1 { TransportKind::Tcp } else { TransportKind::Quic };
        for switching in [false, true] {
            let what = format!(
                "repeat {repeat}/{}: {SWITCH_IN_FLIGHT} x 4 KiB in flight from {start}, {}",
                args.repeats,
                if switching {
                    format!("switching every {} ms", SWITCH_INTERVAL.as_millis())
                } else {
                    "no switch".into()
                }
            );
            let r = stall_run(mesh, repeat, start, switching, duration).await.with_context(|| what.clone())?;
            eprintln!(
                "{what}: longest stall {:.1} ms, {:.0} requests/s, {} switches, {} failed{}",
                r.longest_stall_ms,
                r.requests_per_s,
                r.switches,
                r.failed,
                r.errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
            );
            stall_runs.push(r);
        }
    }
    Ok((runs, stall_runs))
}
