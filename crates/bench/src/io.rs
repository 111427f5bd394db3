//! `tandem bench io`: fio's NBD engine against a 3-way replicated volume on a local 3-node
//! Tandem cluster, beside the same fio jobs against `qemu-nbd --cache=writethrough` serving a
//! local raw file: unreplicated, but every write is durable before it is acknowledged, as
//! Tandem's are (see ../../shared/design/BENCH.md).
//!
//! Within each repeat every job runs on Tandem (through the primary's NBD address, the path a
//! host would use), then on the reference; the 4 KiB queue-depth-1 random write also runs
//! through a non-primary node, which proxies to the primary. Figures are medians over the
//! repeats, and the ratios are of those medians.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::time::Instant;

use crate::load;
use crate::local_cluster::LocalCluster;
use crate::{apt_get, on_path};
use crate::{Goal, Op};
use tandem_client::{format_size, parse_size};

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
/// fio gets this long beyond its runtime (connecting, and the preconditioning pass) before the
/// benchmark gives up on it.
const FIO_GRACE: Duration = Duration::from_secs(120);
const QEMU_NBD_START_WAIT: Duration = Duration::from_secs(15);
/// How long qemu-nbd gets after SIGTERM before SIGKILL.
const QEMU_NBD_STOP_WAIT: Duration = Duration::from_secs(10);
/// The reference file is preallocated with zeros written in pieces of this size.
const ZERO_PIECE_BYTES: usize = 1 << 20;

#[derive(Args)]
pub struct IoArgs {
    /// How many times every job runs on each side; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    repeats: u32,
    /// How long each fio job runs, in seconds.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=RUNTIME_SECS_MAX))]
    runtime_secs: u64,
    /// fio's working set (its `--size`) within the 1 GiB volume and the 1 GiB reference file,
    /// e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

/// One fio job, run with the same parameters on both sides.
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
    fn label(self) -> String {
        match self {
            Job::RandwriteQd1 => "randwrite 4k qd1".into(),
            Job::RandwriteQd32 => "randwrite 4k qd32".into(),
            Job::Write1mSeq => format!("write 1M seq qd{SEQ_IODEPTH}"),
            Job::RandreadQd32 => "randread 4k qd32".into(),
        }
    }

    /// fio's `--rw`, `--bs` and `--iodepth`.
    fn fio_params(self) -> (&'static str, &'static str, u32) {
        match self {
            Job::RandwriteQd1 => ("randwrite", "4k", 1),
            Job::RandwriteQd32 => ("randwrite", "4k", 32),
            Job::Write1mSeq => ("write", "1M", SEQ_IODEPTH),
            Job::RandreadQd32 => ("randread", "4k", 32),
        }
    }

    fn reads(self) -> bool {
        self == Job::RandreadQd32
    }
}

/// Where fio's NBD connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Side {
    /// The volume's primary node.
    Tandem,
    /// Another node, which proxies every request to the primary.
    TandemProxied,
    QemuNbd,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Tandem => "tandem",
            Side::TandemProxied => "tandem-proxied",
            Side::QemuNbd => "qemu-nbd",
        }
    }
}

/// What one fio run reports for its one direction.
#[derive(Clone, Debug, Serialize)]
struct FioFigures {
    iops: f64,
    /// 10^6 bytes per second.
    mb_per_s: f64,
    clat_p50_us: f64,
    clat_p99_us: f64,
}

#[derive(Serialize)]
struct Run {
    repeat: u32,
    job: Job,
    side: Side,
    #[serde(flatten)]
    figures: FioFigures,
}

/// Tandem's figure over the reference's: above 1 is better for IOPS and MB/s, below 1 for
/// latencies.
#[derive(Serialize)]
struct Ratios {
    iops: f64,
    mb_per_s: f64,
    clat_p50: f64,
    clat_p99: f64,
}

#[derive(Serialize)]
struct Row {
    job: Job,
    side: Side,
    /// Medians over the repeats.
    figures: FioFigures,
    /// Against the reference's medians; absent on the reference's own row.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<Ratios>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    fio_version: String,
    qemu_nbd_version: String,
    tandem_nodes: u32,
    volume_bytes: u64,
    working_set_bytes: u64,
    reference_preallocation: &'static str,
    seq_iodepth: u32,
    runtime_secs: u64,
    repeats: u32,
    cores: usize,
    rows: Vec<Row>,
    runs: Vec<Run>,
    goals: Vec<Goal>,
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
    let tandem = LocalCluster::start(NODES).await?;
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

async fn uris(tandem: &LocalCluster, reference: &QemuNbd) -> anyhow::Result<Uris> {
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

/// Runs fio once against `uri`: `job` for `runtime_secs`, or with no job the preconditioning
/// pass (1 MiB sequential writes over the working set, once, not timed).
async fn fio(fio_bin: &Path, uri: &str, job: Option<Job>, size: u64, runtime_secs: u64) -> anyhow::Result<FioFigures> {
    let mut cmd = tokio::process::Command::new(fio_bin);
    cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}")).arg(format!("--size={size}")).arg("--output-format=json");
    match job {
        Some(job) => {
            let (rw, bs, iodepth) = job.fio_params();
            cmd.arg(format!("--name={}", job.label().replace(' ', "-")))
                .arg(format!("--rw={rw}"))
                .arg(format!("--bs={bs}"))
                .arg(format!("--iodepth={iodepth}"))
                .arg("--time_based=1")
                .arg(format!("--runtime={runtime_secs}"));
        }
        None => {
            cmd.arg("--name=precondition").arg("--rw=write").arg("--bs=1M").arg(format!("--iodepth={SEQ_IODEPTH}"));
        }
    }
    let out = cmd.stdin(Stdio::null()).kill_on_drop(true).output();
    let wait = Duration::from_secs(runtime_secs) + FIO_GRACE;
    let out = tokio::time::timeout(wait, out)
        .await
        .map_err(|_| anyhow!("fio did not finish within {wait:?}"))?
        .context("cannot run fio")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("fio failed ({}): {}{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
    }
    parse_fio(&stdout, job.is_some_and(Job::reads))
}

/// The figures of fio's JSON output (which its NBD engine precedes with a line of its own).
fn parse_fio(stdout: &str, reads: bool) -> anyhow::Result<FioFigures> {
    let start = stdout.find("\n{").map(|i| i + 1).or_else(|| stdout.starts_with('{').then_some(0));
    let json = &stdout[start.ok_or_else(|| anyhow!("no JSON in fio's output: {stdout}"))?..];
    let doc: serde_json::Value = serde_json::from_str(json).context("fio's JSON output does not parse")?;
    let job = &doc["jobs"][0];
    let error = job["error"].as_i64().unwrap_or(-1);
    if error != 0 {
        bail!("fio's job reports error {error}");
    }
    let dir = &job[if reads { "read" } else { "write" }];
    let num = |v: &serde_json::Value, what: &str| v.as_f64().ok_or_else(|| anyhow!("fio's output has no {what}"));
    let percentiles = &dir["clat_ns"]["percentile"];
    Ok(FioFigures {
        iops: num(&dir["iops"], "iops")?,
        mb_per_s: num(&dir["bw_bytes"], "bw_bytes")? / 1e6,
        clat_p50_us: num(&percentiles["50.000000"], "clat p50")? / 1e3,
        clat_p99_us: num(&percentiles["99.000000"], "clat p99")? / 1e3,
    })
}

/// The reference's raw file, preallocated by writing zeros (not `fallocate`: its unwritten
/// extents would make each of qemu-nbd's O_DSYNC writes also commit an extent conversion,
/// handicapping the reference), then made durable.
fn write_zeros(path: &Path, size_bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let zeros = vec![0u8; ZERO_PIECE_BYTES];
    let mut left = size_bytes;
    while left > 0 {
        let n = left.min(ZERO_PIECE_BYTES as u64) as usize;
        f.write_all(&zeros[..n]).with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().with_context(|| format!("cannot sync {}", path.display()))
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

/// `qemu-nbd --cache=writethrough` serving the raw file on 127.0.0.1; stopped by pid (SIGTERM,
/// then SIGKILL) when dropped.
struct QemuNbd {
    addr: SocketAddr,
    log: PathBuf,
    child: Child,
}

impl QemuNbd {
    fn start(qemu_nbd: &Path, raw: &Path, log_dir: &Path) -> anyhow::Result<QemuNbd> {
        use std::os::unix::process::CommandExt;
        // A free port: bound here, released, and bound by qemu-nbd right after.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port on 127.0.0.1")?;
        let log = log_dir.join("qemu-nbd.log");
        let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = std::process::Command::new(qemu_nbd)
            .args(["-f", "raw", "--cache=writethrough", "--persistent", "--shared=8", "-b", "127.0.0.1"])
            .arg("-p")
            .arg(addr.port().to_string())
            .arg("-x")
            .arg(REFERENCE_EXPORT)
            .arg(raw)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            // Its own process group: a Ctrl-C reaches the benchmark, which stops qemu-nbd itself.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", qemu_nbd.display()))?;
        Ok(QemuNbd { addr, log, child })
    }

    /// Until qemu-nbd accepts connections; fails early, with its log, if it exits.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + QEMU_NBD_START_WAIT;
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            let log = || std::fs::read_to_string(&self.log).unwrap_or_default();
            if Instant::now() >= deadline {
                bail!(
                    "qemu-nbd does not accept connections on {} within {QEMU_NBD_START_WAIT:?}: {}",
                    self.addr,
                    log()
                );
            }
            // qemu-nbd's exit (a port taken in the meantime, say) shows as a refused connection
            // until the deadline; its log says why.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // Blocking is acceptable here: the benchmark is ending, and qemu-nbd must not outlive it.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + QEMU_NBD_STOP_WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(25)),
            }
        }
    }
}

fn medians(runs: &[Run], job: Job, side: Side) -> FioFigures {
    let of = |f: fn(&FioFigures) -> f64| {
        let v: Vec<f64> = runs.iter().filter(|r| r.job == job && r.side == side).map(|r| f(&r.figures)).collect();
        load::median(&v)
    };
    FioFigures {
        iops: of(|f| f.iops),
        mb_per_s: of(|f| f.mb_per_s),
        clat_p50_us: of(|f| f.clat_p50_us),
        clat_p99_us: of(|f| f.clat_p99_us),
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn ratios(t: &FioFigures, r: &FioFigures) -> Ratios {
    Ratios {
        iops: ratio(t.iops, r.iops),
        mb_per_s: ratio(t.mb_per_s, r.mb_per_s),
        clat_p50: ratio(t.clat_p50_us, r.clat_p50_us),
        clat_p99: ratio(t.clat_p99_us, r.clat_p99_us),
    }
}

fn report(args: &IoArgs, fio_version: String, qemu_nbd_version: String, runs: Vec<Run>) -> Report {
    let mut rows = Vec::new();
    let mut goals = Vec::new();
    for job in JOBS {
        let reference = medians(&runs, job, Side::QemuNbd);
        let tandem = medians(&runs, job, Side::Tandem);
        let r = ratios(&tandem, &reference);
        let goal = match job {
            Job::RandwriteQd1 => Goal::ratio("io-write-qd1-p50", r.clat_p50, "qemu-nbd", Op::AtMost, 1.5),
            Job::RandwriteQd32 => Goal::ratio("io-write-qd32-iops", r.iops, "qemu-nbd", Op::AtLeast, 1.0),
            Job::Write1mSeq => Goal::ratio("io-write-1m-seq", r.mb_per_s, "qemu-nbd", Op::AtLeast, 0.33),
            Job::RandreadQd32 => Goal::ratio("io-randread-iops", r.iops, "qemu-nbd", Op::AtLeast, 0.8),
        };
        goals.push(goal);
        rows.push(Row { job, side: Side::Tandem, figures: tandem, ratio: Some(r) });
        rows.push(Row { job, side: Side::QemuNbd, figures: reference, ratio: None });
    }
    // The proxied path is an extra line, not a goal: a host should connect to the primary.
    let reference = medians(&runs, Job::RandwriteQd1, Side::QemuNbd);
    let proxied = medians(&runs, Job::RandwriteQd1, Side::TandemProxied);
    let r = ratios(&proxied, &reference);
    rows.push(Row { job: Job::RandwriteQd1, side: Side::TandemProxied, figures: proxied, ratio: Some(r) });
    Report {
        benchmark: "io",
        fio_version,
        qemu_nbd_version,
        tandem_nodes: NODES,
        volume_bytes: VOLUME_BYTES,
        working_set_bytes: args.size,
        reference_preallocation: "zeros written (then fsync)",
        seq_iodepth: SEQ_IODEPTH,
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
        "bench io: {} --ioengine=nbd, {} s per job, working set {} of {}, median of {} interleaved repeats; {} cores",
        r.fio_version,
        r.runtime_secs,
        format_size(r.working_set_bytes),
        format_size(r.volume_bytes),
        r.repeats,
        r.cores
    );
    println!(
        "tandem: {} nodes (this binary), the volume replicated {} ways, fio connected to the primary's NBD address",
        r.tandem_nodes, r.tandem_nodes
    );
    println!(
        "qemu-nbd: {}, --cache=writethrough, a raw file preallocated with {}; all on 127.0.0.1",
        r.qemu_nbd_version, r.reference_preallocation
    );
    println!("working set written once on both sides before the runs; ratio = tandem / qemu-nbd");
    println!();
    println!("{:<20} {:<15} {:>9} {:>9} {:>12} {:>12}", "job", "system", "IOPS", "MB/s", "clat p50 µs", "clat p99 µs");
    for row in &r.rows {
        let f = &row.figures;
        let job = if row.side == Side::QemuNbd { String::new() } else { row.job.label() };
        let side = if row.side == Side::TandemProxied { "tandem proxied" } else { row.side.name() };
        println!(
            "{:<20} {:<15} {:>9.0} {:>9.1} {:>12.1} {:>12.1}",
            job, side, f.iops, f.mb_per_s, f.clat_p50_us, f.clat_p99_us
        );
        if row.side == Side::QemuNbd {
            // The ratio row follows the reference's, under the job's tandem row.
            let tandem_row = r.rows.iter().find(|x| x.job == row.job && x.side == Side::Tandem);
            if let Some(q) = tandem_row.and_then(|x| x.ratio.as_ref()) {
                print_ratio_row("", "ratio", q);
            }
        }
        if row.side == Side::TandemProxied {
            if let Some(q) = &row.ratio {
                print_ratio_row("", "ratio (proxied)", q);
            }
        }
    }
    println!();
    for g in &r.goals {
        println!("{}", g.line);
    }
}

fn print_ratio_row(job: &str, label: &str, q: &Ratios) {
    println!(
        "{:<20} {:<15} {:>8.2}x {:>8.2}x {:>11.2}x {:>11.2}x",
        job, label, q.iops, q.mb_per_s, q.clat_p50, q.clat_p99
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO_OUT: &str = "fio: connected to NBD server\n{\n  \"jobs\" : [ { \"error\" : 0,\n    \"read\" : { \"iops\" : 0.0, \"bw_bytes\" : 0, \"clat_ns\" : { \"percentile\" : { \"50.000000\" : 0, \"99.000000\" : 0 } } },\n    \"write\" : { \"iops\" : 3054.9, \"bw_bytes\" : 12513054, \"clat_ns\" : { \"percentile\" : { \"50.000000\" : 309248, \"99.000000\" : 643072 } } } } ]\n}\n";

    #[test]
    fn fio_json_is_found_after_the_engine_line() {
        let f = parse_fio(FIO_OUT, false).expect("parses");
        assert_eq!(f.iops, 3054.9);
        assert_eq!(f.mb_per_s, 12.513054);
        assert_eq!(f.clat_p50_us, 309.248);
        assert_eq!(f.clat_p99_us, 643.072);
    }

    #[test]
    fn a_job_error_is_an_error() {
        assert!(parse_fio(&FIO_OUT.replace("\"error\" : 0", "\"error\" : 5"), false).is_err());
        assert!(parse_fio("no json here", false).is_err());
    }
}
