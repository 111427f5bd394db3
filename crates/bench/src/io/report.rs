//! `bench io`'s result: medians over the repeats, Tandem's ratios to qemu-nbd's, the goals, and
//! the table (or the JSON document).

use serde::Serialize;
use tandem_client::format_size;

use super::fio::{FioFigures, Job, JOBS};
use super::{IoArgs, Side, NODES, SEQ_IODEPTH, VOLUME_BYTES};
use crate::goal::{ratio, Goal, Op};
use crate::load;

#[derive(Serialize)]
pub(super) struct Run {
    pub(super) repeat: u32,
    pub(super) job: Job,
    pub(super) side: Side,
    #[serde(flatten)]
    pub(super) figures: FioFigures,
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
pub(super) struct Report {
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

fn ratios(t: &FioFigures, r: &FioFigures) -> Ratios {
    Ratios {
        iops: ratio(t.iops, r.iops),
        mb_per_s: ratio(t.mb_per_s, r.mb_per_s),
        clat_p50: ratio(t.clat_p50_us, r.clat_p50_us),
        clat_p99: ratio(t.clat_p99_us, r.clat_p99_us),
    }
}

pub(super) fn report(args: &IoArgs, fio_version: String, qemu_nbd_version: String, runs: Vec<Run>) -> Report {
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

pub(super) fn print_table(r: &Report) {
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
