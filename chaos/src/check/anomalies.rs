//! Counts that name the damage in plain terms, next to the linearizability verdict: which
//! acknowledged writes were lost, which reads were stale, which reads returned something no
//! one wrote. Each is certain, not a guess: it relies on real-time order only (one operation
//! completed before another was invoked), never on when an operation might have taken effect.

use std::collections::HashMap;

use serde::Serialize;

use super::{read_value, registers, written_value};
use crate::history::{Nanos, Op, Timeline, Workload, INITIAL};

/// An acknowledged write the final read does not show, although the value it shows is older.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LostWrite {
    pub workload: Workload,
    pub key: String,
    pub value: u64,
    pub write_id: u64,
    pub process: u64,
    pub invoke: Nanos,
    pub complete: Nanos,
    pub final_read_id: u64,
    pub final_read_invoke: Nanos,
    /// What the final read saw ([`INITIAL`] if nothing).
    pub final_read_value: u64,
    /// The write that put that value there, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_read_writer: Option<u64>,
}

/// A read that returned a value already overwritten by an acknowledged write before it began.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StaleRead {
    pub workload: Workload,
    pub key: String,
    pub read_id: u64,
    pub process: u64,
    pub invoke: Nanos,
    pub complete: Nanos,
    pub value: u64,
    /// The write of `value` ([`None`] for [`INITIAL`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_writer: Option<u64>,
    /// A newer write, completed before the read began.
    pub newer_write_id: u64,
    pub newer_value: u64,
    pub newer_complete: Nanos,
}

/// A read of a value no write of its key ever had (torn, corrupt, foreign).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UnrecognizedRead {
    pub workload: Workload,
    pub key: String,
    pub read_id: u64,
    pub process: u64,
    pub invoke: Nanos,
    pub complete: Nanos,
    pub value: u64,
}

impl LostWrite {
    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "{} {}: w{} (op {}, process {}, acknowledged at {}) is missing; the final read (op {}) saw {}",
            self.workload.name(),
            self.key,
            self.value,
            self.write_id,
            self.process,
            super::seconds(self.complete),
            self.final_read_id,
            super::value_name(self.final_read_value)
        )
    }
}

impl StaleRead {
    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "{} {}: read op {} (process {}, from {}) saw {} although w{} was acknowledged at {}",
            self.workload.name(),
            self.key,
            self.read_id,
            self.process,
            super::seconds(self.invoke),
            super::value_name(self.value),
            self.newer_value,
            super::seconds(self.newer_complete)
        )
    }
}

impl UnrecognizedRead {
    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "{} {}: read op {} (process {}, at {}) returned {:#x}, which no write wrote",
            self.workload.name(),
            self.key,
            self.read_id,
            self.process,
            super::seconds(self.invoke),
            self.value
        )
    }
}

/// Every operation (any outcome) that writes each value.
fn writers<'a>(ops: &[&'a Op]) -> HashMap<u64, Vec<&'a Op>> {
    let mut by_value: HashMap<u64, Vec<&Op>> = HashMap::new();
    for op in ops {
        if let Some(v) = written_value(op.call) {
            by_value.entry(v).or_default().push(op);
        }
    }
    by_value
}

/// When value `v` was certainly in place: [`INITIAL`] from the start; another value once its
/// (every) writer was acknowledged. `None` if some writer is not acknowledged (it may have taken
/// effect any time), or nobody wrote it.
fn certain_since(v: u64, writers: &HashMap<u64, Vec<&Op>>) -> Option<(Nanos, Option<u64>)> {
    if v == INITIAL {
        return Some((0, None));
    }
    let ws = writers.get(&v)?;
    if ws.is_empty() || !ws.iter().all(|w| w.is_ok()) {
        return None;
    }
    let last = ws.iter().max_by_key(|w| w.complete)?;
    Some((last.complete, Some(last.id)))
}

/// Whether a value is older than a write invoked at `invoke`: it was in place (its writer
/// acknowledged) before that write began. [`INITIAL`] is older than every write.
fn older_than(since: Option<(Nanos, Option<u64>)>, invoke: Nanos) -> bool {
    match since {
        Some((_, None)) => true,
        Some((complete, Some(_))) => complete < invoke,
        None => false,
    }
}

/// Acknowledged writes the final read of their key does not show, where the final read is the
/// last ok read invoked after the heal, and the value it shows is real-time older than the
/// write (or the initial value). Writes still in flight when the final read began are not
/// counted: the read may rightly have come first.
pub fn lost_writes(t: &Timeline) -> Vec<LostWrite> {
    let mut lost = Vec::new();
    for ((workload, key), ops) in registers(t) {
        let Some((last, seen)) = ops
            .iter()
            .filter(|o| o.invoke >= t.heal)
            .filter_map(|o| read_value(o).map(|v| (*o, v)))
            .max_by_key(|(o, _)| (o.invoke, o.id))
        else {
            continue;
        };
        let writers = writers(&ops);
        let since = certain_since(seen, &writers);
        for w in &ops {
            let Some(value) = written_value(w.call).filter(|_| w.is_ok()) else {
                continue;
            };
            if value == seen || w.complete >= last.invoke || !older_than(since, w.invoke) {
                continue;
            }
            lost.push(LostWrite {
                workload,
                key: key.to_string(),
                value,
                write_id: w.id,
                process: w.process,
                invoke: w.invoke,
                complete: w.complete,
                final_read_id: last.id,
                final_read_invoke: last.invoke,
                final_read_value: seen,
                final_read_writer: since.and_then(|(_, id)| id),
            });
        }
    }
    lost
}

/// Ok reads invoked after some acknowledged write of their key completed, returning a value
/// that was in place before that write began (or the initial value).
pub fn stale_reads(t: &Timeline) -> Vec<StaleRead> {
    let mut stale = Vec::new();
    for ((workload, key), ops) in registers(t) {
        let writers = writers(&ops);
        // Acknowledged writes by completion, with the latest-invoked one among each prefix: a
        // read is stale iff that one, among the writes completed before it began, began after
        // the read's value was in place.
        let mut acked: Vec<&Op> =
            ops.iter().copied().filter(|o| o.is_ok() && written_value(o.call).is_some()).collect();
        acked.sort_by_key(|o| (o.complete, o.id));
        let mut latest_invoked: Vec<&Op> = Vec::with_capacity(acked.len());
        for w in &acked {
            let best = match latest_invoked.last() {
                Some(b) if b.invoke >= w.invoke => *b,
                _ => *w,
            };
            latest_invoked.push(best);
        }
        for r in &ops {
            let Some(value) = read_value(r) else { continue };
            let before = acked.partition_point(|w| w.complete < r.invoke);
            let Some(newer) = before.checked_sub(1).map(|k| latest_invoked[k]) else {
                continue;
            };
            let since = certain_since(value, &writers);
            if !older_than(since, newer.invoke) {
                continue;
            }
            stale.push(StaleRead {
                workload,
                key: key.to_string(),
                read_id: r.id,
                process: r.process,
                invoke: r.invoke,
                complete: r.complete,
                value,
                value_writer: since.and_then(|(_, id)| id),
                newer_write_id: newer.id,
                newer_value: written_value(newer.call).unwrap_or(INITIAL),
                newer_complete: newer.complete,
            });
        }
    }
    stale
}

/// Ok reads of a value that no write of their key (of any outcome) has.
pub fn unrecognized_reads(t: &Timeline) -> Vec<UnrecognizedRead> {
    let mut found = Vec::new();
    for ((workload, key), ops) in registers(t) {
        let writers = writers(&ops);
        for r in &ops {
            let Some(value) = read_value(r) else { continue };
            if value == INITIAL || writers.contains_key(&value) {
                continue;
            }
            found.push(UnrecognizedRead {
                workload,
                key: key.to_string(),
                read_id: r.id,
                process: r.process,
                invoke: r.invoke,
                complete: r.complete,
                value,
            });
        }
    }
    found
}
