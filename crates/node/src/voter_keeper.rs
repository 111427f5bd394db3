//! The voter keeper: on the Raft leader, it keeps the cluster's voters at the configured count
//! (`cluster.voters`, the rule in `tandem_meta::voters`) when voters are lost for good.
//!
//! Every [`CHECK_EVERY`], a leader that has led for at least [`QUIET_AFTER_TAKEOVER`]:
//! - gives the seat of a voter it has not heard from (lease renewals, `lease.rs`) for
//!   `cluster.voter_replace_after_secs` to a live, caught-up learner, one voter per round
//!   (`MetaStore::replace_voter`; the lost node stays a learner and catches up if it returns).
//!   Silence counts from when this node took over at the earliest, so a leader change restarts
//!   the wait rather than acting on what the previous leader saw;
//! - then settles the voters (`MetaStore::settle_voters`): promotes a learner while there are
//!   fewer voters than the target, for instance after a removal found no learner to promote.
//!
//! It never flaps: a replacement keeps the voter count, the replaced node comes back only as a
//! learner, and a change is made only if most of the new voters are live.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tandem_meta::store::{MetaStore, RaftRole};
use tandem_types::NodeId;

use crate::lease::{Leases, FAILURE_TIMEOUT};

/// How often the leader checks its voters.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A new leader changes no voters before it has led this long: by then every live node has
/// renewed its lease with it, so it knows who is live.
const QUIET_AFTER_TAKEOVER: Duration = Duration::from_secs(5);
const _: () = assert!(QUIET_AFTER_TAKEOVER.as_millis() >= 2 * FAILURE_TIMEOUT.as_millis());

/// Lets the metadata store ask whether the leader heard from a node recently, without keeping
/// the leases alive (the leases hold the store).
pub fn liveness(leases: &Arc<Leases>) -> tandem_meta::store::Liveness {
    let leases: Weak<Leases> = Arc::downgrade(leases);
    Arc::new(move |id| leases.upgrade().and_then(|l| l.liveness(id, Instant::now())))
}

/// The voters (other than `me`, the leader) not heard from for `replace_after` by `now`,
/// counting from `since` (when this node took over) for those it has not heard from since.
pub(crate) fn lost_voters(
    voters: &[NodeId],
    me: NodeId,
    now: Instant,
    since: Instant,
    replace_after: Duration,
    last_heard: impl Fn(NodeId) -> Option<Instant>,
) -> Vec<NodeId> {
    voters
        .iter()
        .copied()
        .filter(|v| *v != me)
        .filter(|v| {
            let heard = last_heard(*v).map_or(since, |h| h.max(since));
            now.saturating_duration_since(heard) >= replace_after
        })
        .collect()
}

/// Runs the keeper for as long as the node runs (it acts only while this node leads). One task
/// per node. `replace_after` zero: lost voters are never replaced (settling still runs).
pub fn spawn(meta: Arc<MetaStore>, leases: Arc<Leases>, replace_after: Duration) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(CHECK_EVERY);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading_since: Option<Instant> = None;
        // Lost voters already reported as irreplaceable (no learner qualified), so the log says
        // it once per voter rather than every second.
        let mut reported: BTreeSet<NodeId> = BTreeSet::new();
        loop {
            interval.tick().await;
            let status = meta.status();
            let now = Instant::now();
            if status.role != RaftRole::Leader {
                leading_since = None;
                reported.clear();
                continue;
            }
            let since = *leading_since.get_or_insert(now);
            if now.saturating_duration_since(since) < QUIET_AFTER_TAKEOVER {
                continue;
            }
            if !replace_after.is_zero() {
                let lost = lost_voters(&status.voters, status.id, now, since, replace_after, |n| leases.last_heard(n));
                reported.retain(|n| lost.contains(n));
                for v in lost {
                    match meta.replace_voter(v).await {
                        Ok(Some(new)) => {
                            tracing::info!(
                                lost = %v, new = %new, silent_secs = replace_after.as_secs(),
                                "a voter was not heard from for voter_replace_after_secs: a learner takes its seat"
                            );
                            reported.remove(&v);
                            // One change per round: the next works from the committed membership.
                            break;
                        }
                        Ok(None) => {
                            if reported.insert(v) {
                                tracing::warn!(lost = %v, "a voter is lost, and no live, caught-up learner can take its seat");
                            }
                        }
                        Err(e) => tracing::warn!(lost = %v, error = %e, "could not replace a lost voter"),
                    }
                }
            }
            if let Err(e) = meta.settle_voters().await {
                tracing::debug!(error = %e, "voters not settled this round");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voter_is_lost_only_after_the_whole_wait_and_never_the_leader() {
        let start = Instant::now();
        let after = Duration::from_secs(300);
        let voters = [NodeId(1), NodeId(2), NodeId(3)];
        let heard = |n: NodeId| match n.0 {
            2 => Some(start + Duration::from_secs(10)),
            _ => None,
        };
        // Just took over: nobody is lost, whatever was (not) heard.
        assert!(lost_voters(&voters, NodeId(1), start + Duration::from_secs(1), start, after, heard).is_empty());
        // 300 s after the takeover: 3 (never heard) is lost; 2 only 300 s after it was heard.
        let t = start + Duration::from_secs(300);
        assert_eq!(lost_voters(&voters, NodeId(1), t, start, after, heard), vec![NodeId(3)]);
        let t = start + Duration::from_secs(310);
        assert_eq!(lost_voters(&voters, NodeId(1), t, start, after, heard), vec![NodeId(2), NodeId(3)]);
        // Heard before this node took over: the wait counts from the takeover.
        let later = start + Duration::from_secs(100);
        let t = start + Duration::from_secs(310);
        assert_eq!(lost_voters(&voters, NodeId(1), t, later, after, heard), Vec::<NodeId>::new());
    }
}
