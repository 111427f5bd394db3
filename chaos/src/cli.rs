//! `tandem chaos list` and `tandem chaos run`: the arguments, the seeds, Ctrl-C, and one line
//! per run with its verdict (the full report is in `--out`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Args, Subcommand};

use crate::run::{run, RunOptions};
use crate::scenario::{self, Scenario, Timing};
use crate::verdict::{self, Verdict};
use crate::world::NOT_A_FAILPOINTS_BUILD;

#[derive(Subcommand, Debug)]
pub enum ChaosCmd {
    /// The scenarios and the nemeses they draw from.
    List,
    /// Runs scenarios against real nodes in network namespaces; writes each run's history,
    /// report and timeline picture under --out.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A scenario to run (repeatable); see `tandem chaos list`.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Every scenario.
    #[arg(long)]
    all: bool,
    /// The seed (repeatable: each scenario runs once per seed). Default: one from the clock.
    #[arg(long = "seed")]
    seeds: Vec<u64>,
    /// Runs each scenario with this many seeds (the given ones, then the next ones).
    #[arg(long, default_value_t = 1)]
    seeds_per_scenario: u32,
    /// How long faults are injected in each run, e.g. 30s, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Nodes (3 or 5); scenarios that need 5 get 5.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// The node-to-node transport the cluster starts on (`quic` or `tcp`); `alternate` takes
    /// them in turn, run after run.
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Where the runs' reports go (one folder per run).
    #[arg(long, default_value = "chaos-out")]
    out: PathBuf,
    /// The `tandem` executable the nodes run (default: this one).
    #[arg(long)]
    exe: Option<PathBuf>,
    /// A planted bug to switch on in every node (needs a `chaos-bugs` build; repeatable).
    #[arg(long = "plant")]
    bugs: Vec<String>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

/// Parses `30s`, `2m`, `500ms` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 2m, 500ms)"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    }
}

fn list() {
    println!("scenarios (tandem chaos run --scenario NAME):");
    for s in scenario::all() {
        let kinds: Vec<&str> = s.all_kinds().iter().map(|k| k.name()).collect();
        println!("  {:<26} {}", s.name, s.about);
        if s.kinds.len() > 1 || !s.with.is_empty() {
            println!("  {:<26}   nemeses: {}", "", kinds.join(", "));
        }
        if let Timing::Fixed(fixed) = &s.timing {
            let steps: Vec<String> =
                fixed.iter().map(|(k, hold, _)| format!("{} {:.1}s", k.name(), hold.as_secs_f64())).collect();
            println!("  {:<26}   fixed schedule: {}", "", steps.join(", then "));
        }
        if let Timing::Hold(hold) = s.timing {
            println!("  {:<26}   every fault held {:.1}s", "", hold.as_secs_f64());
        }
        if s.needs_failpoints() {
            println!("  {:<26}   needs a failpoints build (--exe)", "");
        }
        if s.nodes_min > 3 {
            println!("  {:<26}   needs {} nodes", "", s.nodes_min);
        }
    }
}

/// Sets `flag` on Ctrl-C or SIGTERM, so a run stops at its next step and cleans up.
fn on_interrupt(flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
        });
        eprintln!("\ninterrupted: stopping the run and cleaning up");
        flag.store(true, Ordering::Relaxed);
    });
}

/// Runs the command; an error if any run was not valid.
pub fn main(cmd: ChaosCmd) -> anyhow::Result<()> {
    match cmd {
        ChaosCmd::List => {
            list();
            Ok(())
        }
        ChaosCmd::Run(args) => run_all(args),
    }
}

fn run_all(args: RunArgs) -> anyhow::Result<()> {
    let scenarios: Vec<Scenario> = if args.all {
        scenario::all()
    } else if args.scenarios.is_empty() {
        return Err(anyhow!("name a --scenario (see `tandem chaos list`) or pass --all"));
    } else {
        args.scenarios
            .iter()
            .map(|n| scenario::find(n).ok_or_else(|| anyhow!("no scenario named {n:?} (see `tandem chaos list`)")))
            .collect::<anyhow::Result<_>>()?
    };
    if ![3, 5].contains(&args.nodes) {
        return Err(anyhow!("--nodes must be 3 or 5"));
    }
    if !["quic", "tcp", "alternate"].contains(&args.transport.as_str()) {
        return Err(anyhow!("--transport must be quic, tcp or alternate"));
    }
    let exe = match args.exe {
        Some(e) => e,
        None => std::env::current_exe()?,
    };
    let first = args.seeds.first().copied().unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64 | 1)
    });
    let mut seeds = args.seeds.clone();
    while seeds.len() < args.seeds_per_scenario.max(1) as usize {
        seeds.push(first.wrapping_add(seeds.len() as u64));
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    on_interrupt(interrupted.clone());
    let mut results: Vec<(String, u64, Verdict)> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut n = 0u32;
    for s in &scenarios {
        for &seed in &seeds {
            if interrupted.load(Ordering::Relaxed) {
                break;
            }
            let transport = match args.transport.as_str() {
                "alternate" => if n % 2 == 0 { "tcp" } else { "quic" }.to_string(),
                t => t.to_string(),
            };
            let opts = RunOptions {
                exe: exe.clone(),
                seed,
                duration: args.duration,
                nodes: args.nodes,
                transport,
                out: args.out.join(format!("{}-{seed}", s.name)),
                interrupted: interrupted.clone(),
                bugs: args.bugs.clone(),
                progress: !args.quiet,
            };
            println!(
                "== {} seed {seed} ({} nodes, {}) -> {}",
                s.name,
                opts.nodes.max(s.nodes_min),
                opts.transport,
                opts.out.display()
            );
            let verdict = match run(s, &opts, n) {
                Ok(record) => verdict::judge_and_report(&record, &opts.out),
                // `--all` on a build without failpoints: the scenarios that set them are skipped
                // (named at the end), not failed; named one by one, they fail.
                Err(e) if args.all && s.needs_failpoints() && format!("{e:#}").contains(NOT_A_FAILPOINTS_BUILD) => {
                    println!("skipped: {} needs a failpoints build of the nodes (--exe)", s.name);
                    skipped.push(s.name.clone());
                    n += 1;
                    continue;
                }
                Err(e) => Verdict::error(format!("{e:#}")),
            };
            println!("{}", verdict.line(&s.name, seed));
            results.push((s.name.clone(), seed, verdict));
            n += 1;
        }
    }
    println!("\n== {} runs", results.len());
    let bad: Vec<_> = results.iter().filter(|(_, _, v)| !v.passed()).collect();
    for (s, seed, v) in &results {
        println!("{}", v.line(s, *seed));
    }
    if !skipped.is_empty() {
        skipped.dedup();
        println!("skipped (the nodes are not a failpoints build; see docs/CHAOS.md): {}", skipped.join(", "));
    }
    if interrupted.load(Ordering::Relaxed) {
        return Err(anyhow!("interrupted"));
    }
    if !bad.is_empty() {
        return Err(anyhow!("{} of {} runs failed", bad.len(), results.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }
}
