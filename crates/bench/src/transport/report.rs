//! `bench transport`'s result: medians over the repeats, each transport's ratios to plaintext,
//! the switch test's summary, the goals, and the table (or the JSON document).

use serde::Serialize;

use super::switch::StallRun;
use super::{
    System, Test, TransportArgs, BULK_BYTES, BULK_IN_FLIGHT, MIB, SMALL_BYTES, SWITCH_INTERVAL, SWITCH_IN_FLIGHT,
    SYSTEMS,
};
use crate::goal::{ratio, Goal, Op};
use crate::load::{self, RunFigures};

#[derive(Serialize)]
pub(super) struct Run {
    repeat: u32,
    test: Test,
    system: System,
    messages: u64,
    elapsed_s: f64,
    messages_per_s: f64,
    pub(super) mib_per_s: f64,
    /// Per-message latency (at 8 in flight for throughput runs).
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
}

impl Run {
    pub(super) fn new(repeat: u32, test: Test, system: System, f: &RunFigures) -> Run {
        let bytes = match test {
            Test::Throughput => BULK_BYTES,
            Test::Rtt => SMALL_BYTES,
        };
        Run {
            repeat,
            test,
            system,
            messages: f.writes,
            elapsed_s: f.elapsed_s,
            messages_per_s: f.writes_per_s,
            mib_per_s: f.writes_per_s * bytes as f64 / MIB as f64,
            p50_us: f.p50_ms * 1000.0,
            p99_us: f.p99_ms * 1000.0,
        }
    }
}

/// One system's medians, and its ratios to plaintext's.
#[derive(Serialize)]
struct Row {
    system: System,
    throughput_mib_per_s: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    throughput_ratio: f64,
    rtt_p50_ratio: f64,
    rtt_p99_ratio: f64,
}

#[derive(Serialize)]
struct SwitchSummary {
    interval_ms: u64,
    in_flight: usize,
    message_bytes: usize,
    /// Worst over the switching runs.
    longest_stall_ms: f64,
    /// Worst over the runs with the same load and no switch.
    baseline_longest_stall_ms: f64,
    /// Over all switching runs.
    failed_requests: u64,
    switches: u64,
    flips: u64,
    /// Median of the runs' ratios of requests/s, switching over not.
    requests_per_s_ratio: f64,
    runs: Vec<StallRun>,
}

#[derive(Serialize)]
pub(super) struct Report {
    benchmark: &'static str,
    throughput_message_bytes: usize,
    throughput_in_flight: usize,
    rtt_message_bytes: usize,
    seconds_per_run: u64,
    repeats: u32,
    cores: usize,
    /// Medians over the repeats.
    rows: Vec<Row>,
    switch: SwitchSummary,
    runs: Vec<Run>,
    goals: Vec<Goal>,
}

pub(super) fn report(args: &TransportArgs, runs: Vec<Run>, stall_runs: Vec<StallRun>) -> Report {
    let median = |test: Test, system: System, f: fn(&Run) -> f64| {
        let v: Vec<f64> = runs.iter().filter(|r| r.test == test && r.system == system).map(f).collect();
        load::median(&v)
    };
    let plain_mib = median(Test::Throughput, System::Plaintext, |r| r.mib_per_s);
    let plain_p50 = median(Test::Rtt, System::Plaintext, |r| r.p50_us);
    let plain_p99 = median(Test::Rtt, System::Plaintext, |r| r.p99_us);
    let rows: Vec<Row> = SYSTEMS
        .iter()
        .map(|&system| {
            let mib = median(Test::Throughput, system, |r| r.mib_per_s);
            let p50 = median(Test::Rtt, system, |r| r.p50_us);
            let p99 = median(Test::Rtt, system, |r| r.p99_us);
            Row {
                system,
                throughput_mib_per_s: mib,
                rtt_p50_us: p50,
                rtt_p99_us: p99,
                throughput_ratio: ratio(mib, plain_mib),
                rtt_p50_ratio: ratio(p50, plain_p50),
                rtt_p99_ratio: ratio(p99, plain_p99),
            }
        })
        .collect();

    let worst = |switching: bool| {
        stall_runs.iter().filter(|r| r.switching == switching).map(|r| r.longest_stall_ms).fold(0.0, f64::max)
    };
    let switching_runs = || stall_runs.iter().filter(|r| r.switching);
    let rps_ratios: Vec<f64> = (1..=args.repeats)
        .filter_map(|repeat| {
            let of = |switching: bool| {
                stall_runs.iter().find(|r| r.repeat == repeat && r.switching == switching).map(|r| r.requests_per_s)
            };
            Some(ratio(of(true)?, of(false)?))
        })
        .collect();
    let switch = SwitchSummary {
        interval_ms: SWITCH_INTERVAL.as_millis() as u64,
        in_flight: SWITCH_IN_FLIGHT,
        message_bytes: SMALL_BYTES,
        longest_stall_ms: worst(true),
        baseline_longest_stall_ms: worst(false),
        failed_requests: switching_runs().map(|r| r.failed).sum(),
        switches: switching_runs().map(|r| r.switches).sum(),
        flips: switching_runs().map(|r| r.flips).sum(),
        requests_per_s_ratio: load::median(&rps_ratios),
        runs: stall_runs,
    };

    let row = |system: System| rows.iter().find(|r| r.system == system);
    let figure = |system: System, f: fn(&Row) -> f64| row(system).map(f).unwrap_or(f64::NAN);
    let goals = vec![
        Goal::ratio(
            "transport-tls-throughput",
            figure(System::TcpTls, |r| r.throughput_ratio),
            "plaintext",
            Op::AtLeast,
            0.5,
        ),
        Goal::ratio(
            "transport-quic-throughput",
            figure(System::Quic, |r| r.throughput_ratio),
            "plaintext",
            Op::AtLeast,
            0.25,
        ),
        Goal::ratio("transport-tls-rtt", figure(System::TcpTls, |r| r.rtt_p50_ratio), "plaintext", Op::AtMost, 2.0),
        Goal::ratio("transport-quic-rtt", figure(System::Quic, |r| r.rtt_p50_ratio), "plaintext", Op::AtMost, 3.0),
        Goal::absolute("transport-switch-failed-requests", switch.failed_requests as f64, 0, Op::AtMost, 0.0),
    ];
    Report {
        benchmark: "transport",
        throughput_message_bytes: BULK_BYTES,
        throughput_in_flight: BULK_IN_FLIGHT,
        rtt_message_bytes: SMALL_BYTES,
        seconds_per_run: args.seconds,
        repeats: args.repeats,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        rows,
        switch,
        runs,
        goals,
    }
}

pub(super) fn print_table(r: &Report) {
    println!(
        "bench transport: node 1 (this process) to node 2 (a child process) on 127.0.0.1; {} s per run, median of {} interleaved repeats; {} cores",
        r.seconds_per_run, r.repeats, r.cores
    );
    println!(
        "throughput: 1 MiB messages, {} in flight, empty replies (Bulk channel); round trip: 4 KiB request and reply, 1 in flight (Replication channel)",
        r.throughput_in_flight
    );
    println!(
        "tcp+tls, quic: the Mesh with mutual TLS on the data layer; plaintext: the same framing on bare TCP, one connection per sender"
    );
    println!();
    println!(
        "{:<10} {:>9} {:>7} {:>12} {:>7} {:>12} {:>7}",
        "system", "MiB/s", "ratio", "rtt p50 µs", "ratio", "rtt p99 µs", "ratio"
    );
    for row in &r.rows {
        println!(
            "{:<10} {:>9.0} {:>6.2}x {:>12.1} {:>6.2}x {:>12.1} {:>6.2}x",
            row.system.name(),
            row.throughput_mib_per_s,
            row.throughput_ratio,
            row.rtt_p50_us,
            row.rtt_p50_ratio,
            row.rtt_p99_us,
            row.rtt_p99_ratio
        );
    }
    println!();
    let s = &r.switch;
    println!(
        "switch: longest stall {:.1} ms (no-switch baseline {:.1} ms), {} failed; {} switches completed ({} flips, every {} ms) with {} x 4 KiB requests in flight, worst of {} runs; requests/s {:.2}x no-switch",
        s.longest_stall_ms,
        s.baseline_longest_stall_ms,
        s.failed_requests,
        s.switches,
        s.flips,
        s.interval_ms,
        s.in_flight,
        s.runs.iter().filter(|x| x.switching).count(),
        s.requests_per_s_ratio
    );
    for g in &r.goals {
        println!("{}", g.line);
    }
}
