//! Draws the timeline of a made-up 60 s run (three faults, an election, a failover, about
//! 20,000 operations with plausible latencies) to `/tmp/report-demo/` (or the directory given
//! as the first argument), to look at the picture without running a cluster:
//! `cargo run -p tandem-chaos --example report_demo && rsvg-convert -o /tmp/report-demo/timeline.png /tmp/report-demo/timeline.svg`.

use std::path::PathBuf;

use tandem_chaos::history::{Call, Fault, Mark, MarkKind, Nanos, Op, Outcome, Timeline, Workload};
use tandem_chaos::report::{figures, html_page, timeline_svg};

const MS: Nanos = 1_000_000;
const S: Nanos = 1_000_000_000;

/// xorshift64*: the demo needs no crate for randomness, only a fixed sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A log-normal latency around `median_ms`: most fast, a long tail.
    fn latency(&mut self, median_ms: f64, spread: f64) -> Nanos {
        let (u1, u2) = (self.unit().max(1e-12), self.unit());
        let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (median_ms * (spread * normal).exp() * 1e6) as Nanos
    }
}

/// What the faults do to one operation: its outcome and latency.
fn outcome(rng: &mut Rng, w: Workload, node: u64, at: Nanos) -> (Outcome, Nanos) {
    let ok = Outcome::Ok { read: None };
    let base = match w {
        Workload::Register => rng.latency(1.2, 0.5),
        Workload::Set => rng.latency(2.0, 0.4),
        Workload::Meta => rng.latency(4.0, 0.6),
        Workload::Paths => 200 * MS + rng.next() % (2 * S),
    };
    // Partition of the leader, node 1, 12 s .. 22 s; node 2 is elected at 13.5 s.
    if (12 * S..22 * S).contains(&at) && node == 1 {
        return if at < 13_500 * MS || rng.unit() < 0.3 { (Outcome::Info, 3 * S) } else { (Outcome::Fail, base / 2) };
    }
    if (12 * S..13_500 * MS).contains(&at) && w == Workload::Meta {
        return (ok, 13_500 * MS - at + base);
    }
    // Node 2 killed at 25 s, restarted at 27 s; vol0 fails over to node 3 at 26 s.
    if (25 * S..26 * S).contains(&at) && node == 2 {
        return (Outcome::Info, 26 * S - at + 20 * MS);
    }
    if (25 * S..27 * S).contains(&at) && node == 2 {
        return (Outcome::Fail, rng.latency(0.4, 0.3));
    }
    if (26 * S..28 * S).contains(&at) {
        return (ok, base * 8);
    }
    // Packet loss on node 3 from 18 s to the heal at 45 s: retransmissions, a few timeouts.
    if (18 * S..45 * S).contains(&at) && node == 3 {
        let r = rng.unit();
        if r < 0.02 {
            return (Outcome::Info, 3 * S);
        }
        if r < 0.25 {
            return (ok, base + 200 * MS + rng.next() % (800 * MS));
        }
    }
    (ok, base)
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp/report-demo"));
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let end = 60 * S;
    let mut ops = Vec::new();
    // (workload, clients, think time between ops)
    let clients = [
        (Workload::Register, 6, 20 * MS),
        (Workload::Set, 3, 40 * MS),
        (Workload::Meta, 2, 100 * MS),
        (Workload::Paths, 2, 10 * MS),
    ];
    let mut process = 0;
    for (w, n, think) in clients {
        for _ in 0..n {
            process += 1;
            let node = process % 3 + 1;
            let mut at = rng.next() % (50 * MS);
            while at < end {
                let (outcome, latency) = outcome(&mut rng, w, node, at);
                let call = match w {
                    Workload::Paths => Call::Watch,
                    _ if rng.unit() < 0.5 => Call::Read,
                    Workload::Meta => Call::Cas { expect: 1, new: 2 },
                    _ => Call::Write { value: 1 },
                };
                let error = (!matches!(outcome, Outcome::Ok { .. })).then(|| "demo".to_string());
                let complete = (at + latency).min(end);
                ops.push(Op {
                    id: 0,
                    process,
                    workload: w,
                    key: "vol0/7".into(),
                    call,
                    outcome,
                    invoke: at,
                    complete,
                    node,
                    error,
                });
                at = complete + think / 2 + rng.next() % think;
            }
        }
    }
    ops.sort_by_key(|op| op.invoke);
    for (i, op) in ops.iter_mut().enumerate() {
        op.id = i as u64;
    }
    let mark = |time, kind, label: &str| Mark { time, kind, label: label.into() };
    let t = Timeline {
        ops,
        faults: vec![
            Fault { kind: "partition-leader".into(), target: "{1} | {2,3}".into(), start: 12 * S, stop: Some(22 * S) },
            Fault { kind: "packet-loss".into(), target: "30% loss on node 3".into(), start: 18 * S, stop: None },
            Fault { kind: "sigkill-primary".into(), target: "node 2".into(), start: 25 * S, stop: Some(27 * S) },
        ],
        marks: vec![
            mark(10 * S, MarkKind::Phase, "faults begin"),
            mark(13_500 * MS, MarkKind::Election, "node 2 leads (term 3)"),
            mark(13_800 * MS, MarkKind::Failover, "vol1: primary 1 -> 2 (epoch 2)"),
            mark(22_300 * MS, MarkKind::Election, "node 2 leads (term 4), node 1 rejoins"),
            mark(26 * S, MarkKind::Failover, "vol0: primary 2 -> 3 (epoch 4)"),
            mark(45 * S, MarkKind::Phase, "heal"),
            mark(52 * S, MarkKind::Phase, "final reads"),
        ],
        faults_start: 10 * S,
        heal: 45 * S,
        end,
    };
    let f = figures(&t);
    let title = "chaos run: partition-leader + packet-loss + sigkill-primary";
    let svg = timeline_svg(&t, title, "seed 0x5eed1234 · transport tcp · 3 nodes · verdict: valid (demo data)");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("timeline.svg"), &svg)?;
    std::fs::write(dir.join("timeline.html"), html_page(&svg, title, &f.summary_rows()))?;
    std::fs::write(dir.join("figures.json"), serde_json::to_string_pretty(&f)?)?;
    println!("{} ops, svg {} bytes, in {}", t.ops.len(), svg.len(), dir.display());
    Ok(())
}
