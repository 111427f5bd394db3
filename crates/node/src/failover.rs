//! The failover supervisor: on the Raft leader, it finds volumes whose primary has failed and
//! commits a `Failover` for each.
//!
//! For every volume whose primary has failed (by the lease keeper's liveness, see `lease.rs`),
//! it commits a `Failover` to a live member of the committed ISR (I4: the new primary
//! reconciles before it serves), chosen by `tandem_paths::pick_primary`: the preferred site
//! first, then a node other than this one (the Raft leader), then the lowest id. The choice is
//! [`decide`], a plain function of the map and of liveness.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tandem_clustermap::{MetaCmd, VolumeRecord};
use tandem_meta::store::{MetaStore, RaftRole};
use tandem_paths::pick_primary;
use tandem_types::{Epoch, NodeId, VolumeId};

use crate::lease::Leases;

/// How often the leader's supervisor looks for failed primaries.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);
/// Failover commands proposed at once (they share log entries).
const FAILOVERS_IN_FLIGHT_MAX: usize = 256;

/// What the supervisor decided for one volume whose primary failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Move the volume to `primary`, with the live part of its ISR.
    Failover { volume: VolumeId, name: String, epoch: Epoch, old: NodeId, primary: NodeId, isr: Vec<NodeId> },
    /// The primary failed and no in-sync replica is alive: nothing to move to.
    NoLiveReplica { name: String, primary: NodeId },
}

/// Where `v` should go if its primary is not `alive` (None while it is). `me` is the Raft
/// leader (this node); `sites` and `preferred` (dataset name to preferred site) guide the choice.
pub(crate) fn decide(
    v: &VolumeRecord,
    sites: &BTreeMap<NodeId, String>,
    preferred: &HashMap<String, Option<String>>,
    me: NodeId,
    alive: impl Fn(NodeId) -> bool,
) -> Option<Decision> {
    if alive(v.primary) {
        return None;
    }
    let live: Vec<NodeId> = v.isr.iter().copied().filter(|&n| n != v.primary && alive(n)).collect();
    let want_site = preferred.get(&v.dataset).cloned().flatten();
    // Off this node if another qualifies: a primary on the Raft leader's node costs an
    // election and then a failover when that node fails.
    let Some(new_primary) = pick_primary(&live, sites, want_site.as_deref(), Some(me)) else {
        return Some(Decision::NoLiveReplica { name: v.name.clone(), primary: v.primary });
    };
    Some(Decision::Failover {
        volume: v.id,
        name: v.name.clone(),
        epoch: v.epoch,
        old: v.primary,
        primary: new_primary,
        isr: live,
    })
}

/// Runs the failover supervisor for as long as the node runs (it acts only while this node
/// leads). One task per node.
pub fn spawn_supervisor(meta: Arc<MetaStore>, leases: Arc<Leases>) {
    let supervisor = Supervisor { meta, leases, leading_since: Mutex::new(None) };
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(SUPERVISE_EVERY);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            supervisor.supervise().await;
        }
    });
}

struct Supervisor {
    meta: Arc<MetaStore>,
    leases: Arc<Leases>,
    /// When this node last became leader (None while it does not lead).
    leading_since: Mutex<Option<Instant>>,
}

impl Supervisor {
    async fn supervise(&self) {
        let me = self.leases.me();
        let status = self.meta.status();
        let now = Instant::now();
        let since = {
            let mut s = self.leading_since.lock().expect("leading lock");
            if status.role != RaftRole::Leader {
                *s = None;
                self.leases.forget_heard();
                return;
            }
            *s.get_or_insert(now)
        };
        self.leases.note_heard(me, now);
        // Liveness once per node, then decisions only for volumes whose primary is not alive:
        // while every node is alive (nearly always) a round reads no volume at all.
        let decisions: Vec<Decision> = self.meta.local_read(|st| {
            let alive: BTreeMap<NodeId, bool> =
                st.map.nodes.keys().map(|&n| (n, self.leases.alive(n, now, since))).collect();
            if alive.values().all(|a| *a) {
                return Vec::new();
            }
            let sites: BTreeMap<NodeId, String> = st.map.nodes.iter().map(|(id, n)| (*id, n.site.clone())).collect();
            let preferred: HashMap<String, Option<String>> =
                st.map.datasets.iter().map(|(name, d)| (name.clone(), d.preferred_site.clone())).collect();
            let is_alive = |n: NodeId| alive.get(&n).copied().unwrap_or(false);
            st.map
                .volumes
                .values()
                // A clone or snapshot still being made has no running primary to replace.
                .filter(|v| !v.pending() && !is_alive(v.primary))
                .filter_map(|v| decide(v, &sites, &preferred, me, is_alive))
                .collect()
        });
        // Every failover of the round at once, so that they share log entries (the store
        // batches concurrent writes): a node holding thousands of primaries fails over in a
        // few commits, not one commit per volume. Each is a compare-and-set on the epoch; a
        // choice that a newer failure made wrong is corrected next round.
        let writes = decisions.into_iter().filter_map(|decision| match decision {
            Decision::NoLiveReplica { name, primary } => {
                tracing::warn!(volume = %name, %primary, "primary failed and no in-sync replica is alive");
                None
            }
            Decision::Failover { volume, name, epoch, old, primary, isr } => {
                // Checked again and held against grants until the commit is done: a grant
                // racing this decision would give `old` a lease on a map without the failover.
                if !self.leases.condemn(old, Instant::now(), since) {
                    tracing::info!(volume = %name, %old, "primary renewed its lease meanwhile; not failing over");
                    return None;
                }
                tracing::warn!(volume = %name, %old, new = %primary, epoch = %epoch.next(), "failing over");
                let meta = self.meta.clone();
                let leases = self.leases.clone();
                Some(async move {
                    let propose = async {
                        #[cfg(feature = "failpoints")]
                        if let Some(arg) =
                            tandem_replication::failpoints::eval(crate::failpoints::ISR_BEFORE_PROPOSE).await
                        {
                            tracing::warn!(volume = %name, %arg, "failpoint isr-before-propose: failover not proposed");
                            return;
                        }
                        if let Err(e) = meta.write(MetaCmd::Failover { volume, epoch, primary, isr }).await {
                            tracing::warn!(volume = %name, error = %e, "failover not committed");
                        }
                    };
                    propose.await;
                    leases.absolve(old);
                })
            }
        });
        futures::stream::iter(writes).buffer_unordered(FAILOVERS_IN_FLIGHT_MAX).collect::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(primary: NodeId, isr: &[NodeId]) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId(7),
            name: "vol".into(),
            dataset: "default".into(),
            size_bytes: 4096,
            replicas: vec![NodeId(1), NodeId(2), NodeId(3), NodeId(4)],
            primary,
            isr: isr.to_vec(),
            epoch: Epoch(5),
            isr_version: 1,
            resync: BTreeMap::new(),
            claim: None,
            origin: None,
        }
    }

    fn sites() -> BTreeMap<NodeId, String> {
        [(1, "a"), (2, "a"), (3, "b"), (4, "b")].into_iter().map(|(id, s)| (NodeId(id), s.to_string())).collect()
    }

    #[test]
    fn a_live_primary_stays() {
        let v = volume(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3)]);
        assert_eq!(decide(&v, &sites(), &HashMap::new(), NodeId(2), |_| true), None);
    }

    /// Only live members of the ISR qualify; the Raft leader (this node) only if none else does;
    /// the failover carries the epoch it was decided in and the live ISR.
    #[test]
    fn a_failed_primary_moves_to_a_live_in_sync_node_off_the_leader() {
        let v = volume(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3)]);
        let alive = |n: NodeId| n != NodeId(1);
        let d = decide(&v, &sites(), &HashMap::new(), NodeId(2), alive);
        let want = Decision::Failover {
            volume: VolumeId(7),
            name: "vol".into(),
            epoch: Epoch(5),
            old: NodeId(1),
            primary: NodeId(3),
            isr: vec![NodeId(2), NodeId(3)],
        };
        assert_eq!(d, Some(want));
        // Node 4 is alive but not in sync: with 3 gone too, only the leader itself is left.
        let d = decide(&v, &sites(), &HashMap::new(), NodeId(2), |n| n == NodeId(2) || n == NodeId(4));
        assert!(
            matches!(d, Some(Decision::Failover { primary: NodeId(2), ref isr, .. }) if *isr == vec![NodeId(2)]),
            "{d:?}"
        );
    }

    #[test]
    fn the_preferred_site_comes_first() {
        let v = volume(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3), NodeId(4)]);
        let preferred: HashMap<String, Option<String>> = [("default".to_string(), Some("a".to_string()))].into();
        let d = decide(&v, &sites(), &preferred, NodeId(3), |n| n != NodeId(1));
        assert!(matches!(d, Some(Decision::Failover { primary: NodeId(2), .. })), "{d:?}");
    }

    #[test]
    fn without_a_live_in_sync_replica_nothing_moves() {
        let v = volume(NodeId(1), &[NodeId(1), NodeId(2)]);
        let d = decide(&v, &sites(), &HashMap::new(), NodeId(3), |n| n == NodeId(3) || n == NodeId(4));
        assert_eq!(d, Some(Decision::NoLiveReplica { name: "vol".into(), primary: NodeId(1) }));
    }
}
