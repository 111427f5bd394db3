//! `tandem bench ...`: benchmarks, each beside its reference in the same run.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCmd {}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {}
}
