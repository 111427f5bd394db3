//! A node's liveness as the Raft leader sees it, with hysteresis.
//!
//! The leader hears lease renewals from every node; the path manager asks, on each tick,
//! whether a node was heard from within [`NODE_DOWN_AFTER`] and feeds the answer to
//! [`NodeHealth::observe`]. Going down is immediate (hosts must stop sending I/O to a node that
//! may be cut off); coming back needs [`NODE_UP_AFTER`] of continuous renewals, so a node on a
//! flapping link does not bounce its paths with every renewal.

use std::time::{Duration, Instant};

/// A node that has not renewed its lease for this long is down, or cut off from the Raft
/// majority: either way it cannot be trusted to serve I/O. Three renewal periods of 250 ms.
pub const NODE_DOWN_AFTER: Duration = Duration::from_millis(750);

/// A down node is up again only after renewing continuously for this long: longer than
/// [`NODE_DOWN_AFTER`], so one lucky renewal on a flapping link does not republish its paths.
pub const NODE_UP_AFTER: Duration = Duration::from_secs(1);

/// Whether a node may serve I/O, as decided by [`NodeHealth`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    Up,
    /// `why` is a stable sentence (no measured times), used verbatim in path reasons.
    Down {
        why: String,
    },
}

/// One node's liveness with hysteresis. Time is an argument; nothing here reads a clock.
#[derive(Clone, Debug)]
pub struct NodeHealth {
    state: State,
}

#[derive(Clone, Debug)]
enum State {
    Up,
    Down {
        why: String,
        /// When the node went down: freshness observed before this does not count.
        since: Instant,
        /// Start of the current run of fresh observations, if the last one was fresh.
        fresh_since: Option<Instant>,
    },
}

/// Why a node that stopped renewing its lease is down. Built from the constant, so it never
/// carries a measured time: the reason must not change while the node stays down.
fn lease_lost_why() -> String {
    format!("down or cut off from the Raft majority: no lease renewal for {} ms", NODE_DOWN_AFTER.as_millis())
}

impl NodeHealth {
    /// Starts Up: a new leader assumes nodes are up until they miss renewals, rather than
    /// failing every path over at each election.
    pub fn new() -> Self {
        NodeHealth { state: State::Up }
    }

    /// `fresh`: the leader heard from the node (a lease renewal) within [`NODE_DOWN_AFTER`].
    /// Up → Down at once when not fresh; Down → Up after [`NODE_UP_AFTER`] of continuous
    /// freshness. Returns true if the liveness changed.
    pub fn observe(&mut self, now: Instant, fresh: bool) -> bool {
        match &mut self.state {
            State::Up if fresh => false,
            State::Up => {
                self.state = State::Down { why: lease_lost_why(), since: now, fresh_since: None };
                true
            }
            State::Down { fresh_since, .. } if !fresh => {
                *fresh_since = None;
                false
            }
            State::Down { since, fresh_since, .. } => {
                let start = *fresh_since.get_or_insert(now.max(*since));
                if now.saturating_duration_since(start) >= NODE_UP_AFTER {
                    self.state = State::Up;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Marks the node down now with this reason (e.g. the previous Raft leader, when this node
    /// takes over: "cut off from the Raft majority (it lost the leadership)"). It comes back
    /// only through [`NODE_UP_AFTER`] of freshness that starts at or after this call.
    pub fn force_down(&mut self, now: Instant, why: &str) {
        self.state = State::Down { why: why.to_owned(), since: now, fresh_since: None };
    }

    pub fn liveness(&self) -> Liveness {
        match &self.state {
            State::Up => Liveness::Up,
            State::Down { why, .. } => Liveness::Down { why: why.clone() },
        }
    }
}

impl Default for NodeHealth {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(250);

    fn is_up(h: &NodeHealth) -> bool {
        h.liveness() == Liveness::Up
    }

    #[test]
    fn starts_up_and_stays_up_while_fresh() {
        let t0 = Instant::now();
        let mut h = NodeHealth::new();
        assert!(is_up(&h));
        for i in 0..20 {
            assert!(!h.observe(t0 + TICK * i, true));
        }
        assert!(is_up(&h));
    }

    #[test]
    fn goes_down_at_once_with_a_reason_built_from_the_constant() {
        let t0 = Instant::now();
        let mut h = NodeHealth::new();
        assert!(h.observe(t0, false), "the first stale observation is a change");
        assert_eq!(
            h.liveness(),
            Liveness::Down { why: "down or cut off from the Raft majority: no lease renewal for 750 ms".into() }
        );
        assert!(!h.observe(t0 + TICK, false), "staying down is no change");
    }

    #[test]
    fn comes_back_only_after_a_second_of_continuous_freshness() {
        let t0 = Instant::now();
        let mut h = NodeHealth::new();
        h.observe(t0, false);
        // Fresh for 750 ms, then one stale observation: the run starts over.
        for i in 1..=3 {
            assert!(!h.observe(t0 + TICK * i, true));
        }
        assert!(!h.observe(t0 + TICK * 4, false));
        let restart = t0 + TICK * 5;
        for i in 0..4 {
            assert!(!h.observe(restart + TICK * i, true), "still down {:?} into the run", TICK * i);
            assert!(!is_up(&h));
        }
        assert!(h.observe(restart + NODE_UP_AFTER, true));
        assert!(is_up(&h));
    }

    #[test]
    fn force_down_needs_freshness_that_starts_after_the_call() {
        let t0 = Instant::now();
        let mut h = NodeHealth::new();
        h.observe(t0, true);
        let forced = t0 + Duration::from_secs(5);
        h.force_down(forced, "cut off from the Raft majority (it lost the leadership)");
        assert_eq!(
            h.liveness(),
            Liveness::Down { why: "cut off from the Raft majority (it lost the leadership)".into() }
        );
        // A late observation stamped before the call does not start the run early.
        assert!(!h.observe(t0 + Duration::from_secs(4), true));
        assert!(!h.observe(forced + Duration::from_millis(900), true));
        assert!(!is_up(&h));
        assert!(h.observe(forced + NODE_UP_AFTER, true));
        assert!(is_up(&h));
    }

    #[test]
    fn force_down_while_down_restarts_the_run() {
        let t0 = Instant::now();
        let mut h = NodeHealth::new();
        h.observe(t0, false);
        h.observe(t0 + TICK, true);
        h.force_down(t0 + TICK * 3, "lost the leadership");
        assert!(!h.observe(t0 + TICK * 4, true));
        assert!(!h.observe(t0 + TICK + NODE_UP_AFTER, true), "the run that began before force_down does not count");
        assert!(h.observe(t0 + TICK * 4 + NODE_UP_AFTER, true));
    }
}
