//! `tandem-bench`: the benchmarks behind `tandem bench ...`, each beside its reference in the
//! same run. The `tandem` binary flattens [`BenchCmd`] into its command line and calls [`run`];
//! the subcommands, flags, help text and output lines are part of the interface
//! (../../shared/design/INTERFACE.md), so they change only with it.
//!
//! It is not a test: nothing here asserts on speed. It runs only inside the `tandem` binary,
//! which it starts again (`std::env::current_exe`) for the nodes of a local cluster (`tandem up`,
//! `tandem down`) and for the peer of `bench transport` (the hidden `bench transport-peer`).
//!
//! The rules all of them follow are in ../../shared/design/BENCH.md: the reference runs on the
//! same machine in the same run, interleaved with Tandem; figures are medians of repeats; the
//! comparison is a ratio; the goal lines come last, in one fixed form that scripts read.
//!
//! - `goal.rs`: the goal lines every benchmark ends with, and ratios.
//! - `load.rs`: the client loop every system is driven by, and the latency figures.
//! - `cluster_api.rs`: a throwaway local Tandem cluster (the test kit's `Cluster`, stopped even
//!   on error or panic) and the HTTP calls the benchmarks make of it.
//! - `tools.rs`: the references' tools, found on PATH or installed with apt-get.
//! - `meta/`: `bench meta`, metadata writes against a 3-node cluster and a 3-member etcd
//!   (started, driven over gRPC and stopped by the benchmark).
//! - `transport/`: `bench transport`, the Mesh over TCP+TLS and QUIC beside plaintext TCP,
//!   between this process and a peer process it starts (the hidden `transport-peer`).
//! - `io/`: `bench io`, fio's NBD engine against a 3-way replicated volume beside the same
//!   jobs against `qemu-nbd --cache=writethrough` serving a local raw file.
//! - `iscsi.rs`: `bench iscsi`, libiscsi's iscsi-perf reading a 3-way replicated volume through
//!   a node's iSCSI portal (the primary's and a proxying node's) beside tgtd serving a raw file.
//! - `failover/`: `bench failover`, `kill -9` of a volume's primary under a write load from
//!   a minimal NBD client, repeated; the longest write stall against the failure timeout.
//! - `copy/`: `bench copy`, copy by token of a fully written 1 GiB and 16 GiB range on a
//!   3-node cluster beside `nbdcopy` of the same 1 GiB between two of its volumes over NBD.
//! - `scale/`: `bench scale`, how the metadata's costs grow with the number of volumes and
//!   hosts: write rates, memory, snapshot and catch-up, path recomputes, failover to hosts' maps.

mod cluster_api;
mod copy;
mod failover;
mod goal;
mod io;
mod iscsi;
mod load;
mod meta;
mod scale;
mod tools;
mod transport;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Small (256 B) metadata writes from 1 and 64 clients: a local 3-node Tandem cluster beside
    /// a 3-member etcd on 127.0.0.1, interleaved; prints writes/s, p50, p99 and the ratios.
    Meta(meta::MetaArgs),
    /// 1 MiB throughput and 4 KiB round trips between two processes over the Mesh on TCP+TLS
    /// and on QUIC, beside plaintext TCP, interleaved; plus the longest stall while the data
    /// layer switches between them under load.
    Transport(transport::TransportArgs),
    /// fio (NBD engine) against a 3-way replicated volume on a local 3-node cluster, beside the
    /// same jobs against qemu-nbd --cache=writethrough serving a local raw file, interleaved:
    /// 4 KiB random writes at queue depth 1 and 32, 1 MiB sequential writes, 4 KiB random reads.
    Io(io::IoArgs),
    /// iscsi-perf (libiscsi) reads from a 3-way replicated volume through the primary's iSCSI
    /// portal and through another node's, beside tgtd serving a local raw file, interleaved:
    /// 4 KiB random reads at queue depth 32 and 1, 64 KiB sequential reads.
    Iscsi(iscsi::IscsiArgs),
    /// Kill -9 a volume's primary under a write load that goes through another node, N times:
    /// the longest write stall, failed writes, the new primary, the time to rejoin.
    Failover(failover::FailoverArgs),
    /// Copy by token (make a token of a range, write it to another volume) of a fully written
    /// 1 GiB and 16 GiB range on a local 3-node cluster, beside nbdcopy of the same 1 GiB between
    /// two volumes of the cluster over NBD, interleaved; times the token and the copy apart,
    /// says whether each copy was by reference, and compares the bytes after.
    Copy(copy::CopyArgs),
    /// Creates volumes, hosts and connections on a local 3-node cluster in steps (default 1,000
    /// then 10,000 volumes, 100 then 1,000 hosts) and reports, per step, the metadata write
    /// rates, the leader's memory, its snapshot and a new node's catch-up, the path manager's
    /// recompute time, the delay from a failover to every watching host's map; and how each
    /// grows with the state.
    Scale(scale::ScaleArgs),
    /// The peer process of `bench transport`; started by the benchmark, not by hand.
    #[command(hide = true)]
    TransportPeer(transport::PeerArgs),
}

/// Runs one benchmark to its end, or until Ctrl-C.
pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    // On Ctrl-C the benchmark's future is dropped, so the guards it holds stop the processes
    // it started (the nodes and etcd run in their own process groups and do not get the signal).
    let bench = async {
        match cmd {
            BenchCmd::Meta(args) => meta::run(args).await,
            BenchCmd::Transport(args) => transport::run(args).await,
            BenchCmd::TransportPeer(args) => transport::peer(args).await,
            BenchCmd::Io(args) => io::run(args).await,
            BenchCmd::Iscsi(args) => iscsi::run(args).await,
            BenchCmd::Failover(args) => failover::run(args).await,
            BenchCmd::Scale(args) => scale::run(args).await,
            BenchCmd::Copy(args) => copy::run(args).await,
        }
    };
    let interrupted = async {
        // Without a Ctrl-C handler the benchmark still runs; it just cannot clean up on Ctrl-C.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = bench => r,
        () = interrupted => Err(anyhow::anyhow!("interrupted; stopped what the benchmark had started")),
    }
}
