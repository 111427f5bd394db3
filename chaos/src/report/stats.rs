//! The run's figures, computed from its [`Timeline`]: how many operations ended which way,
//! overall and per workload; throughput and latency before, during and after the faults; how
//! long after the heal writes succeeded again; what the faults were and how long they lasted.
//!
//! Pure: a timeline in, a [`Figures`] out. `report.json` embeds it as it is (serde), and the
//! timeline page shows [`Figures::summary_rows`].

use std::collections::BTreeMap;

use serde::Serialize;

use crate::history::{Call, Nanos, Op, Outcome, Timeline, Workload};

const NANOS_PER_S: f64 = 1e9;
const NANOS_PER_MS: f64 = 1e6;

/// How many operations were invoked and how each ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct Counts {
    pub invoked: u64,
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
}

impl Counts {
    fn add(&mut self, op: &Op) {
        self.invoked += 1;
        match op.outcome {
            Outcome::Ok { .. } => self.ok += 1,
            Outcome::Fail => self.fail += 1,
            Outcome::Info => self.info += 1,
        }
    }
}

/// The three parts of a run, split at the start of the faults and at the heal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// `[0, faults_start)`: the cluster healthy, the baseline.
    Before,
    /// `[faults_start, heal)`: the nemeses at work.
    During,
    /// `[heal, end]`: recovery and the final reads.
    After,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Before, Phase::During, Phase::After];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Before => "before",
            Phase::During => "during",
            Phase::After => "after",
        }
    }

    /// The phase an operation belongs to, by its invoke time: an operation invoked during the
    /// faults counts there even if it completed after the heal, since the faults shaped it.
    pub fn of(t: &Timeline, invoke: Nanos) -> Phase {
        if invoke < t.faults_start {
            Phase::Before
        } else if invoke < t.heal {
            Phase::During
        } else {
            Phase::After
        }
    }
}

/// What a group of operations (one phase, perhaps one workload) achieved. Latencies are those of
/// `ok` operations only: a `fail` is often fast (refused at once) and an `info` is a client's
/// timeout, so mixing them in would make a bad phase look fast or merely show the timeout.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct Load {
    pub invoked: u64,
    pub ok: u64,
    /// `ok` operations per second of the phase; `None` if the phase lasted no time.
    pub throughput_ok_per_s: Option<f64>,
    /// Nearest-rank percentiles; `None` without any `ok` operation.
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub latency_ms_max: Option<f64>,
}

/// One phase's span and load, overall and per workload (workloads with an operation in it).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct PhaseFigures {
    pub phase: Phase,
    pub start_s: f64,
    pub end_s: f64,
    pub all: Load,
    pub per_workload: BTreeMap<&'static str, Load>,
}

/// How long after the heal writes succeeded again: from the heal to the completion of the
/// first `ok` write or compare-and-set invoked at or after it. Operations invoked before the
/// heal are left out on purpose: one stuck through the whole fault may complete just after the
/// heal and say nothing about recovery.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct HealFigures {
    /// Over the block workloads (register and set): when hosts could write to volumes again.
    /// `None` if no block write succeeded after the heal.
    pub blocks_ms: Option<f64>,
    /// Per workload that issued writes at all during the run (so `None` here means it wrote
    /// before, but never successfully after the heal).
    pub per_workload: BTreeMap<&'static str, Option<f64>>,
}

/// One kind of fault: how often it was injected and how long it lasted in all.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct FaultKindFigures {
    pub count: u64,
    pub total_s: f64,
}

/// One injected fault on the run's clock.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct FaultSpan {
    pub kind: String,
    pub target: String,
    pub start_s: f64,
    /// When it stopped; for a fault that was never stopped on its own, the heal.
    pub stop_s: f64,
    /// It lasted until the heal (the record has no stop of its own).
    pub until_heal: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct FaultFigures {
    pub by_kind: BTreeMap<String, FaultKindFigures>,
    /// In the order they were injected.
    pub list: Vec<FaultSpan>,
}

/// Everything the report says in numbers about one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub struct Figures {
    pub duration_s: f64,
    pub faults_start_s: f64,
    pub heal_s: f64,
    pub ops: Counts,
    /// Workloads that made at least one operation.
    pub ops_per_workload: BTreeMap<&'static str, Counts>,
    /// Before, during, after, in that order.
    pub phases: Vec<PhaseFigures>,
    pub heal_to_first_write_ms: HealFigures,
    pub faults: FaultFigures,
}

/// Computes a run's figures.
pub fn figures(t: &Timeline) -> Figures {
    let mut ops = Counts::default();
    let mut ops_per_workload: BTreeMap<&'static str, Counts> = BTreeMap::new();
    for op in &t.ops {
        ops.add(op);
        ops_per_workload.entry(op.workload.name()).or_default().add(op);
    }
    Figures {
        duration_s: seconds(t.end),
        faults_start_s: seconds(t.faults_start),
        heal_s: seconds(t.heal),
        ops,
        ops_per_workload,
        phases: Phase::ALL.iter().map(|&p| phase_figures(t, p)).collect(),
        heal_to_first_write_ms: heal_figures(t),
        faults: fault_figures(t),
    }
}

/// A fault's effective stop: its own, or the heal for one that lasted through the fault phase.
/// A heal before the start (a record without a heal) falls back to the end of the run.
pub fn fault_stop(t: &Timeline, start: Nanos, stop: Option<Nanos>) -> Nanos {
    match stop {
        Some(s) => s.max(start),
        None if t.heal >= start => t.heal,
        None => t.end.max(start),
    }
}

fn seconds(ns: Nanos) -> f64 {
    ns as f64 / NANOS_PER_S
}

fn millis(ns: Nanos) -> f64 {
    ns as f64 / NANOS_PER_MS
}

fn phase_span(t: &Timeline, p: Phase) -> (Nanos, Nanos) {
    match p {
        Phase::Before => (0, t.faults_start),
        Phase::During => (t.faults_start, t.heal.max(t.faults_start)),
        Phase::After => (t.heal, t.end.max(t.heal)),
    }
}

fn phase_figures(t: &Timeline, p: Phase) -> PhaseFigures {
    let (start, end) = phase_span(t, p);
    let in_phase: Vec<&Op> = t.ops.iter().filter(|op| Phase::of(t, op.invoke) == p).collect();
    let mut per_workload = BTreeMap::new();
    for w in Workload::ALL {
        let of_w: Vec<&Op> = in_phase.iter().copied().filter(|op| op.workload == w).collect();
        if !of_w.is_empty() {
            per_workload.insert(w.name(), load(&of_w, end - start));
        }
    }
    PhaseFigures {
        phase: p,
        start_s: seconds(start),
        end_s: seconds(end),
        all: load(&in_phase, end - start),
        per_workload,
    }
}

fn load(ops: &[&Op], span: Nanos) -> Load {
    let mut latencies: Vec<Nanos> = ops.iter().filter(|op| op.is_ok()).map(|op| op.latency_ns()).collect();
    latencies.sort_unstable();
    let ok = latencies.len() as u64;
    Load {
        invoked: ops.len() as u64,
        ok,
        throughput_ok_per_s: (span > 0).then(|| ok as f64 / seconds(span)),
        latency_ms_p50: percentile(&latencies, 50).map(millis),
        latency_ms_p99: percentile(&latencies, 99).map(millis),
        latency_ms_max: latencies.last().copied().map(millis),
    }
}

/// Nearest rank: the smallest value with at least `pct`% of the values at or below it, so a
/// percentile is always a latency some operation actually had.
fn percentile(sorted: &[Nanos], pct: u64) -> Option<Nanos> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (pct * sorted.len() as u64).div_ceil(100).max(1);
    Some(sorted[rank as usize - 1])
}

fn is_write(op: &Op) -> bool {
    matches!(op.call, Call::Write { .. } | Call::Cas { .. })
}

fn heal_figures(t: &Timeline) -> HealFigures {
    let mut first_ok: BTreeMap<&'static str, Option<Nanos>> = BTreeMap::new();
    let mut blocks: Option<Nanos> = None;
    for op in t.ops.iter().filter(|op| is_write(op)) {
        let slot = first_ok.entry(op.workload.name()).or_default();
        if !(op.is_ok() && op.invoke >= t.heal) {
            continue;
        }
        let after = op.complete.saturating_sub(t.heal);
        *slot = Some(slot.map_or(after, |s| s.min(after)));
        if matches!(op.workload, Workload::Register | Workload::Set) {
            blocks = Some(blocks.map_or(after, |b| b.min(after)));
        }
    }
    HealFigures {
        blocks_ms: blocks.map(millis),
        per_workload: first_ok.into_iter().map(|(w, ns)| (w, ns.map(millis))).collect(),
    }
}

fn fault_figures(t: &Timeline) -> FaultFigures {
    let mut figures = FaultFigures::default();
    for f in &t.faults {
        let stop = fault_stop(t, f.start, f.stop);
        let kind = figures.by_kind.entry(f.kind.clone()).or_default();
        kind.count += 1;
        kind.total_s += seconds(stop - f.start);
        figures.list.push(FaultSpan {
            kind: f.kind.clone(),
            target: f.target.clone(),
            start_s: seconds(f.start),
            stop_s: seconds(stop),
            until_heal: f.stop.is_none(),
        });
    }
    figures
}

impl Figures {
    /// The few lines a reader wants first, as (what, value) for the timeline page's table.
    pub fn summary_rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        let c = &self.ops;
        rows.push((
            "operations".to_string(),
            format!("{} invoked: {} ok, {} fail, {} info", c.invoked, c.ok, c.fail, c.info),
        ));
        rows.push((
            "phases (s)".to_string(),
            format!(
                "before 0–{:.1}, during {:.1}–{:.1}, after {:.1}–{:.1}",
                self.faults_start_s, self.faults_start_s, self.heal_s, self.heal_s, self.duration_s
            ),
        ));
        let per_phase = |f: &dyn Fn(&Load) -> String| -> String {
            self.phases.iter().map(|p| format!("{} {}", p.phase.name(), f(&p.all))).collect::<Vec<_>>().join(", ")
        };
        rows.push((
            "ok ops/s".to_string(),
            per_phase(&|l| l.throughput_ok_per_s.map_or("–".to_string(), |v| format!("{v:.0}"))),
        ));
        rows.push(("ok latency p99".to_string(), per_phase(&|l| l.latency_ms_p99.map_or("–".to_string(), format_ms))));
        rows.push(("ok latency max".to_string(), per_phase(&|l| l.latency_ms_max.map_or("–".to_string(), format_ms))));
        let heal = &self.heal_to_first_write_ms;
        let mut recovery = vec![format!("blocks {}", heal.blocks_ms.map_or("never".to_string(), format_ms))];
        for (w, ms) in &heal.per_workload {
            recovery.push(format!("{w} {}", ms.map_or("never".to_string(), format_ms)));
        }
        rows.push(("heal → first ok write".to_string(), recovery.join(", ")));
        let faults: Vec<String> =
            self.faults.by_kind.iter().map(|(kind, k)| format!("{kind} ×{} ({:.1} s)", k.count, k.total_s)).collect();
        rows.push(("faults".to_string(), if faults.is_empty() { "none".to_string() } else { faults.join(", ") }));
        rows
    }
}

/// A latency for people: milliseconds below a second, seconds above.
pub fn format_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Fault;

    const MS: Nanos = 1_000_000;
    const S: Nanos = 1_000_000_000;

    fn op(id: u64, workload: Workload, call: Call, outcome: Outcome, invoke: Nanos, complete: Nanos) -> Op {
        Op { id, process: id, workload, key: "k".into(), call, outcome, invoke, complete, node: 1, error: None }
    }

    const OK: Outcome = Outcome::Ok { read: None };
    const W: Call = Call::Write { value: 7 };

    /// 10 s run: faults from 2 s, heal at 6 s.
    fn timeline(ops: Vec<Op>) -> Timeline {
        Timeline { ops, faults: vec![], marks: vec![], faults_start: 2 * S, heal: 6 * S, end: 10 * S }
    }

    #[test]
    fn counts_overall_and_per_workload() {
        let t = timeline(vec![
            op(0, Workload::Register, W, OK, 0, MS),
            op(1, Workload::Register, Call::Read, Outcome::Fail, 0, MS),
            op(2, Workload::Meta, Call::Cas { expect: 1, new: 2 }, Outcome::Info, 0, MS),
            op(3, Workload::Paths, Call::Watch, OK, 0, MS),
        ]);
        let f = figures(&t);
        assert_eq!(f.ops, Counts { invoked: 4, ok: 2, fail: 1, info: 1 });
        assert_eq!(f.ops_per_workload["register"], Counts { invoked: 2, ok: 1, fail: 1, info: 0 });
        assert_eq!(f.ops_per_workload["meta"], Counts { invoked: 1, ok: 0, fail: 0, info: 1 });
        assert_eq!(f.ops_per_workload["paths"], Counts { invoked: 1, ok: 1, fail: 0, info: 0 });
        assert!(!f.ops_per_workload.contains_key("set"));
        assert_eq!(f.duration_s, 10.0);
        assert_eq!(f.faults_start_s, 2.0);
        assert_eq!(f.heal_s, 6.0);
    }

    #[test]
    fn phases_split_by_invoke_time_with_ok_latencies_only() {
        let mut ops = Vec::new();
        // Before (2 s): 100 ok ops with latencies 1..=100 ms, one fail of 5 s (ignored).
        for i in 0..100 {
            ops.push(op(i, Workload::Set, W, OK, i * MS, i * MS + (i + 1) * MS));
        }
        ops.push(op(100, Workload::Set, W, Outcome::Fail, 0, 5 * S));
        // During (4 s): invoked at 5.9 s, completes after the heal: still "during".
        ops.push(op(101, Workload::Register, W, OK, 5_900 * MS, 7 * S));
        ops.push(op(102, Workload::Register, W, Outcome::Info, 3 * S, 10 * S));
        // After (4 s): invoked exactly at the heal and at the end.
        ops.push(op(103, Workload::Register, Call::Read, OK, 6 * S, 6 * S + 2 * MS));
        ops.push(op(104, Workload::Register, Call::Read, OK, 10 * S, 10 * S + 4 * MS));
        let f = figures(&timeline(ops));

        let [before, during, after] = [&f.phases[0], &f.phases[1], &f.phases[2]];
        assert_eq!((before.phase, before.start_s, before.end_s), (Phase::Before, 0.0, 2.0));
        assert_eq!((during.phase, during.start_s, during.end_s), (Phase::During, 2.0, 6.0));
        assert_eq!((after.phase, after.start_s, after.end_s), (Phase::After, 6.0, 10.0));

        assert_eq!((before.all.invoked, before.all.ok), (101, 100));
        assert_eq!(before.all.throughput_ok_per_s, Some(50.0));
        assert_eq!(before.all.latency_ms_p50, Some(50.0));
        assert_eq!(before.all.latency_ms_p99, Some(99.0));
        assert_eq!(before.all.latency_ms_max, Some(100.0));
        assert_eq!(before.per_workload.keys().collect::<Vec<_>>(), vec![&"set"]);

        assert_eq!((during.all.invoked, during.all.ok), (2, 1));
        assert_eq!(during.all.throughput_ok_per_s, Some(0.25));
        assert_eq!(during.all.latency_ms_p50, Some(1100.0));
        assert_eq!(during.all.latency_ms_max, Some(1100.0));

        assert_eq!((after.all.invoked, after.all.ok), (2, 2));
        assert_eq!(after.all.throughput_ok_per_s, Some(0.5));
        assert_eq!(after.all.latency_ms_p50, Some(2.0));
        assert_eq!(after.all.latency_ms_p99, Some(4.0));
        assert_eq!(after.per_workload["register"].ok, 2);
    }

    #[test]
    fn a_phase_without_ok_ops_or_time_has_no_latency_or_throughput() {
        let mut t = timeline(vec![op(0, Workload::Meta, W, Outcome::Fail, 3 * S, 3 * S)]);
        t.faults_start = 0;
        let f = figures(&t);
        assert_eq!(f.phases[0].all, Load::default());
        assert_eq!(f.phases[1].all.invoked, 1);
        assert_eq!(f.phases[1].all.latency_ms_p50, None);
        assert_eq!(f.phases[1].all.throughput_ok_per_s, Some(0.0));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 1), Some(7));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[1, 2], 50), Some(1));
        assert_eq!(percentile(&[1, 2], 51), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 99), Some(4));
    }

    #[test]
    fn heal_to_first_write_counts_only_writes_invoked_after_the_heal() {
        let heal = 6 * S;
        let t = timeline(vec![
            // Invoked before the heal, completes right after it: not recovery.
            op(0, Workload::Register, W, OK, 5 * S, heal + MS),
            // Reads and failed writes after the heal do not count.
            op(1, Workload::Register, Call::Read, OK, heal, heal + 2 * MS),
            op(2, Workload::Register, W, Outcome::Fail, heal, heal + 3 * MS),
            // The first ok register write completes 700 ms after the heal; a later one, earlier
            // invoked one completing later, must not win.
            op(3, Workload::Register, W, OK, heal + 100 * MS, heal + 900 * MS),
            op(4, Workload::Register, Call::Cas { expect: 7, new: 8 }, OK, heal + 200 * MS, heal + 700 * MS),
            op(5, Workload::Set, W, OK, heal + 1500 * MS, heal + 1600 * MS),
            // Meta wrote before the heal only: present, never recovered.
            op(6, Workload::Meta, W, OK, S, S + MS),
            op(7, Workload::Meta, W, Outcome::Info, heal, 10 * S),
            // Paths never writes.
            op(8, Workload::Paths, Call::Watch, OK, heal, heal + MS),
        ]);
        let h = figures(&t).heal_to_first_write_ms;
        assert_eq!(h.blocks_ms, Some(700.0));
        assert_eq!(h.per_workload["register"], Some(700.0));
        assert_eq!(h.per_workload["set"], Some(1600.0));
        assert_eq!(h.per_workload["meta"], None);
        assert!(!h.per_workload.contains_key("paths"));

        let none = figures(&timeline(vec![op(0, Workload::Set, W, Outcome::Fail, 7 * S, 8 * S)]));
        assert_eq!(none.heal_to_first_write_ms.blocks_ms, None);
        assert_eq!(none.heal_to_first_write_ms.per_workload["set"], None);
    }

    #[test]
    fn faults_by_kind_with_open_faults_lasting_until_the_heal() {
        let mut t = timeline(vec![]);
        let fault = |kind: &str, start, stop| Fault { kind: kind.into(), target: "node 2".into(), start, stop };
        t.faults = vec![
            fault("partition-leader", 2 * S, Some(3 * S)),
            fault("sigkill-primary", 2500 * MS, Some(2500 * MS)),
            fault("partition-leader", 4 * S, None),
        ];
        let f = figures(&t).faults;
        assert_eq!(f.by_kind["partition-leader"], FaultKindFigures { count: 2, total_s: 3.0 });
        assert_eq!(f.by_kind["sigkill-primary"], FaultKindFigures { count: 1, total_s: 0.0 });
        assert_eq!(f.list.len(), 3);
        assert_eq!((f.list[1].start_s, f.list[1].stop_s, f.list[1].until_heal), (2.5, 2.5, false));
        assert_eq!((f.list[2].start_s, f.list[2].stop_s, f.list[2].until_heal), (4.0, 6.0, true));
        assert_eq!(f.list[2].target, "node 2");
    }

    #[test]
    fn figures_serialize_with_snake_case_names() {
        let t = timeline(vec![op(0, Workload::Register, W, OK, 7 * S, 7 * S + MS)]);
        let f = figures(&t);
        let json = serde_json::to_value(&f).expect("json");
        assert_eq!(json["phases"][2]["phase"], "after");
        assert_eq!(json["phases"][2]["all"]["latency_ms_p99"], 1.0);
        assert_eq!(json["heal_to_first_write_ms"]["blocks_ms"], 1001.0);
        assert_eq!(json["ops_per_workload"]["register"]["ok"], 1);
        let rows = f.summary_rows();
        assert_eq!(rows[0], ("operations".to_string(), "1 invoked: 1 ok, 0 fail, 0 info".to_string()));
        assert!(rows.iter().any(|(k, v)| k == "heal → first ok write" && v.contains("blocks 1.00 s")));
    }

    #[test]
    fn latencies_format_for_people() {
        assert_eq!(format_ms(0.25), "0.25 ms");
        assert_eq!(format_ms(42.4), "42 ms");
        assert_eq!(format_ms(1500.0), "1.50 s");
    }
}
