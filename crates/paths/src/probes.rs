//! One host's probe reports turned into per-path verdicts, with hysteresis.
//!
//! The host's agent probes every path it may use and reports each result
//! ([`HostProbes::record`]); the path manager calls [`HostProbes::evaluate`] on its tick and
//! republishes the host's paths when it returns true. The rules are asymmetric on purpose:
//! losing a path is acted on quickly (a refused connection at once, timeouts after
//! [`FAILURES_TO_DOWN`]), getting it back needs sustained evidence ([`RECOVER_AFTER`] and
//! [`SUCCESSES_TO_UP`]), and latency only matters when it is far off the host's best path for
//! [`SLOW_SUSTAIN`]. Every published change costs a new map generation on every host, so a
//! verdict must not follow noise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_types::NodeId;

/// A path with no report for this long goes back to [`Reach::Unprobed`]: its agent stopped,
/// and a verdict nobody refreshes must not keep steering I/O. Many probe periods, so a late
/// report or two does not forget a path.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// Consecutive failures (timeouts, resets) that make a path unreachable. One lost probe on a
/// busy network is not a dead path; a refused connection is, and is acted on at once.
pub const FAILURES_TO_DOWN: u32 = 3;

/// An unreachable path is reachable again only after its consecutive successes span at least
/// this long (and number at least [`SUCCESSES_TO_UP`]): a link that flaps every second never
/// comes back.
pub const RECOVER_AFTER: Duration = Duration::from_secs(2);

/// See [`RECOVER_AFTER`]: the span alone could be two successes far apart.
pub const SUCCESSES_TO_UP: u32 = 3;

/// A path is slow when its smoothed round-trip time exceeds the host's best path's times this
/// factor plus [`SLOW_FLOOR_US`]. Relative, so a remote site is not slow merely for being far
/// when all paths are far.
pub const SLOW_FACTOR: u64 = 4;

/// Absolute slack added to the slow threshold: loopback and same-rack round trips jitter
/// between 0.05 and 3 ms, and that must never make a path slow.
pub const SLOW_FLOOR_US: u64 = 2000;

/// A path becomes slow after its smoothed round-trip time stays above the threshold this long,
/// and stops being slow after it stays below half the threshold this long. The gap between the
/// two bounds and the wait keep a path near the threshold from flapping.
pub const SLOW_SUSTAIN: Duration = Duration::from_secs(3);

/// Trackers kept per host. A host reports on the paths it was told about (nodes × target
/// addresses: a few hundred in the largest cluster we plan for), but the reports come over the
/// network: a confused or hostile agent inventing addresses must not grow the leader's memory.
/// Reports for new paths beyond the limit are ignored; those paths stay [`Reach::Unprobed`],
/// which is treated as usable, so the limit can never take a working path away.
pub const PATHS_PER_HOST_MAX: usize = 4096;

/// Longest error text kept as the `why` of an unreachable path (it ends up in a published
/// reason, and the error comes from the host).
pub const WHY_BYTES_MAX: usize = 120;

/// The smoothing of round-trip times: each sample weighs 1 / 2^`RTT_EWMA_SHIFT` (alpha 1/4).
const RTT_EWMA_SHIFT: u32 = 2;

/// One probe result, as reported by the host's agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    Ok {
        rtt_us: u64,
    },
    /// `refused`: the node's port refused the connection (the node or its server is gone),
    /// as opposed to a timeout or reset that one lost packet could explain.
    Failed {
        refused: bool,
        error: String,
    },
}

/// What the host's probes say about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// No current evidence either way (never reported, or the reports went stale): usable.
    Unprobed,
    /// `slow`: far slower than this host's best path, for long enough to matter.
    Reachable { slow: bool },
    /// `why` is the error of the failure that made it unreachable, kept while it stays so.
    Unreachable { why: String },
}

/// All probe trackers of one host, keyed by (node, address). Time is an argument.
#[derive(Clone, Debug, Default)]
pub struct HostProbes {
    trackers: BTreeMap<(NodeId, SocketAddr), Tracker>,
    /// Some path's [`Reach`] changed since the last [`HostProbes::evaluate`].
    changed: bool,
}

#[derive(Clone, Debug)]
struct Tracker {
    last_report: Instant,
    verdict: Verdict,
    failures: u32,
    /// The current run of consecutive successes: when it began and how many.
    successes: Option<(Instant, u32)>,
    rtt_ewma_us: Option<u64>,
    slow: bool,
    /// Since when the smoothed RTT has been on the far side of the bound that would flip
    /// `slow` (above the threshold while fast, below half of it while slow).
    flip_since: Option<Instant>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Reported on, but no verdict yet (fewer than [`FAILURES_TO_DOWN`] timeouts so far).
    Unprobed,
    Reachable,
    Unreachable {
        why: String,
    },
}

impl Tracker {
    fn new(now: Instant) -> Self {
        Tracker {
            last_report: now,
            verdict: Verdict::Unprobed,
            failures: 0,
            successes: None,
            rtt_ewma_us: None,
            slow: false,
            flip_since: None,
        }
    }

    fn reach(&self) -> Reach {
        match &self.verdict {
            Verdict::Unprobed => Reach::Unprobed,
            Verdict::Reachable => Reach::Reachable { slow: self.slow },
            Verdict::Unreachable { why } => Reach::Unreachable { why: why.clone() },
        }
    }

    fn is_stale(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_report) >= STALE_AFTER
    }

    /// Sets the verdict; slowness starts over whenever reachability changes. Returns true if
    /// the [`Reach`] changed.
    fn set_verdict(&mut self, verdict: Verdict) -> bool {
        let before = self.reach();
        self.verdict = verdict;
        self.slow = false;
        self.flip_since = None;
        self.reach() != before
    }

    /// Applies one report. Returns true if the [`Reach`] changed.
    fn record(&mut self, now: Instant, outcome: ProbeOutcome) -> bool {
        self.last_report = now;
        match outcome {
            ProbeOutcome::Ok { rtt_us } => {
                self.failures = 0;
                self.rtt_ewma_us = Some(match self.rtt_ewma_us {
                    None => rtt_us,
                    Some(ewma) => (ewma - (ewma >> RTT_EWMA_SHIFT)).saturating_add(rtt_us >> RTT_EWMA_SHIFT),
                });
                let (since, count) = self.successes.get_or_insert((now, 0));
                *count = count.saturating_add(1);
                let sustained = *count >= SUCCESSES_TO_UP && now.saturating_duration_since(*since) >= RECOVER_AFTER;
                match self.verdict {
                    // An unprobed path is already treated as usable: one success confirms it.
                    Verdict::Unprobed => self.set_verdict(Verdict::Reachable),
                    Verdict::Reachable => false,
                    Verdict::Unreachable { .. } if sustained => self.set_verdict(Verdict::Reachable),
                    Verdict::Unreachable { .. } => false,
                }
            }
            ProbeOutcome::Failed { refused, error } => {
                self.successes = None;
                self.failures = self.failures.saturating_add(1);
                let lost = refused || self.failures >= FAILURES_TO_DOWN;
                match self.verdict {
                    // Keep the first error: a reason that changed with every failure would
                    // republish the map at every probe.
                    Verdict::Unreachable { .. } => false,
                    _ if lost => self.set_verdict(Verdict::Unreachable { why: truncate(error, WHY_BYTES_MAX) }),
                    _ => false,
                }
            }
        }
    }

    /// Advances the slow classification against `threshold_us`. Returns true if `slow` flipped.
    fn classify(&mut self, now: Instant, threshold_us: u64) -> bool {
        let (Verdict::Reachable, Some(ewma)) = (&self.verdict, self.rtt_ewma_us) else {
            return false;
        };
        let beyond = if self.slow { ewma < threshold_us / 2 } else { ewma > threshold_us };
        if !beyond {
            self.flip_since = None;
            return false;
        }
        let since = *self.flip_since.get_or_insert(now);
        if now.saturating_duration_since(since) < SLOW_SUSTAIN {
            return false;
        }
        self.slow = !self.slow;
        self.flip_since = None;
        true
    }
}

/// `text` cut to at most `bytes_max` bytes, on a char boundary.
fn truncate(mut text: String, bytes_max: usize) -> String {
    if text.len() > bytes_max {
        let end = (0..=bytes_max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(end);
    }
    text
}

impl HostProbes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one probe result reported by the host's agent.
    pub fn record(&mut self, now: Instant, node: NodeId, address: SocketAddr, outcome: ProbeOutcome) {
        let key = (node, address);
        if self.trackers.get(&key).is_some_and(|t| t.is_stale(now)) {
            // A report after a silence starts from scratch, as evaluate would have done.
            self.drop_tracker(&key);
        }
        if !self.trackers.contains_key(&key) && self.trackers.len() >= PATHS_PER_HOST_MAX {
            return;
        }
        let tracker = self.trackers.entry(key).or_insert_with(|| Tracker::new(now));
        self.changed |= tracker.record(now, outcome);
    }

    /// Advances the time-based rules (staleness, slow classification). Returns true if any
    /// path's [`Reach`] changed since the previous call, including changes made by `record`.
    pub fn evaluate(&mut self, now: Instant) -> bool {
        let stale: Vec<_> = self.trackers.iter().filter(|(_, t)| t.is_stale(now)).map(|(k, _)| *k).collect();
        for key in &stale {
            self.drop_tracker(key);
        }
        let best_us =
            self.trackers.values().filter(|t| t.verdict == Verdict::Reachable).filter_map(|t| t.rtt_ewma_us).min();
        if let Some(best_us) = best_us {
            let threshold_us = best_us.saturating_mul(SLOW_FACTOR).saturating_add(SLOW_FLOOR_US);
            for tracker in self.trackers.values_mut() {
                self.changed |= tracker.classify(now, threshold_us);
            }
        }
        std::mem::take(&mut self.changed)
    }

    /// The current verdict (as of the last `evaluate` or `record`).
    pub fn reach(&self, node: NodeId, address: SocketAddr) -> Reach {
        self.trackers.get(&(node, address)).map_or(Reach::Unprobed, Tracker::reach)
    }

    /// Smoothed round-trip time, for display only: verdicts are in [`HostProbes::reach`].
    pub fn rtt_us(&self, node: NodeId, address: SocketAddr) -> Option<u64> {
        self.trackers.get(&(node, address)).and_then(|t| t.rtt_ewma_us)
    }

    /// Drops trackers for paths not in `keep` (paths that no longer exist).
    pub fn retain(&mut self, keep: &dyn Fn(NodeId, SocketAddr) -> bool) {
        let gone: Vec<_> = self.trackers.keys().filter(|(node, address)| !keep(*node, *address)).copied().collect();
        for key in &gone {
            self.drop_tracker(key);
        }
    }

    /// Forgets one path; its [`Reach`] becomes [`Reach::Unprobed`], which counts as a change
    /// unless it was already that.
    fn drop_tracker(&mut self, key: &(NodeId, SocketAddr)) {
        if let Some(tracker) = self.trackers.remove(key) {
            self.changed |= tracker.reach() != Reach::Unprobed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(250);

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn ok(rtt_us: u64) -> ProbeOutcome {
        ProbeOutcome::Ok { rtt_us }
    }

    fn timeout(error: &str) -> ProbeOutcome {
        ProbeOutcome::Failed { refused: false, error: error.into() }
    }

    fn refused() -> ProbeOutcome {
        ProbeOutcome::Failed { refused: true, error: "connection refused".into() }
    }

    const REACHABLE: Reach = Reach::Reachable { slow: false };
    const SLOW: Reach = Reach::Reachable { slow: true };

    /// A tracker for node 1 on `addr(1)` that is reachable at `t0`.
    fn reachable_at(t0: Instant) -> HostProbes {
        let mut p = HostProbes::new();
        p.record(t0, NodeId(1), addr(1), ok(200));
        assert!(p.evaluate(t0));
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
        p
    }

    /// Makes the path unreachable at `t0` with a refused connection.
    fn unreachable_at(t0: Instant) -> HostProbes {
        let mut p = reachable_at(t0);
        p.record(t0, NodeId(1), addr(1), refused());
        assert!(p.evaluate(t0));
        p
    }

    #[test]
    fn a_path_never_reported_is_unprobed() {
        let p = HostProbes::new();
        assert_eq!(p.reach(NodeId(1), addr(1)), Reach::Unprobed);
        assert_eq!(p.rtt_us(NodeId(1), addr(1)), None);
    }

    #[test]
    fn refused_is_unreachable_at_once_and_reported_once() {
        let t0 = Instant::now();
        let mut p = reachable_at(t0);
        p.record(t0 + TICK, NodeId(1), addr(1), refused());
        assert_eq!(p.reach(NodeId(1), addr(1)), Reach::Unreachable { why: "connection refused".into() });
        assert!(p.evaluate(t0 + TICK), "a change made by record is reported by the next evaluate");
        assert!(!p.evaluate(t0 + TICK * 2));
    }

    #[test]
    fn refused_on_an_unprobed_path_is_unreachable_at_once() {
        let t0 = Instant::now();
        let mut p = HostProbes::new();
        p.record(t0, NodeId(1), addr(1), refused());
        assert_eq!(p.reach(NodeId(1), addr(1)), Reach::Unreachable { why: "connection refused".into() });
        assert!(p.evaluate(t0));
    }

    #[test]
    fn timeouts_make_a_path_unreachable_after_three_keeping_the_first_reason() {
        let t0 = Instant::now();
        let mut p = reachable_at(t0);
        p.record(t0 + TICK, NodeId(1), addr(1), timeout("timed out 1"));
        p.record(t0 + TICK * 2, NodeId(1), addr(1), timeout("timed out 2"));
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
        assert!(!p.evaluate(t0 + TICK * 2));
        p.record(t0 + TICK * 3, NodeId(1), addr(1), timeout("timed out 3"));
        let down = Reach::Unreachable { why: "timed out 3".into() };
        assert_eq!(p.reach(NodeId(1), addr(1)), down);
        assert!(p.evaluate(t0 + TICK * 3));
        p.record(t0 + TICK * 4, NodeId(1), addr(1), timeout("reset by peer"));
        assert_eq!(p.reach(NodeId(1), addr(1)), down, "the reason stays while the path stays down");
        assert!(!p.evaluate(t0 + TICK * 4));
    }

    #[test]
    fn a_success_between_timeouts_resets_the_count() {
        let t0 = Instant::now();
        let mut p = reachable_at(t0);
        for (i, outcome) in [timeout("t"), timeout("t"), ok(200), timeout("t"), timeout("t")].into_iter().enumerate() {
            p.record(t0 + TICK * (i as u32 + 1), NodeId(1), addr(1), outcome);
        }
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
    }

    #[test]
    fn timeouts_on_an_unprobed_path_give_no_verdict_before_three() {
        let t0 = Instant::now();
        let mut p = HostProbes::new();
        p.record(t0, NodeId(1), addr(1), timeout("t"));
        p.record(t0 + TICK, NodeId(1), addr(1), timeout("t"));
        assert_eq!(p.reach(NodeId(1), addr(1)), Reach::Unprobed);
        assert!(!p.evaluate(t0 + TICK));
        p.record(t0 + TICK * 2, NodeId(1), addr(1), timeout("t"));
        assert_eq!(p.reach(NodeId(1), addr(1)), Reach::Unreachable { why: "t".into() });
    }

    #[test]
    fn the_reason_is_capped_on_a_char_boundary() {
        let t0 = Instant::now();
        let mut p = HostProbes::new();
        // 'é' is two bytes: 119 ASCII bytes then 'é' would end at byte 121.
        let error = format!("{}é and more", "x".repeat(WHY_BYTES_MAX - 1));
        p.record(t0, NodeId(1), addr(1), ProbeOutcome::Failed { refused: true, error });
        let Reach::Unreachable { why } = p.reach(NodeId(1), addr(1)) else { panic!("not unreachable") };
        assert_eq!(why, "x".repeat(WHY_BYTES_MAX - 1));
    }

    #[test]
    fn recovery_needs_two_seconds_and_three_successes() {
        let t0 = Instant::now();
        let mut p = unreachable_at(t0);
        let start = t0 + TICK;
        // Successes every 250 ms: the span reaches 2 s at the ninth.
        for i in 0..8 {
            p.record(start + TICK * i, NodeId(1), addr(1), ok(200));
            assert!(!p.evaluate(start + TICK * i), "back after {:?}", TICK * i);
            assert!(matches!(p.reach(NodeId(1), addr(1)), Reach::Unreachable { .. }));
        }
        p.record(start + RECOVER_AFTER, NodeId(1), addr(1), ok(200));
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
        assert!(p.evaluate(start + RECOVER_AFTER));
    }

    #[test]
    fn recovery_needs_three_successes_even_when_two_span_the_window() {
        let t0 = Instant::now();
        let mut p = unreachable_at(t0);
        p.record(t0 + TICK, NodeId(1), addr(1), ok(200));
        p.record(t0 + TICK + RECOVER_AFTER * 2, NodeId(1), addr(1), ok(200));
        assert!(matches!(p.reach(NodeId(1), addr(1)), Reach::Unreachable { .. }));
        p.record(t0 + TICK + RECOVER_AFTER * 2 + TICK, NodeId(1), addr(1), ok(200));
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
    }

    #[test]
    fn a_failure_resets_the_recovery_streak() {
        let t0 = Instant::now();
        let mut p = unreachable_at(t0);
        for i in 1..8 {
            p.record(t0 + TICK * i, NodeId(1), addr(1), ok(200));
        }
        p.record(t0 + TICK * 8, NodeId(1), addr(1), timeout("t"));
        // Without the failure the streak from t0 + TICK would span 2 s at t0 + TICK * 9.
        let restart = t0 + TICK * 9;
        for i in 0..8 {
            p.record(restart + TICK * i, NodeId(1), addr(1), ok(200));
            assert!(
                matches!(p.reach(NodeId(1), addr(1)), Reach::Unreachable { .. }),
                "back {:?} into the new streak",
                TICK * i
            );
        }
        p.record(restart + RECOVER_AFTER, NodeId(1), addr(1), ok(200));
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
    }

    #[test]
    fn stale_paths_go_back_to_unprobed() {
        let t0 = Instant::now();
        let mut p = reachable_at(t0);
        p.record(t0, NodeId(2), addr(2), refused());
        assert!(p.evaluate(t0));
        assert!(!p.evaluate(t0 + STALE_AFTER - TICK));
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
        assert!(p.evaluate(t0 + STALE_AFTER));
        assert_eq!(p.reach(NodeId(1), addr(1)), Reach::Unprobed);
        assert_eq!(p.reach(NodeId(2), addr(2)), Reach::Unprobed);
        assert_eq!(p.rtt_us(NodeId(1), addr(1)), None);
    }

    #[test]
    fn a_report_after_a_silence_starts_from_scratch() {
        let t0 = Instant::now();
        let mut p = unreachable_at(t0);
        // No evaluate in between: record itself notices the silence.
        p.record(t0 + STALE_AFTER, NodeId(1), addr(1), ok(300));
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
        assert_eq!(p.rtt_us(NodeId(1), addr(1)), Some(300));
        assert!(p.evaluate(t0 + STALE_AFTER));
    }

    #[test]
    fn rtt_is_smoothed_with_alpha_one_quarter() {
        let t0 = Instant::now();
        let mut p = HostProbes::new();
        p.record(t0, NodeId(1), addr(1), ok(1000));
        assert_eq!(p.rtt_us(NodeId(1), addr(1)), Some(1000));
        p.record(t0 + TICK, NodeId(1), addr(1), ok(2000));
        assert_eq!(p.rtt_us(NodeId(1), addr(1)), Some(1250));
        p.record(t0 + TICK * 2, NodeId(1), addr(1), ok(u64::MAX));
        assert!(p.rtt_us(NodeId(1), addr(1)).is_some(), "a huge sample does not overflow");
    }

    /// xorshift64: a deterministic stream for randomized tests; the seed is in every message.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn between(&mut self, low: u64, high: u64) -> u64 {
            low + self.next() % (high - low)
        }
    }

    #[test]
    fn loopback_jitter_never_changes_a_verdict() {
        for seed in [0x5eed_0001_u64, 0x5eed_0002, 0x5eed_0003, 0xdead_beef, 42] {
            let mut rng = XorShift(seed);
            let t0 = Instant::now();
            let mut p = HostProbes::new();
            let paths: Vec<(NodeId, SocketAddr)> = (1..=4).map(|n| (NodeId(n), addr(n as u16))).collect();
            let mut at = Duration::ZERO;
            while at <= Duration::from_secs(60) {
                for &(node, address) in &paths {
                    p.record(t0 + at, node, address, ok(rng.between(50, 3000)));
                }
                let changed = p.evaluate(t0 + at);
                assert_eq!(changed, at.is_zero(), "seed {seed:#x}: a verdict changed at {at:?}");
                for &(node, address) in &paths {
                    assert_eq!(p.reach(node, address), REACHABLE, "seed {seed:#x}: node {node} at {at:?}");
                }
                at += TICK;
            }
        }
    }

    #[test]
    fn a_much_slower_path_becomes_slow_after_the_sustain_and_recovers_the_same_way() {
        let t0 = Instant::now();
        let mut p = HostProbes::new();
        let report = |p: &mut HostProbes, at: Duration, slow_rtt_us: u64| {
            for node in 1..=3 {
                p.record(t0 + at, NodeId(node), addr(node as u16), ok(200));
            }
            p.record(t0 + at, NodeId(4), addr(4), ok(slow_rtt_us));
            p.evaluate(t0 + at)
        };
        assert!(report(&mut p, Duration::ZERO, 20_000));
        let mut at = TICK;
        while at < SLOW_SUSTAIN {
            assert!(!report(&mut p, at, 20_000), "slow already at {at:?}");
            at += TICK;
        }
        assert!(report(&mut p, SLOW_SUSTAIN, 20_000));
        assert_eq!(p.reach(NodeId(4), addr(4)), SLOW);
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);

        // Back to 0.2 ms: the average needs a few samples to fall under half the threshold,
        // then it must stay there for the sustain before the path is fast again.
        let half_threshold_us = (200 * SLOW_FACTOR + SLOW_FLOOR_US) / 2;
        let fast_from = SLOW_SUSTAIN + TICK;
        let (mut under_since, mut recovered_at) = (None, None);
        let mut at = fast_from;
        while recovered_at.is_none() && at < fast_from + SLOW_SUSTAIN * 3 {
            if report(&mut p, at, 200) {
                recovered_at = Some(at);
            } else {
                assert_eq!(p.reach(NodeId(4), addr(4)), SLOW, "at {at:?}");
            }
            if p.rtt_us(NodeId(4), addr(4)).is_some_and(|rtt_us| rtt_us < half_threshold_us) {
                under_since.get_or_insert(at);
            }
            at += TICK;
        }
        assert_eq!(p.reach(NodeId(4), addr(4)), REACHABLE, "never became fast again");
        let (under_since, recovered_at) = (under_since.unwrap(), recovered_at.unwrap());
        assert!(under_since > fast_from, "the average fell at once: the test proves nothing");
        assert_eq!(recovered_at - under_since, SLOW_SUSTAIN);
    }

    #[test]
    fn a_lone_path_is_never_slow() {
        let t0 = Instant::now();
        let mut p = HostProbes::new();
        for i in 0..40 {
            p.record(t0 + TICK * i, NodeId(1), addr(1), ok(50_000));
            p.evaluate(t0 + TICK * i);
        }
        assert_eq!(p.reach(NodeId(1), addr(1)), REACHABLE);
    }

    #[test]
    fn retain_drops_paths_and_reports_the_change() {
        let t0 = Instant::now();
        let mut p = reachable_at(t0);
        p.record(t0, NodeId(2), addr(2), ok(200));
        p.evaluate(t0);
        p.retain(&|node, _| node == NodeId(2));
        assert_eq!(p.reach(NodeId(1), addr(1)), Reach::Unprobed);
        assert_eq!(p.reach(NodeId(2), addr(2)), REACHABLE);
        assert!(p.evaluate(t0));
        p.retain(&|_, _| true);
        assert!(!p.evaluate(t0));
    }

    #[test]
    fn reports_for_paths_beyond_the_limit_are_ignored() {
        let t0 = Instant::now();
        let mut p = HostProbes::new();
        let path = |i: usize| (NodeId(i as u64 + 1), addr(1));
        for i in 0..PATHS_PER_HOST_MAX {
            let (node, address) = path(i);
            p.record(t0, node, address, ok(200));
        }
        let (node, address) = path(PATHS_PER_HOST_MAX);
        p.record(t0, node, address, refused());
        assert_eq!(p.reach(node, address), Reach::Unprobed);
        // Known paths still take reports.
        let (node, address) = path(0);
        p.record(t0, node, address, refused());
        assert!(matches!(p.reach(node, address), Reach::Unreachable { .. }));
    }
}
