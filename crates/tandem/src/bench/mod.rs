//! `tandem bench ...`: benchmarks, each beside its reference in the same run.
//!
//! The rules all of them follow are in ../../shared/design/BENCH.md: the reference runs on the
//! same machine in the same run, interleaved with Tandem; figures are medians of repeats; the
//! comparison is a ratio; the goal lines come last, in one fixed form that scripts read.
//!
//! - `meta.rs`: `bench meta`, metadata writes against a 3-node cluster and a 3-member etcd.
//! - `load.rs`: the client loop every system is driven by, and the latency figures.
//! - `local_cluster.rs`: a throwaway local Tandem cluster, stopped even on error.
//! - `etcd.rs`: the etcd reference: install, start, a minimal gRPC client, stop.

mod etcd;
mod load;
mod local_cluster;
mod meta;

use clap::Subcommand;
use serde::Serialize;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Small (256 B) metadata writes from 1 and 64 clients: a local 3-node Tandem cluster beside
    /// a 3-member etcd on 127.0.0.1, interleaved; prints writes/s, p50, p99 and the ratios.
    Meta(meta::MetaArgs),
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    // On Ctrl-C the benchmark's future is dropped, so the guards it holds stop the processes
    // it started (the nodes and etcd run in their own process groups and do not get the signal).
    let bench = async {
        match cmd {
            BenchCmd::Meta(args) => meta::run(args).await,
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

/// One goal of a benchmark, as a ratio of Tandem's figure to its reference's.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub name: String,
    /// Tandem's figure divided by the reference's, rounded to the two decimals printed.
    pub measured: f64,
    /// What the ratio is relative to, e.g. `etcd`.
    pub reference: String,
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
        let met = match op {
            Op::AtLeast => measured >= target,
            Op::AtMost => measured <= target,
        };
        let line = format!(
            "goal {name}: {measured:.2}x {reference} (target {} {target:.1}x) {}",
            op.symbol(),
            if met { "met" } else { "missed" }
        );
        Goal { name: name.to_string(), measured, reference: reference.to_string(), op, target, met, line }
    }
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
    fn goal_is_judged_on_the_printed_figure() {
        assert!(Goal::ratio("g", 0.996, "etcd", Op::AtLeast, 1.0).met);
        assert!(!Goal::ratio("g", 0.994, "etcd", Op::AtLeast, 1.0).met);
    }
}
