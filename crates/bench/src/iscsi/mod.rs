//! `tandem bench iscsi`: writes and reads on a 3-way replicated volume through a node's iSCSI
//! portal, beside the same jobs on `tgtd` (Linux's user-space iSCSI target, Debian's `tgt`)
//! serving a local raw file with write-through (opened O_SYNC), interleaved in one run.
//!
//! One load generator drives both targets (`initiator.rs`: one session, a closed loop at a
//! fixed queue depth, on `tandem-iscsi`'s codec; Debian's fio has no libiscsi engine), so the
//! ratio compares the targets. Both sides hold the same working set written once before the
//! runs (the volume through NBD with fio, the file directly), so reads read data, not holes.
//! Within each repeat every job runs on Tandem through the primary's portal, through another
//! node's portal (which proxies to the primary), then on tgtd. Figures are medians over the
//! repeats; the ratios are of those medians; the goals are `bench io`'s.

mod initiator;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::Serialize;
use tandem_client::format_size;
use tokio::time::Instant;

use crate::cluster_api::BenchCluster;
use crate::goal::{ratio, Goal, Op};
use crate::load;
use crate::tools::{apt_get, on_path};
use initiator::{Pattern, Session};

const NODES: u32 = 3;
const VOLUME_NAME: &str = "bench-iscsi";
const VOLUME_BYTES: u64 = 256 << 20;
const REFERENCE_TARGET: &str = "iqn.2026-12.io.tandem.bench:tgtd";
const REPEATS_MAX: i64 = 100;
const RUNTIME_SECS_MAX: u64 = 600;

#[derive(Args)]
pub struct IscsiArgs {
    /// How many times every job runs on each side; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    repeats: u32,
    /// How long each job runs, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=RUNTIME_SECS_MAX))]
    runtime_secs: u64,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Job {
    RandwriteQd1,
    RandwriteQd32,
    Write1mSeq,
    RandreadQd32,
}

const JOBS: [Job; 4] = [Job::RandwriteQd1, Job::RandwriteQd32, Job::Write1mSeq, Job::RandreadQd32];

impl Job {
    fn label(self) -> &'static str {
        match self {
            Job::RandwriteQd1 => "4k randwrite qd1",
            Job::RandwriteQd32 => "4k randwrite qd32",
            Job::Write1mSeq => "1m write qd4",
            Job::RandreadQd32 => "4k randread qd32",
        }
    }

    fn pattern(self) -> Pattern {
        match self {
            Job::RandwriteQd1 => Pattern { write: true, random: true, request_bytes: 4096, depth: 1 },
            Job::RandwriteQd32 => Pattern { write: true, random: true, request_bytes: 4096, depth: 32 },
            Job::Write1mSeq => Pattern { write: true, random: false, request_bytes: 1 << 20, depth: 4 },
            Job::RandreadQd32 => Pattern { write: false, random: true, request_bytes: 4096, depth: 32 },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Side {
    Tandem,
    TandemProxied,
    Tgtd,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Tandem => "tandem",
            Side::TandemProxied => "tandem proxied",
            Side::Tgtd => "tgtd",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
struct Figures {
    iops: f64,
    /// 10^6 bytes per second.
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Serialize)]
struct Run {
    repeat: u32,
    job: Job,
    side: Side,
    #[serde(flatten)]
    figures: Figures,
}

#[derive(Serialize)]
struct Row {
    job: Job,
    side: Side,
    figures: Figures,
    /// Tandem's figure over tgtd's, the one the job's goal judges (absent on tgtd's row).
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    tgtd_version: String,
    tandem_nodes: u32,
    volume_bytes: u64,
    runtime_secs: u64,
    repeats: u32,
    cores: usize,
    rows: Vec<Row>,
    runs: Vec<Run>,
    goals: Vec<Goal>,
}

struct Tools {
    tgtd: PathBuf,
    tgtadm: PathBuf,
    fio: PathBuf,
}

/// tgtd and tgtadm, fio: on PATH, or installed from Debian first.
async fn ensure_tools() -> anyhow::Result<Tools> {
    let find = || Some(Tools { tgtd: on_path("tgtd")?, tgtadm: on_path("tgtadm")?, fio: on_path("fio")? });
    if let Some(tools) = find() {
        return Ok(tools);
    }
    eprintln!("installing the reference and the filler (apt-get install -y tgt fio)");
    apt_get(&["update"]).await?;
    apt_get(&["install", "-y", "tgt", "fio"]).await?;
    // The package may start a system tgtd on 0.0.0.0:3260; the benchmark runs its own.
    let _ = tokio::process::Command::new("service").args(["tgt", "stop"]).status().await;
    find().ok_or_else(|| anyhow!("tgt and fio are installed but a tool is not on PATH"))
}

/// The reference: a tgtd of the benchmark's own on a free port of 127.0.0.1, with its own
/// control port, serving one LUN from a raw file opened O_SYNC (write-through); stopped when
/// dropped.
struct Tgtd {
    child: tokio::process::Child,
    control: u16,
    tgtadm: PathBuf,
    portal: SocketAddr,
}

impl Tgtd {
    async fn start(tools: &Tools, raw: &Path) -> anyhow::Result<Tgtd> {
        let portal = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("no free port for tgtd")?;
            l.local_addr()?
        };
        // tgtd's control socket is /var/run/tgtd/socket.<n>: a number no other tgtd here uses.
        let control = 100 + (std::process::id() % 800) as u16;
        std::fs::create_dir_all("/var/run/tgtd").context("cannot make /var/run/tgtd")?;
        let child = tokio::process::Command::new(&tools.tgtd)
            .args(["-f", "-C", &control.to_string(), "--iscsi", &format!("portal={portal}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start tgtd")?;
        let t = Tgtd { child, control, tgtadm: tools.tgtadm.clone(), portal };
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.admin(&["--op", "show", "--mode", "target"]).await.is_err() {
            if Instant::now() > deadline {
                bail!("tgtd did not answer tgtadm within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t.admin(&["--op", "new", "--mode", "target", "--tid", "1", "-T", REFERENCE_TARGET]).await?;
        let raw = raw.to_str().ok_or_else(|| anyhow!("the raw file's path is not UTF-8"))?;
        t.admin(&["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", raw, "--bsoflags", "sync"])
            .await?;
        t.admin(&["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]).await?;
        Ok(t)
    }

    async fn admin(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(&self.tgtadm)
            .args(["-C", &self.control.to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .await
            .context("cannot run tgtadm")?;
        if !out.status.success() {
            bail!("tgtadm {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Where a job runs: a portal, a target name and a LUN.
struct Endpoint {
    portal: SocketAddr,
    target: String,
    lun: u64,
}

/// Runs `job` once against `at` in a session of its own.
async fn measure(at: &Endpoint, job: Job, runtime: Duration, seed: u64) -> anyhow::Result<Figures> {
    let mut session = Session::login(at.portal, &at.target, at.lun).await?;
    let pattern = job.pattern();
    let m = session.run(pattern, VOLUME_BYTES, runtime, seed).await?;
    let pick = |q: f64| {
        let i = ((m.latencies_us.len() as f64 * q) as usize).min(m.latencies_us.len().saturating_sub(1));
        m.latencies_us.get(i).copied().unwrap_or(0) as f64
    };
    let iops = m.commands as f64 / m.seconds;
    Ok(Figures { iops, mb_per_s: iops * pattern.request_bytes as f64 / 1e6, p50_us: pick(0.5), p99_us: pick(0.99) })
}

pub async fn run(args: IscsiArgs) -> anyhow::Result<()> {
    let tools = ensure_tools().await?;
    let tgtd_version = String::from_utf8_lossy(
        &std::process::Command::new(&tools.tgtadm).arg("--version").output().map(|o| o.stdout).unwrap_or_default(),
    )
    .trim()
    .to_string();
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("tandem-bench-iscsi-").tempdir().context("cannot make a temp dir")?;
    let raw = dir.path().join("ref.raw");
    // The reference's working set: data, written and synced before the runs.
    let raw_path = raw.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&raw_path)?;
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..VOLUME_BYTES >> 20 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        Ok(())
    })
    .await
    .context("the file-writing task crashed")??;
    let reference = Tgtd::start(&tools, &raw).await?;
    eprintln!("tgtd ({tgtd_version}) serves {} on {}, write-through", format_size(VOLUME_BYTES), reference.portal);

    eprintln!("starting a {NODES}-node Tandem cluster (tandem up --detach)");
    let tandem = BenchCluster::start(NODES).await?;
    let measured = async {
        let v = tandem.create_volume(VOLUME_NAME, VOLUME_BYTES).await?;
        let cfg = tandem.config()?;
        let portal =
            |id| cfg.node(id).and_then(|n| n.iscsi_addr).ok_or_else(|| anyhow!("node {id} has no iSCSI portal"));
        let other =
            cfg.nodes.iter().find(|n| n.id != v.primary).map(|n| n.id).ok_or_else(|| anyhow!("one node only"))?;
        let target = format!("iqn.2026-12.io.tandem:{}:{VOLUME_NAME}", cfg.cluster.name);
        let sides = [
            (Side::Tandem, Endpoint { portal: portal(v.primary)?, target: target.clone(), lun: 0 }),
            (Side::TandemProxied, Endpoint { portal: portal(other)?, target, lun: 0 }),
            (Side::Tgtd, Endpoint { portal: reference.portal, target: REFERENCE_TARGET.to_string(), lun: 1 }),
        ];
        // Fill the volume once over NBD, so the reads read data.
        let nbd = cfg.node(v.primary).map(|n| n.nbd_addr).ok_or_else(|| anyhow!("no primary in the config"))?;
        let fill = tokio::process::Command::new(&tools.fio)
            .args(["--ioengine=nbd", &format!("--uri=nbd://{nbd}/{VOLUME_NAME}"), &format!("--size={VOLUME_BYTES}")])
            .args(["--name=fill", "--rw=write", "--bs=1M", "--iodepth=4"])
            .stdin(Stdio::null())
            .output()
            .await
            .context("cannot run fio")?;
        if !fill.status.success() {
            bail!("filling the volume with fio failed: {}", String::from_utf8_lossy(&fill.stderr));
        }
        eprintln!("volume {VOLUME_NAME}: primary node {}, filled; proxied through node {other}", v.primary);
        let runtime = Duration::from_secs(args.runtime_secs);
        let mut runs = Vec::new();
        for repeat in 1..=args.repeats {
            for job in JOBS {
                for (side, at) in &sides {
                    let seed = u64::from(repeat) << 8 | job as u64;
                    let figures = measure(at, job, runtime, seed)
                        .await
                        .with_context(|| format!("{} on {}", job.label(), side.name()))?;
                    eprintln!(
                        "repeat {repeat}/{}: {} on {}: {:.0} IOPS, {:.1} MB/s, p50 {:.0} us",
                        args.repeats,
                        job.label(),
                        side.name(),
                        figures.iops,
                        figures.mb_per_s,
                        figures.p50_us
                    );
                    runs.push(Run { repeat, job, side: *side, figures });
                }
            }
        }
        Ok(runs)
    }
    .await;
    drop(reference);
    let stopped = tandem.stop().await;
    let runs = measured?;
    stopped?;
    eprintln!("bench iscsi took {:.0} s", started.elapsed().as_secs_f64());

    let report = report(&args, tgtd_version, runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn medians(runs: &[Run], job: Job, side: Side) -> Figures {
    let of = |f: fn(&Figures) -> f64| {
        let v: Vec<f64> = runs.iter().filter(|r| r.job == job && r.side == side).map(|r| f(&r.figures)).collect();
        load::median(&v)
    };
    Figures { iops: of(|f| f.iops), mb_per_s: of(|f| f.mb_per_s), p50_us: of(|f| f.p50_us), p99_us: of(|f| f.p99_us) }
}

/// The ratio a job's goal judges: p50 latency for the write at queue depth 1, throughput for
/// the 1 MiB writes, IOPS otherwise.
fn judged(job: Job, tandem: &Figures, reference: &Figures) -> f64 {
    match job {
        Job::RandwriteQd1 => ratio(tandem.p50_us, reference.p50_us),
        Job::Write1mSeq => ratio(tandem.mb_per_s, reference.mb_per_s),
        Job::RandwriteQd32 | Job::RandreadQd32 => ratio(tandem.iops, reference.iops),
    }
}

fn report(args: &IscsiArgs, tgtd_version: String, runs: Vec<Run>) -> Report {
    let mut rows = Vec::new();
    let mut goals = Vec::new();
    for job in JOBS {
        let reference = medians(&runs, job, Side::Tgtd);
        for side in [Side::Tandem, Side::TandemProxied] {
            let figures = medians(&runs, job, side);
            rows.push(Row { job, side, figures, ratio: Some(judged(job, &figures, &reference)) });
        }
        let r = judged(job, &medians(&runs, job, Side::Tandem), &reference);
        goals.push(match job {
            Job::RandwriteQd1 => Goal::ratio("iscsi-write-qd1-p50", r, "tgtd", Op::AtMost, 1.5),
            Job::RandwriteQd32 => Goal::ratio("iscsi-write-qd32-iops", r, "tgtd", Op::AtLeast, 1.0),
            Job::Write1mSeq => Goal::ratio("iscsi-write-1m-seq", r, "tgtd", Op::AtLeast, 0.33),
            Job::RandreadQd32 => Goal::ratio("iscsi-randread-iops", r, "tgtd", Op::AtLeast, 0.8),
        });
        rows.push(Row { job, side: Side::Tgtd, figures: reference, ratio: None });
    }
    Report {
        benchmark: "iscsi",
        tgtd_version,
        tandem_nodes: NODES,
        volume_bytes: VOLUME_BYTES,
        runtime_secs: args.runtime_secs,
        repeats: args.repeats,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        rows,
        runs,
        goals,
    }
}

fn print_table(r: &Report) {
    println!(
        "bench iscsi: one initiator (tandem-iscsi's codec, a closed loop per job), {} s per job, {} working set, \
         median of {} interleaved repeats; {} cores",
        r.runtime_secs,
        format_size(r.volume_bytes),
        r.repeats,
        r.cores
    );
    println!(
        "tandem: {} nodes (this binary), the volume replicated {} ways; tgtd {} on a raw file opened O_SYNC",
        r.tandem_nodes, r.tandem_nodes, r.tgtd_version
    );
    println!("both written once before the runs; all on 127.0.0.1; ratio = tandem / tgtd (p50 for qd1 writes)");
    println!();
    println!(
        "{:<18} {:<15} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "job", "system", "IOPS", "MB/s", "p50 us", "p99 us", "ratio"
    );
    for row in &r.rows {
        let ratio = row.ratio.map_or_else(String::new, |q| format!("{q:.2}x"));
        let job = if row.side == Side::Tandem { row.job.label() } else { "" };
        let f = &row.figures;
        println!(
            "{:<18} {:<15} {:>9.0} {:>9.1} {:>9.0} {:>9.0} {:>8}",
            job,
            row.side.name(),
            f.iops,
            f.mb_per_s,
            f.p50_us,
            f.p99_us,
            ratio
        );
    }
    println!();
    for g in &r.goals {
        println!("{}", g.line);
    }
}
