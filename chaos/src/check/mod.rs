//! The chaos suite's checker: reads a run's [`Timeline`] and says whether the cluster kept its
//! promises. Pure code: no I/O, and no clock beyond the time limit it is given to give up.
//!
//! - [`linear`]: linearizability of each register (WGL with Lowe's memoization), per key.
//! - [`anomalies`]: counts that name the damage in plain terms: acknowledged writes lost,
//!   stale reads, reads of values nobody wrote.
//! - [`paths`]: path-map watches, whose generations must never go back.
//!
//! [`check`] runs them all and returns [`Findings`], which the report embeds in `report.json`.

pub mod anomalies;
pub mod linear;
pub mod paths;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::history::{Call, Nanos, Op, Outcome, Timeline, Workload, INITIAL, UNRECOGNIZED};

pub use anomalies::{LostWrite, StaleRead, UnrecognizedRead};
pub use linear::linearizable;
pub use paths::PathsBack;

/// A workload's verdict, worst key first: one invalid key makes the workload invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Valid,
    Invalid,
    /// The checker ran out of time (or memory budget) on some key and found nothing wrong
    /// elsewhere: not a failure, but not a proof either.
    Unknown,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Valid => "valid",
            Verdict::Invalid => "invalid",
            Verdict::Unknown => "unknown",
        }
    }

    /// Only `invalid` fails a run: `unknown` is reported, but it is the checker's limit, not
    /// the cluster's fault.
    pub fn is_invalid(self) -> bool {
        self == Verdict::Invalid
    }
}

/// One key's linearizability verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
pub enum KeyVerdict {
    Valid,
    Invalid(Box<KeyProblem>),
    Unknown { reason: String },
}

/// Why a key's history is wrong, in terms a reader of the timeline can follow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeyProblem {
    pub key: String,
    /// How many operations the check considered (failed ops and info reads are dropped); for
    /// paths, how many watches of the host went back.
    pub ops: usize,
    /// One sentence: which operation could not be placed, and why.
    pub explanation: String,
    /// The operation that could not be placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<OpBrief>,
    /// Operations overlapping it in time (the first [`CONCURRENT_SHOWN_MAX`]).
    pub concurrent: Vec<OpBrief>,
    /// Values the register could hold while that operation was in flight (as far as the
    /// search got).
    pub possible_values: Vec<u64>,
    /// The longest partial linearization the search found, in ops.
    pub linearized_max: usize,
    /// Its last few operations, in linearization order: where the search got stuck.
    pub linearized_tail: Vec<OpBrief>,
}

/// An operation, short, for reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OpBrief {
    pub id: u64,
    pub process: u64,
    pub node: u64,
    /// `read w3`, `write w5`, `cas w1->w2`, `watch 7`.
    pub call: String,
    /// `ok`, `fail` or `info`.
    pub outcome: &'static str,
    pub invoke: Nanos,
    pub complete: Nanos,
}

impl OpBrief {
    pub fn of(op: &Op) -> OpBrief {
        let read = match op.outcome {
            Outcome::Ok { read } => read,
            _ => None,
        };
        let call = match op.call {
            Call::Read => match read {
                Some(v) => format!("read {}", value_name(v)),
                None => "read".to_string(),
            },
            Call::Write { value } => format!("write {}", value_name(value)),
            Call::Cas { expect, new } => format!("cas {}->{}", value_name(expect), value_name(new)),
            Call::Watch => match read {
                Some(g) => format!("watch {g}"),
                None => "watch".to_string(),
            },
        };
        let outcome = match op.outcome {
            Outcome::Ok { .. } => "ok",
            Outcome::Fail => "fail",
            Outcome::Info => "info",
        };
        OpBrief {
            id: op.id,
            process: op.process,
            node: op.node,
            call,
            outcome,
            invoke: op.invoke,
            complete: op.complete,
        }
    }
}

/// How many concurrent operations a [`KeyProblem`] lists: enough to see the race, short enough
/// to read.
pub const CONCURRENT_SHOWN_MAX: usize = 12;

/// One workload's linearizability (or, for paths, monotonicity) verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct WorkloadVerdict {
    pub workload: Workload,
    pub verdict: Verdict,
    pub ops: usize,
    pub keys: usize,
    pub keys_invalid: Vec<KeyProblem>,
    pub keys_unknown: usize,
}

/// Everything the checker found in a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Findings {
    pub workloads: Vec<WorkloadVerdict>,
    pub lost: Vec<LostWrite>,
    pub stale: Vec<StaleRead>,
    pub unrecognized: Vec<UnrecognizedRead>,
    pub paths_back: Vec<PathsBack>,
}

impl Findings {
    /// Whether the run kept every promise. Unknown verdicts do not fail a run (the checker ran
    /// out of time, the cluster did nothing provably wrong); stale reads do, being
    /// linearizability violations the counts name outright.
    pub fn is_valid(&self) -> bool {
        self.workloads.iter().all(|w| w.verdict != Verdict::Invalid)
            && self.lost.is_empty()
            && self.stale.is_empty()
            && self.unrecognized.is_empty()
            && self.paths_back.is_empty()
    }
}

/// Checks a whole run. Each register key gets an equal share of what is left of `time_limit`
/// when its turn comes, so a hard key cannot starve the others and time saved on easy keys goes
/// to the later ones. This is the checker's only reading of the clock.
pub fn check(t: &Timeline, time_limit: Duration) -> Findings {
    let end = Instant::now() + time_limit;
    let registers = registers(t);
    let keys_total = registers.len();
    let mut verdicts: BTreeMap<Workload, WorkloadVerdict> = BTreeMap::new();
    for (i, ((workload, _), ops)) in registers.iter().enumerate() {
        let now = Instant::now();
        let keys_left = u32::try_from(keys_total - i).unwrap_or(u32::MAX);
        let deadline = now + end.saturating_duration_since(now) / keys_left;
        let v = verdicts.entry(*workload).or_insert_with(|| empty_verdict(*workload));
        v.keys += 1;
        v.ops += ops.len();
        match linearizable(ops, deadline) {
            KeyVerdict::Valid => {}
            KeyVerdict::Invalid(problem) => v.keys_invalid.push(*problem),
            KeyVerdict::Unknown { .. } => v.keys_unknown += 1,
        }
    }

    let paths_back = paths::going_back(t);
    let watches: Vec<&Op> = t.ops.iter().filter(|o| o.call == Call::Watch).collect();
    if !watches.is_empty() {
        let v = verdicts.entry(Workload::Paths).or_insert_with(|| empty_verdict(Workload::Paths));
        v.ops = watches.len();
        let mut hosts: Vec<&str> = watches.iter().map(|o| o.key.as_str()).collect();
        hosts.sort_unstable();
        hosts.dedup();
        v.keys = hosts.len();
        v.keys_invalid = paths::problems(&paths_back);
    }

    let mut workloads: Vec<WorkloadVerdict> = verdicts.into_values().collect();
    for w in &mut workloads {
        w.verdict = if !w.keys_invalid.is_empty() {
            Verdict::Invalid
        } else if w.keys_unknown > 0 {
            Verdict::Unknown
        } else {
            Verdict::Valid
        };
    }
    Findings {
        workloads,
        lost: anomalies::lost_writes(t),
        stale: anomalies::stale_reads(t),
        unrecognized: anomalies::unrecognized_reads(t),
        paths_back,
    }
}

fn empty_verdict(workload: Workload) -> WorkloadVerdict {
    WorkloadVerdict { workload, verdict: Verdict::Valid, ops: 0, keys: 0, keys_invalid: Vec::new(), keys_unknown: 0 }
}

/// The register operations (reads, writes, CASes) of every workload, by workload and key, in
/// a fixed order so that runs check (and report) the same way every time.
pub(crate) fn registers(t: &Timeline) -> BTreeMap<(Workload, &str), Vec<&Op>> {
    let mut by_key: BTreeMap<(Workload, &str), Vec<&Op>> = BTreeMap::new();
    for op in &t.ops {
        if op.call == Call::Watch || op.workload == Workload::Paths {
            continue;
        }
        by_key.entry((op.workload, op.key.as_str())).or_default().push(op);
    }
    by_key
}

/// The value an operation puts in its register, if it writes one.
pub(crate) fn written_value(call: Call) -> Option<u64> {
    match call {
        Call::Write { value } => Some(value),
        Call::Cas { new, .. } => Some(new),
        Call::Read | Call::Watch => None,
    }
}

/// What a successful read returned.
pub(crate) fn read_value(op: &Op) -> Option<u64> {
    match (op.call, op.outcome) {
        (Call::Read, Outcome::Ok { read }) => read,
        _ => None,
    }
}

/// A value as reports name it: values are write ids, so `w17` is "what write 17 wrote".
pub fn value_name(v: u64) -> String {
    match v {
        INITIAL => "the initial value".to_string(),
        UNRECOGNIZED => "an unrecognized value".to_string(),
        v => format!("w{v}"),
    }
}

/// Run time in seconds, as the timeline shows it.
pub fn seconds(t: Nanos) -> String {
    format!("{}.{:03}s", t / 1_000_000_000, (t % 1_000_000_000) / 1_000_000)
}

/// `a`, `a or b`, `a, b or c`.
pub(crate) fn either(values: &[u64]) -> String {
    let names: Vec<String> = values.iter().map(|v| value_name(*v)).collect();
    match names.split_last() {
        None => "nothing".to_string(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}
