//! The paths workload: a host watches its path map (long-poll) and each answer carries the
//! map's generation. One watcher must never see a generation older than one it already saw,
//! or it could route I/O to a replica the cluster has since moved away from.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{KeyProblem, OpBrief};
use crate::history::{Call, Nanos, Op, Outcome, Timeline};

/// A watch that returned an older generation than an earlier watch of the same watcher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PathsBack {
    /// The host whose map it watches.
    pub key: String,
    pub process: u64,
    pub node: u64,
    pub op_id: u64,
    pub invoke: Nanos,
    pub complete: Nanos,
    pub generation: u64,
    /// The newest generation that watcher had seen before, and the watch that saw it.
    pub previous_generation: u64,
    pub previous_op_id: u64,
}

/// Every watch that went back, per watcher (process and host), in the watcher's order.
pub fn going_back(t: &Timeline) -> Vec<PathsBack> {
    let mut watchers: BTreeMap<(&str, u64), Vec<(&Op, u64)>> = BTreeMap::new();
    for op in &t.ops {
        if let (Call::Watch, Outcome::Ok { read: Some(generation) }) = (op.call, op.outcome) {
            watchers.entry((op.key.as_str(), op.process)).or_default().push((op, generation));
        }
    }
    let mut back = Vec::new();
    for ((key, process), mut watches) in watchers {
        // A client has one operation in flight at a time, so invocation order is its order.
        watches.sort_by_key(|(op, _)| (op.invoke, op.id));
        let mut newest: Option<(&Op, u64)> = None;
        for (op, generation) in watches {
            match newest {
                Some((prev, g)) if generation < g => back.push(PathsBack {
                    key: key.to_string(),
                    process,
                    node: op.node,
                    op_id: op.id,
                    invoke: op.invoke,
                    complete: op.complete,
                    generation,
                    previous_generation: g,
                    previous_op_id: prev.id,
                }),
                Some((_, g)) if generation == g => {}
                _ => newest = Some((op, generation)),
            }
        }
    }
    back
}

/// The paths workload's problems as the verdict lists them: the first going-back per host.
pub(crate) fn problems(back: &[PathsBack]) -> Vec<KeyProblem> {
    let mut first: BTreeMap<&str, (&PathsBack, usize)> = BTreeMap::new();
    for b in back {
        first.entry(b.key.as_str()).or_insert((b, 0)).1 += 1;
    }
    first
        .into_values()
        .map(|(b, count)| KeyProblem {
            key: b.key.clone(),
            ops: count,
            explanation: format!(
                "{}: watch by process {} at {} returned generation {} after generation {} \
                 (watch {}); {count} watch(es) of this host went back",
                b.key,
                b.process,
                super::seconds(b.invoke),
                b.generation,
                b.previous_generation,
                b.previous_op_id
            ),
            op: Some(OpBrief {
                id: b.op_id,
                process: b.process,
                node: b.node,
                call: format!("watch {}", b.generation),
                outcome: "ok",
                invoke: b.invoke,
                complete: b.complete,
            }),
            concurrent: Vec::new(),
            possible_values: Vec::new(),
            linearized_max: 0,
            linearized_tail: Vec::new(),
        })
        .collect()
}
