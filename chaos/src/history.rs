//! What a run records: every operation a client made (invoked, then ok / fail / info), every
//! fault the nemeses injected, and what the cluster did meanwhile (elections, failovers). The
//! checker and the report read these; `history.jsonl` holds one [`Event`] per line, in the
//! order they happened.
//!
//! Outcomes follow Jepsen: `ok` took effect, `fail` certainly did not, `info` is unknown (a
//! timeout, a connection cut mid-request): the operation may take effect at any later time.

use serde::{Deserialize, Serialize};

/// Nanoseconds since the run started (its clock is monotonic).
pub type Nanos = u64;

/// The value of a register before anyone wrote it (a block of zeros, a missing setting).
pub const INITIAL: u64 = 0;
/// What a read reports when the content it got is no write's at all (torn, corrupt, foreign):
/// no write ever has this value, so a checker can never explain it.
pub const UNRECOGNIZED: u64 = u64::MAX;

/// Which workload an operation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Per-block registers on a few hot blocks over NBD (reads and overwrites).
    Register,
    /// Writes of unique blocks, each written once, read back after the heal.
    Set,
    /// A register in the metadata store (a setting) with compare-and-set, through HTTP.
    Meta,
    /// A host's path-map watch (long-poll): generations never go back.
    Paths,
}

impl Workload {
    pub const ALL: [Workload; 4] = [Workload::Register, Workload::Set, Workload::Meta, Workload::Paths];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Set => "set",
            Workload::Meta => "meta",
            Workload::Paths => "paths",
        }
    }
}

/// What an operation asked for. Values are write ids: unique per run, never [`INITIAL`] or
/// [`UNRECOGNIZED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "f")]
pub enum Call {
    Read,
    Write {
        value: u64,
    },
    /// Sets `new` if the register holds `expect` (fails otherwise, having changed nothing).
    Cas {
        expect: u64,
        new: u64,
    },
    /// A path-map watch that returned a map of this generation.
    Watch,
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum Outcome {
    /// Took effect; a read or watch carries what it returned.
    Ok { read: Option<u64> },
    /// Certainly did not take effect (the cluster said so before doing anything, or a CAS
    /// found another value).
    Fail,
    /// Unknown: may have taken effect, at any time after it was invoked.
    Info,
}

/// One completed operation (its invoke and completion joined).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Unique in the run, in invocation order.
    pub id: u64,
    /// The client that made it; a client has one operation in flight at a time.
    pub process: u64,
    pub workload: Workload,
    /// The register (`vol/block`, a setting's name, a host's name for watches).
    pub key: String,
    pub call: Call,
    pub outcome: Outcome,
    pub invoke: Nanos,
    /// When the client learnt the outcome (for `info`: when it gave up).
    pub complete: Nanos,
    /// The node the client spoke to.
    pub node: u64,
    /// What the client was told, for `fail` and `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    pub fn latency_ns(&self) -> u64 {
        self.complete.saturating_sub(self.invoke)
    }

    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }
}

/// One line of `history.jsonl`: an operation's invocation, or its completion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum Event {
    Invoke {
        id: u64,
        time: Nanos,
        process: u64,
        workload: Workload,
        key: String,
        call: Call,
        node: u64,
    },
    Complete {
        id: u64,
        time: Nanos,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Fault(Fault),
    Mark(Mark),
}

/// A fault a nemesis injected, from start to stop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// The nemesis kind (`partition-leader`, `sigkill-primary`, `packet-loss`, ...).
    pub kind: String,
    /// What it hit, in words (`node 2`, `{1} | {2,3}`, `30% loss on node 3`).
    pub target: String,
    pub start: Nanos,
    /// When it was healed; `None` if it lasted to the end of the fault phase.
    pub stop: Option<Nanos>,
}

/// Something the cluster did that a reader of the timeline wants to see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub time: Nanos,
    pub kind: MarkKind,
    /// In words: `node 3 leads (term 7)`, `vol0: primary 1 -> 2 (epoch 4)`.
    pub label: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MarkKind {
    Election,
    Failover,
    /// The phase boundaries: faults begin, the heal, the final checks.
    Phase,
}

/// A whole run's record, as the checker and the report read it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    pub ops: Vec<Op>,
    pub faults: Vec<Fault>,
    pub marks: Vec<Mark>,
    /// When the faults began and when the heal was done (the "before / during / after" split).
    pub faults_start: Nanos,
    pub heal: Nanos,
    /// The run's length.
    pub end: Nanos,
}

impl Timeline {
    /// Joins invocations and completions into operations; an operation invoked but never
    /// completed (the run ended first) is `info`, completed at the end.
    pub fn from_events(events: &[Event]) -> Timeline {
        let mut t = Timeline::default();
        let mut open: std::collections::BTreeMap<u64, Op> = Default::default();
        let mut done: Vec<Op> = Vec::new();
        for e in events {
            match e {
                Event::Invoke { id, time, process, workload, key, call, node } => {
                    t.end = t.end.max(*time);
                    open.insert(
                        *id,
                        Op {
                            id: *id,
                            process: *process,
                            workload: *workload,
                            key: key.clone(),
                            call: *call,
                            outcome: Outcome::Info,
                            invoke: *time,
                            complete: *time,
                            node: *node,
                            error: None,
                        },
                    );
                }
                Event::Complete { id, time, outcome, error } => {
                    t.end = t.end.max(*time);
                    if let Some(mut op) = open.remove(id) {
                        op.outcome = *outcome;
                        op.complete = *time;
                        op.error = error.clone();
                        done.push(op);
                    }
                }
                Event::Fault(f) => {
                    t.end = t.end.max(f.stop.unwrap_or(f.start));
                    t.faults.push(f.clone());
                }
                Event::Mark(m) => {
                    t.end = t.end.max(m.time);
                    t.marks.push(m.clone());
                }
            }
        }
        for (_, mut op) in open {
            op.complete = t.end;
            op.error = Some("the run ended before it completed".into());
            done.push(op);
        }
        done.sort_by_key(|o| o.id);
        t.ops = done;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_join_into_ops_and_unfinished_ones_are_info() {
        let events = vec![
            Event::Invoke {
                id: 0,
                time: 10,
                process: 1,
                workload: Workload::Register,
                key: "v/0".into(),
                call: Call::Write { value: 5 },
                node: 1,
            },
            Event::Invoke {
                id: 1,
                time: 12,
                process: 2,
                workload: Workload::Register,
                key: "v/0".into(),
                call: Call::Read,
                node: 2,
            },
            Event::Complete { id: 0, time: 20, outcome: Outcome::Ok { read: None }, error: None },
            Event::Mark(Mark { time: 30, kind: MarkKind::Phase, label: "end".into() }),
        ];
        let line = serde_json::to_string(&events[0]).expect("json");
        assert_eq!(serde_json::from_str::<Event>(&line).expect("parse"), events[0]);
        let t = Timeline::from_events(&events);
        assert_eq!(t.ops.len(), 2);
        assert!(t.ops[0].is_ok());
        assert_eq!(t.ops[0].latency_ns(), 10);
        assert_eq!(t.ops[1].outcome, Outcome::Info);
        assert_eq!(t.ops[1].complete, 30);
        assert_eq!(t.end, 30);
    }
}
