//! The checker's tests: classic hand-written histories, then random linearizable histories
//! (a sequential register with random linearization points) that must pass, and the same with
//! one read made stale, which must not.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::history::{Call, Op, Outcome, Timeline, Workload, INITIAL, UNRECOGNIZED};

const KEY: &str = "vol0/7";
const MS: u64 = 1_000_000;

/// A history under construction; times in milliseconds.
#[derive(Default)]
struct H {
    ops: Vec<Op>,
}

impl H {
    fn op(&mut self, process: u64, call: Call, outcome: Outcome, invoke_ms: u64, complete_ms: u64) -> &mut H {
        self.ops.push(Op {
            id: self.ops.len() as u64,
            process,
            workload: Workload::Register,
            key: KEY.to_string(),
            call,
            outcome,
            invoke: invoke_ms * MS,
            complete: complete_ms * MS,
            node: 1,
            error: None,
        });
        self
    }
    fn write(&mut self, p: u64, value: u64, a: u64, b: u64) -> &mut H {
        self.op(p, Call::Write { value }, ok(None), a, b)
    }
    fn read(&mut self, p: u64, value: u64, a: u64, b: u64) -> &mut H {
        self.op(p, Call::Read, ok(Some(value)), a, b)
    }
    fn cas(&mut self, p: u64, expect: u64, new: u64, outcome: Outcome, a: u64, b: u64) -> &mut H {
        self.op(p, Call::Cas { expect, new }, outcome, a, b)
    }
    fn verdict(&self) -> KeyVerdict {
        let refs: Vec<&Op> = self.ops.iter().collect();
        linearizable(&refs, Instant::now() + Duration::from_secs(30))
    }
    fn timeline(&self, heal_ms: u64) -> Timeline {
        Timeline {
            ops: self.ops.clone(),
            heal: heal_ms * MS,
            end: self.ops.iter().map(|o| o.complete).max().unwrap_or(0),
            ..Timeline::default()
        }
    }
}

fn ok(read: Option<u64>) -> Outcome {
    Outcome::Ok { read }
}

fn invalid(v: KeyVerdict) -> KeyProblem {
    match v {
        KeyVerdict::Invalid(p) => *p,
        other => panic!("expected invalid, got {other:?}"),
    }
}

#[test]
fn times_and_values_read_as_the_timeline_shows_them() {
    assert_eq!(seconds(12_340_000_000), "12.340s");
    assert_eq!(seconds(5 * MS), "0.005s");
    assert_eq!(either(&[21]), "w21");
    assert_eq!(either(&[21, 22]), "w21 or w22");
    assert_eq!(either(&[INITIAL, 1, 2]), "the initial value, w1 or w2");
}

#[test]
fn sequential_ok_history_is_valid() {
    let mut h = H::default();
    h.read(1, INITIAL, 0, 1).write(1, 1, 2, 3).read(2, 1, 4, 5).write(2, 2, 6, 7).read(1, 2, 8, 9);
    assert_eq!(h.verdict(), KeyVerdict::Valid);
}

#[test]
fn a_read_concurrent_with_a_write_may_see_either_value() {
    for seen in [INITIAL, 1] {
        let mut h = H::default();
        h.write(1, 1, 0, 10).read(2, seen, 2, 5);
        assert_eq!(h.verdict(), KeyVerdict::Valid, "read saw {seen}");
    }
    // And a later read must not go back once a concurrent read saw the new value.
    let mut h = H::default();
    h.write(1, 1, 0, 10).read(2, 1, 2, 4).read(3, INITIAL, 5, 6);
    invalid(h.verdict());
}

#[test]
fn a_read_of_an_overwritten_value_is_invalid_and_explained() {
    let mut h = H::default();
    h.write(1, 1, 0, 1).write(2, 2, 2, 3).read(3, 1, 4, 5);
    let p = invalid(h.verdict());
    assert_eq!(p.key, KEY);
    assert_eq!(p.op.as_ref().map(|o| o.id), Some(2));
    assert_eq!(p.possible_values, vec![2]);
    assert!(p.explanation.contains("read by process 3"), "{}", p.explanation);
    assert!(p.explanation.contains("returned w1 but the register could only hold w2"), "{}", p.explanation);
    assert_eq!(p.linearized_max, 2);

    let t = h.timeline(1_000);
    let stale = anomalies::stale_reads(&t);
    assert_eq!(stale.len(), 1);
    assert_eq!((stale[0].read_id, stale[0].value, stale[0].newer_write_id), (2, 1, 1));
    let f = check(&t, Duration::from_secs(10));
    assert!(!f.is_valid());
    assert_eq!(f.workloads[0].verdict, Verdict::Invalid);
}

#[test]
fn a_read_of_the_initial_value_after_a_write_is_stale() {
    let mut h = H::default();
    h.write(1, 1, 0, 1).read(2, INITIAL, 2, 3);
    invalid(h.verdict());
    let stale = anomalies::stale_reads(&h.timeline(0));
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].value_writer, None);
}

#[test]
fn a_read_of_a_value_never_written_is_invalid_and_unrecognized() {
    for v in [42, UNRECOGNIZED] {
        let mut h = H::default();
        h.write(1, 1, 0, 1).read(2, v, 2, 3);
        invalid(h.verdict());
        let u = anomalies::unrecognized_reads(&h.timeline(0));
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].value, v);
    }
}

#[test]
fn info_writes_may_show_up_later_or_never() {
    let mut h = H::default();
    h.op(1, Call::Write { value: 1 }, Outcome::Info, 0, 1).read(2, 1, 10, 11).read(2, 1, 12, 13);
    assert_eq!(h.verdict(), KeyVerdict::Valid);

    let mut h = H::default();
    h.op(1, Call::Write { value: 1 }, Outcome::Info, 0, 1).read(2, INITIAL, 10, 11);
    assert_eq!(h.verdict(), KeyVerdict::Valid);

    // But once seen and overwritten it cannot come back.
    let mut h = H::default();
    h.op(1, Call::Write { value: 1 }, Outcome::Info, 0, 1).read(2, 1, 10, 11).write(2, 2, 12, 13).read(2, 1, 14, 15);
    invalid(h.verdict());

    // An info read constrains nothing; a failed write never happened.
    let mut h = H::default();
    h.op(1, Call::Read, Outcome::Info, 0, 1)
        .op(1, Call::Write { value: 3 }, Outcome::Fail, 2, 3)
        .read(2, INITIAL, 4, 5);
    assert_eq!(h.verdict(), KeyVerdict::Valid);
}

#[test]
fn a_long_tail_of_info_writes_does_not_blow_up() {
    let mut h = H::default();
    let mut t = 0;
    for i in 1..=2_000u64 {
        h.op(i % 10, Call::Write { value: i }, Outcome::Info, t, t + 5);
        t += 1;
    }
    // A few of them show up, out of order with their invocations.
    h.read(20, 1_500, t, t + 1).read(21, 30, t + 2, t + 3).read(22, 1_999, t + 4, t + 5);
    let started = Instant::now();
    assert_eq!(h.verdict(), KeyVerdict::Valid);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn cas_takes_effect_when_ok_and_not_when_failed() {
    let mut h = H::default();
    h.write(1, 1, 0, 1).cas(2, 1, 2, ok(None), 2, 3).read(3, 2, 4, 5);
    assert_eq!(h.verdict(), KeyVerdict::Valid);

    // An ok CAS whose expected value was overwritten before it began.
    let mut h = H::default();
    h.write(1, 1, 0, 1).write(1, 3, 2, 3).cas(2, 1, 2, ok(None), 4, 5);
    let p = invalid(h.verdict());
    assert!(p.explanation.contains("cas w1 -> w2"), "{}", p.explanation);

    // A failed CAS changed nothing.
    let mut h = H::default();
    h.write(1, 1, 0, 1).cas(2, 5, 6, Outcome::Fail, 2, 3).read(3, 1, 4, 5);
    assert_eq!(h.verdict(), KeyVerdict::Valid);
    let mut h = H::default();
    h.write(1, 1, 0, 1).cas(2, 1, 6, Outcome::Fail, 2, 3).read(3, 6, 4, 5);
    invalid(h.verdict());

    // An info CAS may have happened, chained on another info write.
    let mut h = H::default();
    h.op(1, Call::Write { value: 1 }, Outcome::Info, 0, 1).cas(2, 1, 2, Outcome::Info, 2, 3).read(3, 2, 10, 11);
    assert_eq!(h.verdict(), KeyVerdict::Valid);

    // A chain of info CASes is only worth placing because an ok CAS at its end observes it
    // (found by the brute-force comparison: the chain must be followed to its start).
    let mut h = H::default();
    h.op(3, Call::Write { value: 4 }, Outcome::Info, 6, 7)
        .cas(2, 4, 1, Outcome::Info, 10, 14)
        .write(3, 3, 4, 5)
        .cas(3, 1, 2, Outcome::Info, 6, 11)
        .cas(0, 2, 5, ok(None), 10, 12);
    assert_eq!(h.verdict(), KeyVerdict::Valid);

    // Two concurrent CASes from the same value cannot both succeed.
    let mut h = H::default();
    h.write(1, 1, 0, 1).cas(2, 1, 2, ok(None), 2, 6).cas(3, 1, 3, ok(None), 2, 6);
    invalid(h.verdict());
}

#[test]
fn lost_writes_are_counted() {
    let mut h = H::default();
    h.write(1, 1, 0, 1).write(1, 2, 2, 3).read(2, 1, 11, 12);
    let lost = anomalies::lost_writes(&h.timeline(10));
    assert_eq!(lost.len(), 1);
    assert_eq!((lost[0].value, lost[0].write_id, lost[0].final_read_value), (2, 1, 1));
    assert_eq!(lost[0].final_read_writer, Some(0));

    let mut h = H::default();
    h.write(1, 1, 0, 1).write(1, 2, 2, 3).read(2, INITIAL, 11, 12).read(2, 2, 5, 6);
    let lost = anomalies::lost_writes(&h.timeline(10));
    assert_eq!(lost.iter().map(|l| l.value).collect::<Vec<_>>(), vec![1, 2]);
    let f = check(&h.timeline(10), Duration::from_secs(10));
    assert!(!f.is_valid());
    assert_eq!(f.lost.len(), 2);

    // Overwritten is not lost, and a write concurrent with the final read is not either.
    let mut h = H::default();
    h.write(1, 1, 0, 1).write(1, 2, 2, 3).write(2, 3, 10, 20).read(2, 2, 11, 12);
    assert!(anomalies::lost_writes(&h.timeline(10)).is_empty());
    assert!(check(&h.timeline(10), Duration::from_secs(10)).is_valid());
}

#[test]
fn watches_going_back_are_reported() {
    let mut h = H::default();
    for (i, g) in [1, 3, 3, 2, 4].into_iter().enumerate() {
        let at = i as u64 * 10;
        h.op(7, Call::Watch, ok(Some(g)), at, at + 5);
    }
    h.op(8, Call::Watch, ok(Some(1)), 100, 101);
    for op in &mut h.ops {
        op.workload = Workload::Paths;
        op.key = "host-a".into();
    }
    let t = h.timeline(0);
    let back = paths::going_back(&t);
    assert_eq!(back.len(), 1);
    assert_eq!((back[0].process, back[0].generation, back[0].previous_generation), (7, 2, 3));
    let f = check(&t, Duration::from_secs(1));
    assert!(!f.is_valid());
    assert_eq!(f.workloads.len(), 1);
    assert_eq!(f.workloads[0].workload, Workload::Paths);
    assert_eq!(f.workloads[0].verdict, Verdict::Invalid);
    assert_eq!((f.workloads[0].ops, f.workloads[0].keys), (6, 1));
}

#[test]
fn findings_group_by_workload_and_serialize() {
    let mut h = H::default();
    h.write(1, 1, 0, 1).read(2, 1, 2, 3);
    h.op(3, Call::Write { value: 9 }, ok(None), 0, 1).op(3, Call::Read, ok(Some(9)), 2, 3);
    h.ops[2].workload = Workload::Meta;
    h.ops[3].workload = Workload::Meta;
    h.ops[3].key = "other".into();
    let f = check(&h.timeline(0), Duration::from_secs(10));
    assert_eq!(f.workloads.len(), 2);
    let meta = f.workloads.iter().find(|w| w.workload == Workload::Meta).expect("meta");
    assert_eq!((meta.keys, meta.ops), (2, 2));
    // The meta read is of a value only another key wrote.
    assert_eq!(meta.verdict, Verdict::Invalid);
    assert_eq!(f.unrecognized.len(), 1);
    let json = serde_json::to_value(&f).expect("json");
    assert_eq!(json["workloads"][0]["workload"], "register");
    assert_eq!(json["workloads"][1]["keys-invalid"][0]["key"], "other");
    assert!(json["workloads"][1]["keys-invalid"][0]["explanation"].is_string());
}

#[test]
fn a_passed_deadline_gives_unknown() {
    let mut h = H::default();
    h.write(1, 1, 0, 1).read(2, 1, 2, 3);
    let refs: Vec<&Op> = h.ops.iter().collect();
    let v = linearizable(&refs, Instant::now());
    assert!(matches!(v, KeyVerdict::Unknown { .. }), "{v:?}");
    let f = check(&h.timeline(0), Duration::ZERO);
    assert_eq!(f.workloads[0].verdict, Verdict::Unknown);
    assert!(f.is_valid());
}

/// splitmix64: the generator's randomness, from a seed proptest chooses (and replays).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A linearizable history of one register: each process runs operations back to back, each
/// takes effect at a random point inside its interval (an info one maybe later, maybe never),
/// and the results come from applying them in that order to a sequential register.
fn linearizable_history(seed: u64, processes: u64, ops_per_process: u64) -> Vec<Op> {
    struct Planned {
        process: u64,
        call: Call,
        outcome: Outcome,
        invoke: u64,
        complete: u64,
        /// When it takes effect (unique), if it does.
        at: Option<u64>,
    }
    let mut rng = Rng(seed);
    let mut next_value = 1u64;
    let mut planned = Vec::new();
    for process in 0..processes {
        let mut t = rng.below(3);
        for _ in 0..ops_per_process {
            let invoke = t + 1 + rng.below(3);
            let duration = 1 + rng.below(6);
            let complete = invoke + duration;
            let call = match rng.below(10) {
                0..=4 => Call::Read,
                5..=7 => Call::Write { value: 0 },
                _ => Call::Cas { expect: 0, new: 0 },
            };
            let (outcome, window) = match rng.below(10) {
                0 => (Outcome::Info, if rng.below(2) == 0 { Some(duration + 20) } else { None }),
                1 => (Outcome::Fail, None),
                _ => (Outcome::Ok { read: None }, Some(duration)),
            };
            let at = window.map(|w| (invoke + rng.below(w)) * 1000 + 1 + rng.below(998));
            planned.push(Planned { process, call, outcome, invoke, complete, at });
            t = complete;
        }
    }
    // Apply the effects in linearization order.
    let mut order: Vec<usize> = (0..planned.len()).filter(|&i| planned[i].at.is_some()).collect();
    order.sort_by_key(|&i| (planned[i].at, i));
    let mut register = INITIAL;
    for i in order {
        let p = &mut planned[i];
        match p.call {
            Call::Read => {
                if p.outcome != Outcome::Info {
                    p.outcome = Outcome::Ok { read: Some(register) };
                }
            }
            Call::Write { .. } => {
                register = next_value;
                p.call = Call::Write { value: register };
                next_value += 1;
            }
            Call::Cas { .. } => {
                // An ok CAS fails half the time (expecting a value that is not there), which
                // the harness records as a failure; an info one that takes effect succeeds.
                if p.outcome != Outcome::Info && rng.below(2) == 0 {
                    p.call = Call::Cas { expect: register + 1_000_000, new: next_value };
                    p.outcome = Outcome::Fail;
                } else {
                    p.call = Call::Cas { expect: register, new: next_value };
                    register = next_value;
                }
                next_value += 1;
            }
            Call::Watch => {}
        }
    }
    // Operations that never took effect still carry values of their own.
    for p in &mut planned {
        if p.at.is_none() {
            match p.call {
                Call::Write { .. } => p.call = Call::Write { value: next_value },
                Call::Cas { .. } => p.call = Call::Cas { expect: rng.below(next_value), new: next_value },
                Call::Read | Call::Watch => {}
            }
            next_value += 1;
        }
    }
    planned.sort_by_key(|p| (p.invoke, p.process));
    planned
        .into_iter()
        .enumerate()
        .map(|(id, p)| Op {
            id: id as u64,
            process: p.process,
            workload: Workload::Register,
            key: KEY.to_string(),
            call: p.call,
            outcome: p.outcome,
            invoke: p.invoke * MS,
            complete: p.complete * MS,
            node: 1,
            error: None,
        })
        .collect()
}

/// A value an ok read certainly cannot return: one overwritten by an acknowledged write that
/// began after it was in place and completed before the read began.
fn impossible_value(ops: &[Op], read: &Op) -> Option<u64> {
    let acked: Vec<&Op> = ops.iter().filter(|o| o.is_ok() && written_value(o.call).is_some()).collect();
    let returned = read_value(read)?;
    let newer_done = |after: u64| acked.iter().any(|w| w.invoke > after && w.complete < read.invoke);
    if returned != INITIAL && newer_done(0) && acked.iter().any(|w| w.complete < read.invoke) {
        return Some(INITIAL);
    }
    acked
        .iter()
        .filter(|w| written_value(w.call) != Some(returned))
        .find(|w| newer_done(w.complete))
        .and_then(|w| written_value(w.call))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_linearizable_histories_pass_and_a_stale_read_fails_them(
        seed in any::<u64>(),
        processes in 3u64..=6,
        ops_per_process in 5u64..40,
        pick in any::<u64>(),
    ) {
        let mut ops = linearizable_history(seed, processes, ops_per_process);
        let refs: Vec<&Op> = ops.iter().collect();
        let v = linearizable(&refs, Instant::now() + Duration::from_secs(30));
        prop_assert_eq!(&v, &KeyVerdict::Valid);
        let t = Timeline { ops: ops.clone(), ..Timeline::default() };
        let f = check(&t, Duration::from_secs(30));
        prop_assert!(f.is_valid(), "{:?}", f);

        let candidates: Vec<(usize, u64)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, r)| impossible_value(&ops, r).map(|v| (i, v)))
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let (i, stale) = candidates[(pick % candidates.len() as u64) as usize];
        ops[i].outcome = Outcome::Ok { read: Some(stale) };
        let refs: Vec<&Op> = ops.iter().collect();
        let v = linearizable(&refs, Instant::now() + Duration::from_secs(30));
        prop_assert!(matches!(v, KeyVerdict::Invalid(_)), "read {} made to return {}: {:?}", i, stale, v);
        let t = Timeline { ops, ..Timeline::default() };
        prop_assert!(!anomalies::stale_reads(&t).is_empty());
    }
}

#[test]
fn five_thousand_ops_on_one_key_check_quickly() {
    let ops = linearizable_history(0x007a_4de3, 8, 625);
    assert_eq!(ops.len(), 5_000);
    let refs: Vec<&Op> = ops.iter().collect();
    assert_eq!(linearizable(&refs, Instant::now() + Duration::from_secs(30)), KeyVerdict::Valid);
}

#[test]
fn a_stale_read_early_in_five_thousand_ops_is_found_and_explained() {
    let mut ops = linearizable_history(0x5eed, 8, 625);
    let (i, stale) = ops
        .iter()
        .enumerate()
        .skip(100)
        .find_map(|(i, r)| impossible_value(&ops, r).map(|v| (i, v)))
        .expect("a read to make stale");
    ops[i].outcome = Outcome::Ok { read: Some(stale) };
    let refs: Vec<&Op> = ops.iter().collect();
    let p = invalid(linearizable(&refs, Instant::now() + Duration::from_secs(30)));
    assert_eq!(p.op.as_ref().map(|o| o.id), Some(ops[i].id));
}

/// Linearizability by brute force, for tiny histories: every order that respects real time,
/// info operations placed anywhere after their invocation or left out. Slow and obviously
/// right, so the fast checker can be compared with it.
fn brute_force(ops: &[&Op]) -> bool {
    let ops: Vec<&Op> = ops.iter().copied().filter(|o| o.outcome != Outcome::Fail).collect();
    fn go(ops: &[&Op], done: &mut Vec<bool>, value: u64) -> bool {
        if (0..ops.len()).all(|i| done[i] || ops[i].outcome == Outcome::Info) {
            return true;
        }
        for i in 0..ops.len() {
            if done[i] {
                continue;
            }
            // Some unplaced ok operation completed before this one began: it must come first.
            let blocked =
                (0..ops.len()).any(|j| !done[j] && j != i && ops[j].is_ok() && ops[j].complete < ops[i].invoke);
            if blocked {
                continue;
            }
            let after = match (ops[i].call, ops[i].outcome) {
                (Call::Read, Outcome::Ok { read: Some(v) }) => (v == value).then_some(value),
                (Call::Read, _) => Some(value),
                (Call::Write { value: v }, _) => Some(v),
                (Call::Cas { expect, new }, _) => (expect == value).then_some(new),
                (Call::Watch, _) => Some(value),
            };
            if let Some(after) = after {
                done[i] = true;
                let found = go(ops, done, after);
                done[i] = false;
                if found {
                    return true;
                }
            }
        }
        false
    }
    let mut done = vec![false; ops.len()];
    go(&ops, &mut done, INITIAL)
}

fn tiny_history(seed: u64, len: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut h = H::default();
    for _ in 0..len {
        let invoke = rng.below(12);
        let complete = invoke + rng.below(6);
        let outcome = match rng.below(6) {
            0 => Outcome::Info,
            1 => Outcome::Fail,
            _ => Outcome::Ok { read: None },
        };
        let call = match rng.below(3) {
            0 => Call::Read,
            1 => Call::Write { value: 1 + rng.below(4) },
            _ => Call::Cas { expect: rng.below(5), new: 1 + rng.below(4) },
        };
        let outcome = match (call, outcome) {
            (Call::Read, Outcome::Ok { .. }) => Outcome::Ok { read: Some(rng.below(5)) },
            _ => outcome,
        };
        h.op(rng.below(4), call, outcome, invoke, complete);
    }
    h.ops
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Random tiny histories, most of them not linearizable, values repeating (which the
    /// checker must not rely on): it agrees with brute force either way.
    #[test]
    fn agrees_with_brute_force_on_tiny_histories(seed in any::<u64>(), len in 1u64..10) {
        let ops = tiny_history(seed, len);
        let refs: Vec<&Op> = ops.iter().collect();
        let expected = brute_force(&refs);
        let v = linearizable(&refs, Instant::now() + Duration::from_secs(30));
        prop_assert_eq!(v == KeyVerdict::Valid, expected, "{:?}: {:#?}", v, ops);
        prop_assert!(!matches!(v, KeyVerdict::Unknown { .. }), "unknown");
        // The counts claim certainty: a linearizable history has no stale read and no lost
        // write, whichever read is final.
        if expected {
            let t = Timeline { ops: ops.clone(), ..Timeline::default() };
            prop_assert!(anomalies::stale_reads(&t).is_empty());
            prop_assert!(anomalies::lost_writes(&t).is_empty());
        }
    }
}
