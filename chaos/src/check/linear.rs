//! Linearizability of one register (read, write, compare-and-set on u64 values starting at
//! [`INITIAL`]): the Wing & Gong search with Lowe's memoization, as Knossos and porcupine do it.
//!
//! The history becomes a list of call and return events in time order. The search walks it,
//! linearizing an operation at its call (or at any later point before its return) when the
//! register allows it, lifting it out of the list, and backing up when it meets the return of
//! an operation it has not placed. A cache of (set of placed operations, register value) keeps
//! it from exploring the same configuration twice, which is what makes it fast on histories
//! with thousands of operations and a handful of clients.
//!
//! A history is linearizable iff each key's is (P-compositionality), so the caller splits by key.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::{either, seconds, value_name, KeyProblem, KeyVerdict, OpBrief, CONCURRENT_SHOWN_MAX};
use crate::history::{Call, Nanos, Op, Outcome, INITIAL};

/// Reading the clock on every step would cost more than the step; this often is still well
/// under a millisecond between looks.
const DEADLINE_CHECK_EVERY: u64 = 1024;
/// The cache is the search's memory; past this it gives up (Unknown) rather than take the
/// machine down with it.
const CACHE_BYTES_MAX: usize = 1 << 30;
/// How many values per operation the explanation remembers.
const VALUES_SHOWN_MAX: usize = 8;
/// How much of the longest partial linearization the explanation shows.
const TAIL_SHOWN_MAX: usize = 8;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Read(u64),
    Write(u64),
    Cas { expect: u64, new: u64 },
}

impl Kind {
    /// The register's value after this operation, or `None` if it cannot happen now.
    fn step(self, value: u64) -> Option<u64> {
        match self {
            Kind::Read(v) => (v == value).then_some(value),
            Kind::Write(v) => Some(v),
            Kind::Cas { expect, new } => (expect == value).then_some(new),
        }
    }
}

/// An operation the search must (or, for `optional`, may) place.
struct Item<'a> {
    op: &'a Op,
    kind: Kind,
    invoke: Nanos,
    /// When it must have taken effect by: its completion if ok; for info, the last moment its
    /// value can still matter (see [`prepare`]).
    complete: Nanos,
    /// Info operations may never have happened.
    optional: bool,
}

/// Turns one key's operations into what the search places.
///
/// - Failed operations never took effect, and info reads constrain nothing: dropped.
/// - An info write (or CAS) may take effect at any time after its invocation, so its completion
///   is in principle infinite, which would keep it concurrent with everything after it and
///   blow the search up on a long tail of timeouts. But values are unique: placing it only
///   matters to the operations that observe its value (ok reads of it, ok CASes expecting it,
///   and info CASes that themselves matter). If nothing observes it, leaving it out is always
///   as good as placing it, so it is dropped; otherwise placing it after its last observer
///   completed helps nobody, so that is its completion.
fn prepare<'a>(ops: &[&'a Op]) -> Vec<Item<'a>> {
    let mut observed_until: HashMap<u64, Nanos> = HashMap::new();
    for op in ops {
        let complete = op.complete.max(op.invoke);
        match (op.call, op.outcome) {
            (Call::Read, Outcome::Ok { read: Some(v) }) => {
                observe(&mut observed_until, v, complete);
            }
            (Call::Cas { expect, .. }, Outcome::Ok { .. }) => {
                observe(&mut observed_until, expect, complete);
            }
            _ => {}
        }
    }
    // Info CASes pass observation on to the value they expect; chains are short, and each
    // round settles at least one link, so this ends within `info_cas.len()` rounds.
    let info_cas: Vec<(u64, u64, Nanos)> = ops
        .iter()
        .filter(|op| op.outcome == Outcome::Info)
        .filter_map(|op| match op.call {
            Call::Cas { expect, new } => Some((expect, new, op.invoke)),
            _ => None,
        })
        .collect();
    for _ in 0..=info_cas.len() {
        let mut changed = false;
        for &(expect, new, invoke) in &info_cas {
            if let Some(&until) = observed_until.get(&new) {
                if until >= invoke {
                    changed |= observe(&mut observed_until, expect, until);
                }
            }
        }
        if !changed {
            break;
        }
    }

    let mut items = Vec::new();
    for op in ops {
        let kind = match (op.call, op.outcome) {
            (_, Outcome::Fail) | (Call::Watch, _) | (Call::Read, Outcome::Info) => continue,
            (Call::Read, Outcome::Ok { read: None }) => continue,
            (Call::Read, Outcome::Ok { read: Some(v) }) => Kind::Read(v),
            (Call::Write { value }, _) => Kind::Write(value),
            (Call::Cas { expect, new }, _) => Kind::Cas { expect, new },
        };
        let (complete, optional) = match op.outcome {
            Outcome::Info => {
                let produced = match kind {
                    Kind::Write(v) | Kind::Cas { new: v, .. } => v,
                    Kind::Read(_) => continue,
                };
                match observed_until.get(&produced) {
                    Some(&until) if until >= op.invoke => (until, true),
                    _ => continue,
                }
            }
            _ => (op.complete.max(op.invoke), false),
        };
        items.push(Item { op, kind, invoke: op.invoke, complete, optional });
    }
    items
}

/// Records that value `v` is observed until `t`; whether that moved its time.
fn observe(map: &mut HashMap<u64, Nanos>, v: u64, t: Nanos) -> bool {
    match map.get(&v) {
        Some(&until) if until >= t => false,
        _ => {
            map.insert(v, t);
            true
        }
    }
}

const NONE: usize = usize::MAX;
const HEAD: usize = 0;

/// The call/return events in time order, as a doubly linked list that operations are lifted
/// out of and put back into (Knuth's dancing links), so backtracking costs O(1).
struct Events {
    /// Per node (0 is the head): the item, and whether it is the call.
    item: Vec<usize>,
    is_call: Vec<bool>,
    prev: Vec<usize>,
    next: Vec<usize>,
    /// Per item: its call node and its return node.
    call_node: Vec<usize>,
    return_node: Vec<usize>,
}

impl Events {
    fn new(items: &[Item]) -> Events {
        // At equal times calls come first: operations that touch in time count as concurrent,
        // so clocks of the same reading never make a valid history look invalid.
        let mut order: Vec<(Nanos, bool, usize)> = Vec::with_capacity(2 * items.len());
        for (i, it) in items.iter().enumerate() {
            order.push((it.invoke, false, i));
            order.push((it.complete, true, i));
        }
        order.sort_unstable();
        let nodes = order.len() + 1;
        let mut e = Events {
            item: vec![NONE; nodes],
            is_call: vec![false; nodes],
            prev: vec![NONE; nodes],
            next: vec![NONE; nodes],
            call_node: vec![NONE; items.len()],
            return_node: vec![NONE; items.len()],
        };
        for (k, &(_, is_return, i)) in order.iter().enumerate() {
            let node = k + 1;
            e.item[node] = i;
            e.is_call[node] = !is_return;
            e.prev[node] = node - 1;
            e.next[node - 1] = node;
            if is_return {
                e.return_node[i] = node;
            } else {
                e.call_node[i] = node;
            }
        }
        e
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NONE {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NONE {
            self.prev[n] = node;
        }
    }

    fn lift(&mut self, item: usize) {
        self.unlink(self.call_node[item]);
        self.unlink(self.return_node[item]);
    }

    /// Undoes the latest [`Events::lift`] (lifts are undone in reverse order).
    fn unlift(&mut self, item: usize) {
        self.relink(self.return_node[item]);
        self.relink(self.call_node[item]);
    }
}

struct Frame {
    item: usize,
    /// The register's value before this frame.
    value: u64,
    /// Left out (an info operation that never happened) rather than placed.
    skipped: bool,
}

/// What the search remembers to explain a failure.
struct Trace {
    /// The furthest return node met with its operation unplaced, and that operation.
    stuck_node: usize,
    stuck_item: usize,
    /// Per item: values at which it was tried and could not happen (a few).
    refused: Vec<Vec<u64>>,
    /// Register values when the search stood at `stuck_node`.
    stuck_values: Vec<u64>,
    /// The longest partial linearization: its length, and (taken when the search backs out of
    /// it) its frames as (item, skipped).
    best_len: usize,
    best: Vec<(usize, bool)>,
}

fn remember(values: &mut Vec<u64>, v: u64) {
    if values.len() < VALUES_SHOWN_MAX && !values.contains(&v) {
        values.push(v);
    }
}

/// Whether one key's operations are linearizable with respect to a register starting at
/// [`INITIAL`]. Gives up with Unknown once `deadline` passes (or the search's memory budget is
/// spent). `ops` should all be of one key; watches, failed ops and info reads are ignored.
pub fn linearizable(ops: &[&Op], deadline: Instant) -> KeyVerdict {
    debug_assert!(ops.windows(2).all(|w| w[0].key == w[1].key), "one key's ops at a time");
    let items = prepare(ops);
    let n = items.len();
    if n == 0 {
        return KeyVerdict::Valid;
    }
    let mut events = Events::new(&items);
    let words = n.div_ceil(64);
    let cache_states_max = CACHE_BYTES_MAX / (words * 8 + 64);
    let mut placed = vec![0u64; words];
    let mut cache: HashSet<(Box<[u64]>, u64)> = HashSet::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut value = INITIAL;
    let mut node = events.next[HEAD];
    let mut trace = Trace {
        stuck_node: 0,
        stuck_item: NONE,
        refused: vec![Vec::new(); n],
        stuck_values: Vec::new(),
        best_len: 0,
        best: Vec::new(),
    };
    let set = |bits: &mut [u64], i: usize| bits[i / 64] |= 1 << (i % 64);
    let clear = |bits: &mut [u64], i: usize| bits[i / 64] &= !(1 << (i % 64));

    let mut steps: u64 = 0;
    loop {
        if steps % DEADLINE_CHECK_EVERY == 0 && Instant::now() >= deadline {
            return KeyVerdict::Unknown {
                reason: format!("out of time after {steps} steps ({} of {n} ops placed at best)", trace.best_len),
            };
        }
        steps += 1;
        if events.next[HEAD] == NONE {
            return KeyVerdict::Valid;
        }
        // The list ends with a return (every call precedes its own), so the walk meets one
        // before running off the end.
        assert_ne!(node, NONE, "the event walk ran past the last return");
        let i = events.item[node];
        let it = &items[i];
        let mut descend = None;
        if events.is_call[node] {
            match it.kind.step(value) {
                Some(after) => descend = Some((after, false)),
                None => remember(&mut trace.refused[i], value),
            }
        } else {
            // Its return with the operation unplaced: too late to place it here.
            if !it.optional && node >= trace.stuck_node {
                if node > trace.stuck_node {
                    trace.stuck_values.clear();
                }
                trace.stuck_node = node;
                trace.stuck_item = i;
                remember(&mut trace.stuck_values, value);
            }
            if it.optional {
                descend = Some((value, true));
            }
        }
        if let Some((after, skipped)) = descend {
            set(&mut placed, i);
            if cache.insert((placed.clone().into_boxed_slice(), after)) {
                if cache.len() > cache_states_max {
                    return KeyVerdict::Unknown { reason: format!("the search outgrew {} MiB", CACHE_BYTES_MAX >> 20) };
                }
                stack.push(Frame { item: i, value, skipped });
                value = after;
                events.lift(i);
                node = events.next[HEAD];
                if stack.len() > trace.best_len {
                    trace.best_len = stack.len();
                }
                continue;
            }
            clear(&mut placed, i);
        }
        if events.is_call[node] {
            node = events.next[node];
            continue;
        }
        // Back up to the latest placement and try the next position for it. Leaving an info
        // operation out is only ever tried after every place for it was, so backing out of that
        // continues further back.
        if stack.len() == trace.best_len && trace.best.len() != trace.best_len {
            trace.best = stack.iter().map(|f| (f.item, f.skipped)).collect();
        }
        loop {
            let Some(frame) = stack.pop() else {
                return KeyVerdict::Invalid(Box::new(explain(ops, &items, &trace)));
            };
            clear(&mut placed, frame.item);
            value = frame.value;
            events.unlift(frame.item);
            if !frame.skipped {
                node = events.next[events.call_node[frame.item]];
                break;
            }
        }
    }
}

fn explain(ops: &[&Op], items: &[Item], trace: &Trace) -> KeyProblem {
    let key = ops.first().map(|o| o.key.clone()).unwrap_or_default();
    let placed = trace.best.iter().filter(|(_, skipped)| !skipped).count();
    let linearized_tail: Vec<OpBrief> = trace
        .best
        .iter()
        .filter(|(_, skipped)| !skipped)
        .map(|&(i, _)| OpBrief::of(items[i].op))
        .skip(placed.saturating_sub(TAIL_SHOWN_MAX))
        .collect();
    let progress = format!("the longest linearization found places {placed} of {} ops", items.len());
    if trace.stuck_item == NONE {
        return KeyProblem {
            key,
            ops: items.len(),
            explanation: format!("no order of the operations explains the history ({progress})"),
            op: None,
            concurrent: Vec::new(),
            possible_values: Vec::new(),
            linearized_max: placed,
            linearized_tail,
        };
    }
    let x = &items[trace.stuck_item];
    let overlapping: Vec<&Item> = items
        .iter()
        .enumerate()
        .filter(|&(i, it)| i != trace.stuck_item && it.invoke <= x.complete && it.complete >= x.invoke)
        .map(|(_, it)| it)
        .collect();
    // For a read or CAS, the values it was tried at and refused; a write is never refused, so
    // for it the values the register held when the search had to give it up.
    let mut possible: Vec<u64> = Vec::new();
    for &v in trace.refused[trace.stuck_item].iter().chain(&trace.stuck_values) {
        let fits = matches!(x.kind, Kind::Write(_)) || x.kind.step(v).is_none();
        if fits && !possible.contains(&v) {
            possible.push(v);
        }
    }
    let when = format!("[{}, {}]", seconds(x.op.invoke), seconds(x.op.complete));
    let what = match x.kind {
        Kind::Read(v) => format!("read by process {} at {when} returned {}", x.op.process, value_name(v)),
        Kind::Write(v) => format!("write of {} by process {} at {when}", value_name(v), x.op.process),
        Kind::Cas { expect, new } => {
            format!("cas {} -> {} by process {} at {when}", value_name(expect), value_name(new), x.op.process)
        }
    };
    let why = if possible.is_empty() {
        " but no order of the operations concurrent to it lets it happen".to_string()
    } else {
        match x.kind {
            Kind::Read(_) | Kind::Cas { .. } => {
                format!(" but the register could only hold {} then", either(&possible))
            }
            Kind::Write(_) => {
                format!(" cannot be placed: the register held {} then and what follows does not fit", either(&possible))
            }
        }
    };
    KeyProblem {
        explanation: format!("{key}: {what}{why} ({} ops concurrent to it; {progress})", overlapping.len()),
        key,
        ops: items.len(),
        op: Some(OpBrief::of(x.op)),
        concurrent: overlapping.iter().take(CONCURRENT_SHOWN_MAX).map(|it| OpBrief::of(it.op)).collect(),
        possible_values: possible,
        linearized_max: placed,
        linearized_tail,
    }
}
