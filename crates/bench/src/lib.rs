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
//! - `meta.rs`: `bench meta`, metadata writes against a 3-node cluster and a 3-member etcd.
//! - `load.rs`: the client loop every system is driven by, and the latency figures.
//! - `local_cluster.rs`: a throwaway local Tandem cluster, stopped even on error.
//! - `etcd.rs`: the etcd reference: install, start, a minimal gRPC client, stop.
//! - `transport.rs`: `bench transport`, the Mesh over TCP+TLS and QUIC beside plaintext TCP,
//!   between this process and a peer process it starts (the hidden `transport-peer`).
//! - `io.rs`: `bench io`, fio's NBD engine against a 3-way replicated volume beside the same
//!   jobs against `qemu-nbd --cache=writethrough` serving a local raw file.
//! - `failover.rs`: `bench failover`, `kill -9` of a volume's primary under a write load from
//!   a minimal NBD client, repeated; the longest write stall against the failure timeout.

mod etcd;
mod failover;
mod io;
mod load;
mod local_cluster;
mod meta;
mod transport;

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;

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
    /// Kill -9 a volume's primary under a write load that goes through another node, N times:
    /// the longest write stall, failed writes, the new primary, the time to rejoin.
    Failover(failover::FailoverArgs),
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
            BenchCmd::Failover(args) => failover::run(args).await,
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

/// How a goal compares its measured value with its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::AtLeast => ">=",
            Op::AtMost => "<=",
        }
    }
}

/// One goal of a benchmark: a ratio of Tandem's figure to its reference's, or an absolute figure.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub name: String,
    /// Tandem's figure divided by the reference's (or the absolute figure), rounded to the
    /// decimals printed.
    pub measured: f64,
    /// What the ratio is relative to, e.g. `etcd`; absent for an absolute figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The unit of an absolute figure and its target, e.g. `ms`; absent for a ratio or a count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub op: Op,
    pub target: f64,
    pub met: bool,
    /// The goal as printed: `goal <name>: <measured> (target <op> <value>) met|missed`.
    pub line: String,
}

impl Goal {
    pub fn ratio(name: &str, ratio: f64, reference: &str, op: Op, target: f64) -> Goal {
        // Judge the rounded value, so that the printed figure and the verdict never disagree.
        let measured = (ratio * 100.0).round() / 100.0;
        let met = judge(measured, op, target);
        let line = format!(
            "goal {name}: {measured:.2}x {reference} (target {} {}x) {}",
            op.symbol(),
            target_text(target),
            verdict(met)
        );
        Goal {
            name: name.to_string(),
            measured,
            reference: Some(reference.to_string()),
            unit: None,
            op,
            target,
            met,
            line,
        }
    }

    /// A goal on an absolute figure such as a count, printed with `decimals` decimals and
    /// judged on the printed value, e.g. `goal x-failed-requests: 0 (target <= 0) met`.
    pub fn absolute(name: &str, figure: f64, decimals: u8, op: Op, target: f64) -> Goal {
        let scale = 10f64.powi(i32::from(decimals));
        let measured = (figure * scale).round() / scale;
        let met = judge(measured, op, target);
        let d = usize::from(decimals);
        let line = format!("goal {name}: {measured:.d$} (target {} {target:.d$}) {}", op.symbol(), verdict(met));
        Goal { name: name.to_string(), measured, reference: None, unit: None, op, target, met, line }
    }

    /// An absolute goal on a figure with a unit, e.g.
    /// `goal failover-write-stall: 3120 ms (target <= 3750 ms) met`.
    pub fn absolute_in(name: &str, figure: f64, decimals: u8, unit: &str, op: Op, target: f64) -> Goal {
        let mut g = Goal::absolute(name, figure, decimals, op, target);
        let d = usize::from(decimals);
        g.line = format!(
            "goal {name}: {:.d$} {unit} (target {} {target:.d$} {unit}) {}",
            g.measured,
            op.symbol(),
            verdict(g.met)
        );
        g.unit = Some(unit.to_string());
        g
    }
}

fn judge(measured: f64, op: Op, target: f64) -> bool {
    match op {
        Op::AtLeast => measured >= target,
        Op::AtMost => measured <= target,
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

/// A ratio target with one decimal, or two when it needs them (`1.5`, `0.25`).
fn target_text(target: f64) -> String {
    let mut s = format!("{target:.2}");
    if s.ends_with('0') && !s.ends_with(".0") {
        s.pop();
    }
    s
}

/// Runs apt-get (references that are missing are installed by the benchmark itself).
async fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    // apt-get's output goes to stderr, so that stdout holds only the benchmark's result.
    let status = tokio::process::Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .stdout(std::io::stderr())
        .stderr(std::io::stderr())
        .status()
        .await
        .with_context(|| format!("cannot run apt-get {}", args.join(" ")))?;
    if !status.success() {
        anyhow::bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goal_line_has_the_scripted_form() {
        let g = Goal::ratio("meta-writes-64-clients", 1.6213, "etcd", Op::AtLeast, 1.5);
        assert_eq!(g.line, "goal meta-writes-64-clients: 1.62x etcd (target >= 1.5x) met");
        let g = Goal::ratio("meta-p50-1-client", 1.2, "etcd", Op::AtMost, 1.0);
        assert_eq!(g.line, "goal meta-p50-1-client: 1.20x etcd (target <= 1.0x) missed");
    }

    #[test]
    fn ratio_targets_keep_a_second_decimal_they_need() {
        let g = Goal::ratio("transport-quic-throughput", 0.3, "plaintext", Op::AtLeast, 0.25);
        assert_eq!(g.line, "goal transport-quic-throughput: 0.30x plaintext (target >= 0.25x) met");
        let g = Goal::ratio("transport-tls-rtt", 2.004, "plaintext", Op::AtMost, 2.0);
        assert_eq!(g.line, "goal transport-tls-rtt: 2.00x plaintext (target <= 2.0x) met");
    }

    #[test]
    fn absolute_goal_line_has_the_scripted_form() {
        let g = Goal::absolute("transport-switch-failed-requests", 0.0, 0, Op::AtMost, 0.0);
        assert_eq!(g.line, "goal transport-switch-failed-requests: 0 (target <= 0) met");
        assert!(!Goal::absolute("f", 3.0, 0, Op::AtMost, 0.0).met);
    }

    #[test]
    fn absolute_goal_with_a_unit_names_it_twice() {
        let g = Goal::absolute_in("failover-write-stall", 3120.4, 0, "ms", Op::AtMost, 3750.0);
        assert_eq!(g.line, "goal failover-write-stall: 3120 ms (target <= 3750 ms) met");
        assert!(!Goal::absolute_in("f", 3750.6, 0, "ms", Op::AtMost, 3750.0).met);
    }

    #[test]
    fn goal_is_judged_on_the_printed_figure() {
        assert!(Goal::ratio("g", 0.996, "etcd", Op::AtLeast, 1.0).met);
        assert!(!Goal::ratio("g", 0.994, "etcd", Op::AtLeast, 1.0).met);
    }
}
