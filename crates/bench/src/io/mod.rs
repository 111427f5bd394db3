//! `tandem bench io`: fio's NBD engine against a 3-way replicated volume on a local 3-node
//! Tandem cluster, beside the same fio jobs against `qemu-nbd --cache=writethrough` serving a
//! local raw file: unreplicated, but every write is durable before it is acknowledged, as
//! Tandem's are (see ../../shared/design/BENCH.md).
//!
//! Within each repeat every job runs on Tandem (through the primary's NBD address, the path a
//! host would use), then on the reference; the 4 KiB queue-depth-1 random write also runs
//! through a non-primary node, which proxies to the primary. Figures are medians over the
//! repeats, and the ratios are of those medians.
//!
//! - `fio.rs`: the jobs, running fio and reading its figures.
//! - `qemu_nbd.rs`: the reference: its raw file and the qemu-nbd process serving it.
//! - `report.rs`: the medians, ratios, goals and the table.

mod fio;
mod qemu_nbd;
mod report;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::Serialize;
use tandem_client::{format_size, parse_size};
use tokio::time::Instant;

use self::fio::{fio, Job, JOBS};
use self::qemu_nbd::{write_zeros, QemuNbd};
use self::report::{print_table, report, Run};
use crate::cluster_api::BenchCluster;
use crate::tools::{apt_get, on_path};

const NODES: u32 = 3;
const VOLUME_NAME: &str = "bench-io";
/// The volume and the reference's raw file; fio works on the first `--size` bytes of each.
const VOLUME_BYTES: u64 = 1 << 30;
const REFERENCE_EXPORT: &str = "ref";
/// The 1 MiB sequential write keeps this many requests in flight (a few, as a host's page
/// cache writing back a file would).
const SEQ_IODEPTH: u32 = 4;
/// Bounds on the flags, and so on the run time.
const REPEATS_MAX: i64 = 100;
const RUNTIME_SECS_MAX: u64 = 600;

#[derive(Args)]
pub struct IoArgs {
    /// How many times every job runs on each side; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    pub(super) repeats: u32,
    /// How long each fio job runs, in seconds.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=RUNTIME_SECS_MAX))]
    pub(super) runtime_secs: u64,
    /// fio's working set (its `--size`) within the 1 GiB volume and the 1 GiB reference file,
    /// e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub(super) size: u64,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

/// Where fio's NBD connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Side {
    /// The volume's primary node.
    Tandem,
    /// Another node, which proxies every request to the primary.
    TandemProxied,
    QemuNbd,
}

impl Side {
    pub(super) fn name(self) -> &'static str {
        match self {
            Side::Tandem => "tandem",
            Side::TandemProxied => "tandem-proxied",
            Side::QemuNbd => "qemu-nbd",
        }
    }
}

/// The NBD URIs fio connects to.
struct Uris {
    primary: String,
    proxied: String,
    reference: String,
}

pub async fn run(args: IoArgs) -> anyhow::Result<()> {
    if args.size == 0 || args.size > VOLUME_BYTES || !args.size.is_multiple_of(1 << 20) {
        bail!("--size must be a whole number of MiB, at most the volume's {}", format_size(VOLUME_BYTES));
    }
    let tools = ensure_tools().await?;
    let fio_version = first_line(&tools.fio, "--version")?;
    // `/usr/bin/qemu-nbd 10.0.2 (Debian ...)` becomes `qemu-nbd 10.0.2`.
    let qemu_nbd_version = first_line(&tools.qemu_nbd, "--version")?
        .split_whitespace()
        .nth(1)
        .map_or_else(|| "qemu-nbd".to_string(), |v| format!("qemu-nbd {v}"));
    let started = Instant::now();

    let ref_dir = tempfile::Builder::new()
        .prefix("tandem-bench-io-ref-")
        .tempdir()
        .context("cannot make a temporary dir for the reference's raw file")?;
    let raw = ref_dir.path().join("ref.raw");
    eprintln!("writing the reference's {} raw file with zeros: {}", format_size(VOLUME_BYTES), raw.display());
    let raw_for_zeros = raw.clone();
    tokio::task::spawn_blocking(move || write_zeros(&raw_for_zeros, VOLUME_BYTES))
        .await
        .context("the zero-writing task crashed")??;
    let reference = QemuNbd::start(&tools.qemu_nbd, &raw, ref_dir.path())?;
    reference.wait_ready().await?;
    eprintln!("  {} serves it on {} as export {REFERENCE_EXPORT:?}", qemu_nbd_version, reference.addr);

    eprintln!("starting a {NODES}-node Tandem cluster (tandem up --detach)");
    let tandem = BenchCluster::start(NODES).await?;
    eprintln!("  in {}", tandem.dir().display());
    let measured = async {
        let v = tandem.create_volume(VOLUME_NAME, VOLUME_BYTES).await?;
        eprintln!("volume {VOLUME_NAME} ({}): primary node {}, ISR {:?}", format_size(VOLUME_BYTES), v.primary, v.isr);
        let uris = uris(&tandem, &reference).await?;
        measure(&args, &tools.fio, &uris).await
    }
    .await;
    eprintln!("stopping qemu-nbd and the Tandem cluster");
    drop(reference);
    let stopped = tandem.stop().await;
    let runs = measured?;
    stopped?;
    eprintln!("bench io took {:.0} s", started.elapsed().as_secs_f64());

    let report = report(&args, fio_version, qemu_nbd_version, runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn uris(tandem: &BenchCluster, reference: &QemuNbd) -> anyhow::Result<Uris> {
    let v = tandem.volume(VOLUME_NAME, None).await?;
    let cfg = tandem.config()?;
    let primary =
        cfg.node(v.primary).ok_or_else(|| anyhow!("the primary, node {}, is not in the config", v.primary))?;
    let other = cfg
        .nodes
        .iter()
        .find(|n| n.id != v.primary)
        .ok_or_else(|| anyhow!("the cluster has no node besides the primary"))?;
    Ok(Uris {
        primary: format!("nbd://{}/{VOLUME_NAME}", primary.nbd_addr),
        proxied: format!("nbd://{}/{VOLUME_NAME}", other.nbd_addr),
        reference: format!("nbd://{}/{REFERENCE_EXPORT}", reference.addr),
    })
}

async fn measure(args: &IoArgs, fio_bin: &Path, uris: &Uris) -> anyhow::Result<Vec<Run>> {
    // The random reads must read written blocks on both sides, and both sides should start
    // from the same state: one unmeasured sequential pass over the working set.
    for (side, uri) in [(Side::Tandem, &uris.primary), (Side::QemuNbd, &uris.reference)] {
        let t0 = Instant::now();
        fio(fio_bin, uri, None, args.size, args.runtime_secs)
            .await
            .with_context(|| format!("preconditioning {}", side.name()))?;
        eprintln!(
            "preconditioned {}: wrote the {} working set once ({:.1} s)",
            side.name(),
            format_size(args.size),
            t0.elapsed().as_secs_f64()
        );
    }
    let mut runs = Vec::new();
    for repeat in 1..=args.repeats {
        for job in JOBS {
            let mut sides = vec![(Side::Tandem, &uris.primary), (Side::QemuNbd, &uris.reference)];
            if job == Job::RandwriteQd1 {
                sides.push((Side::TandemProxied, &uris.proxied));
            }
            for (side, uri) in sides {
                let what = format!("repeat {repeat}/{}: {} on {}", args.repeats, job.label(), side.name());
                let figures =
                    fio(fio_bin, uri, Some(job), args.size, args.runtime_secs).await.with_context(|| what.clone())?;
                eprintln!(
                    "{what}: {:.0} IOPS, {:.1} MB/s, clat p50 {:.1} µs, p99 {:.1} µs",
                    figures.iops, figures.mb_per_s, figures.clat_p50_us, figures.clat_p99_us
                );
                runs.push(Run { repeat, job, side, figures });
            }
        }
    }
    Ok(runs)
}

struct Tools {
    fio: PathBuf,
    qemu_nbd: PathBuf,
}

/// fio and qemu-nbd: on PATH, or installed from Debian's `fio` and `qemu-utils` first.
async fn ensure_tools() -> anyhow::Result<Tools> {
    if let (Some(fio), Some(qemu_nbd)) = (on_path("fio"), on_path("qemu-nbd")) {
        return Ok(Tools { fio, qemu_nbd });
    }
    eprintln!("fio or qemu-nbd is not on PATH: installing them (apt-get update && apt-get install -y qemu-utils fio)");
    apt_get(&["update"]).await?;
    apt_get(&["install", "-y", "qemu-utils", "fio"]).await?;
    match (on_path("fio"), on_path("qemu-nbd")) {
        (Some(fio), Some(qemu_nbd)) => Ok(Tools { fio, qemu_nbd }),
        _ => bail!("qemu-utils and fio are installed but fio or qemu-nbd is not on PATH"),
    }
}

/// A tool's `--version` first line, e.g. `fio-3.33`.
fn first_line(bin: &Path, arg: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin)
        .arg(arg)
        .output()
        .with_context(|| format!("cannot run {} {arg}", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string())
}
