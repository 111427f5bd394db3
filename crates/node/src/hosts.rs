//! The path manager: on the Raft leader, it keeps each host's path map up to date and
//! publishes every change through Raft as a new generation.
//!
//! Inputs: the committed cluster map (hosts, the volumes they reach, primaries, ISRs, nodes and
//! their target ports), node liveness (the lease renewals the leader grants, see `lease.rs`),
//! and the probe results that hosts' agents report (`POST /v1/hosts/{name}/probes`, forwarded
//! here from whichever node received them). The rules and their hysteresis are the pure
//! `tandem_paths` crate; this module feeds it, compares its result with the published map, and
//! commits `PublishPaths` with the next generation when they differ. Probe results and liveness
//! are soft state: a new leader starts without them and rebuilds them within a second, and the
//! committed generation keeps counting from where its predecessor left off.
//!
//! Loss of a node is acted on at once: a node that misses its lease renewals for
//! [`NODE_DOWN_AFTER`] is down for every host, and a new leader marks its predecessor down as
//! it takes over (a majority elected someone else: the old leader is cut off from it, or dead).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_clustermap::{ClusterMap, HostRecord, MetaCmd, ObjectKey};
use tandem_meta::state_machine::Changed;
use tandem_meta::store::{MetaStore, RaftRole};
use tandem_paths::{HostInput, HostProbes, NodeHealth, NodeInput, ProbeOutcome, VolumeInput, VolumePaths};
use tandem_transport::Transport;
use tandem_types::NodeId;
use tandem_wire::data::{PathProbe, ProbeMsg, ProbeReply};

use crate::lease::Leases;
use crate::probe::probe_call;

pub use tandem_paths::NODE_DOWN_AFTER;

// A node is down after missing its renewals for NODE_DOWN_AFTER: that must span several
// renewal periods (three, as `tandem_paths` states), so one late or lost renewal does not take
// a live node's paths away.
const _: () = assert!(crate::lease::RENEW_EVERY.as_millis() * 3 <= NODE_DOWN_AFTER.as_millis());

/// How often the leader re-evaluates liveness and probe verdicts (a node's loss shows in the
/// maps within this much of being noticed).
const EVALUATE_EVERY: Duration = Duration::from_millis(100);
/// Probe results in one report, at most (an agent reports every path of its host at once).
pub const PROBES_PER_REPORT_MAX: usize = 1024;
/// How long a node waits for the leader to take a forwarded report.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

pub struct PathManager {
    me: NodeId,
    meta: Arc<MetaStore>,
    leases: Arc<Leases>,
    soft: Mutex<Soft>,
    stats: PathStats,
}

/// What the path manager did, for `/metrics`: how often it recomputed maps, how many hosts'
/// maps, and how long that took.
#[derive(Default, Debug)]
pub struct PathStats {
    pub recomputes: AtomicU64,
    /// Recomputes of every host (leadership began, a node's record or liveness changed).
    pub full_recomputes: AtomicU64,
    pub hosts_recomputed: AtomicU64,
    pub micros_total: AtomicU64,
    /// The longest single recompute, in microseconds.
    pub micros_max: AtomicU64,
    /// Hosts in the last recompute.
    pub hosts_last: AtomicU64,
}

impl PathStats {
    fn note(&self, hosts: usize, full: bool, took: Duration) {
        let micros = took.as_micros() as u64;
        self.recomputes.fetch_add(1, Relaxed);
        self.full_recomputes.fetch_add(u64::from(full), Relaxed);
        self.hosts_recomputed.fetch_add(hosts as u64, Relaxed);
        self.micros_total.fetch_add(micros, Relaxed);
        self.micros_max.fetch_max(micros, Relaxed);
        self.hosts_last.store(hosts as u64, Relaxed);
    }
}

/// What the leader learned itself rather than from the committed map.
#[derive(Default)]
struct Soft {
    /// Since when this node leads (None while it does not).
    leading_since: Option<Instant>,
    /// The leader this node knew last while it did not lead.
    last_leader: Option<NodeId>,
    /// Nodes marked down when this node took over; they get no grace period.
    forced: BTreeSet<NodeId>,
    health: BTreeMap<NodeId, NodeHealth>,
    probes: HashMap<String, HostProbes>,
    /// The hosts whose maps may differ from the published ones: to compare this round.
    stale: Stale,
}

/// Which hosts' maps to recompute.
#[derive(Default, Debug, PartialEq, Eq)]
enum Stale {
    #[default]
    None,
    Hosts(BTreeSet<String>),
    /// Every host: a node's record, liveness or a dataset changed, leadership began, or the
    /// change feed could not say what changed (a snapshot was installed).
    All,
}

impl Stale {
    fn host(&mut self, name: &str) {
        match self {
            Stale::All => {}
            Stale::Hosts(hosts) => {
                hosts.insert(name.to_string());
            }
            Stale::None => *self = Stale::Hosts(BTreeSet::from([name.to_string()])),
        }
    }

    fn hosts<'a>(&mut self, names: impl IntoIterator<Item = &'a String>) {
        for name in names {
            self.host(name);
        }
    }
}

impl PathManager {
    pub fn new(me: NodeId, meta: Arc<MetaStore>, leases: Arc<Leases>) -> Arc<PathManager> {
        Arc::new(PathManager { me, meta, leases, soft: Mutex::new(Soft::default()), stats: PathStats::default() })
    }

    pub fn stats(&self) -> &PathStats {
        &self.stats
    }

    /// Runs the manager for as long as the node runs (it acts only while this node leads). One
    /// task per node.
    pub fn spawn(self: &Arc<Self>) {
        let pm = self.clone();
        tokio::spawn(async move {
            let mut changes = pm.meta.changes();
            let mut interval = tokio::time::interval(EVALUATE_EVERY);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    changed = changes.next() => {
                        let Some(changed) = changed else { return };
                        pm.note_changes(changed);
                    }
                }
                pm.step().await;
            }
        });
    }

    /// Marks the hosts that what the state machine applied may affect: a host's own record,
    /// the hosts connected to a changed volume, every host when a node or a dataset changed.
    /// Settings and the rest affect no path map. Runs on every node, leader or not: the marks
    /// are cleared when leadership begins, which recomputes every host anyway.
    fn note_changes(&self, changed: Changed) {
        let mut soft = self.soft.lock().expect("paths lock");
        if soft.leading_since.is_none() || soft.stale == Stale::All {
            return;
        }
        let keys = match changed {
            Changed::All => {
                soft.stale = Stale::All;
                return;
            }
            Changed::Keys(keys) => keys,
        };
        let mut volumes = Vec::new();
        for key in keys {
            match key {
                ObjectKey::Node(_) | ObjectKey::Dataset(_) => {
                    soft.stale = Stale::All;
                    return;
                }
                ObjectKey::Host(name) => soft.stale.host(&name),
                ObjectKey::Volume(id) => volumes.push(id),
                ObjectKey::Setting(_)
                | ObjectKey::Transport(_)
                | ObjectKey::NextVolumeId
                | ObjectKey::Reservations(_)
                | ObjectKey::Token(_) => {}
            }
        }
        if !volumes.is_empty() {
            let hosts: Vec<String> =
                self.meta.local_read(|st| volumes.iter().flat_map(|id| st.map.hosts_of_volume(*id).cloned()).collect());
            soft.stale.hosts(&hosts);
        }
    }

    /// One round: liveness and probe verdicts, then publication of every map that changed.
    async fn step(&self) {
        let status = self.meta.status();
        let now = Instant::now();
        let to_publish = {
            let mut soft = self.soft.lock().expect("paths lock");
            if status.role != RaftRole::Leader {
                let last_leader = status.leader.filter(|l| *l != self.me).or(soft.last_leader);
                *soft = Soft { last_leader, ..Soft::default() };
                return;
            }
            if soft.leading_since.is_none() {
                soft.leading_since = Some(now);
                soft.stale = Stale::All;
                if let Some(prev) = soft.last_leader.take() {
                    tracing::info!(node = %prev, "path maps: the previous Raft leader is cut off until it renews");
                    soft.forced.insert(prev);
                    soft.health
                        .entry(prev)
                        .or_default()
                        .force_down(now, "cut off from the Raft majority (it lost the leadership)");
                }
            }
            let since = soft.leading_since.expect("set above");
            // Every round: liveness and probe timers, which need only the node ids.
            let nodes: Vec<NodeId> = self.meta.local_read(|st| st.map.nodes.keys().copied().collect());
            self.evaluate(&mut soft, &nodes, now, since);
            let stale = std::mem::take(&mut soft.stale);
            if stale == Stale::None {
                return;
            }
            // Only the hosts that may have changed, computed on the applied map in place.
            let started = Instant::now();
            let soft = &mut *soft;
            let (count, changed) = self.meta.local_read(|st| {
                let map = &st.map;
                let hosts: Vec<&HostRecord> = match &stale {
                    Stale::All => {
                        soft.probes.retain(|host, _| map.hosts.contains_key(host));
                        map.hosts.values().collect()
                    }
                    Stale::Hosts(names) => {
                        for name in names {
                            if !map.hosts.contains_key(name) {
                                soft.probes.remove(name);
                            }
                        }
                        names.iter().filter_map(|n| map.hosts.get(n)).collect()
                    }
                    Stale::None => Vec::new(),
                };
                // Probe results only for paths the host still has.
                for h in &hosts {
                    if let Some(probes) = soft.probes.get_mut(&h.name) {
                        let targets = host_targets(map, &h.name);
                        probes.retain(&|node, addr| targets.contains(&(node, addr)));
                    }
                }
                (hosts.len(), self.changed_maps(soft, map, &hosts))
            });
            self.stats.note(count, stale == Stale::All, started.elapsed());
            changed
        };
        let writes = to_publish.into_iter().map(|(host, generation, paths)| {
            let meta = self.meta.clone();
            async move {
                let r = meta.write(MetaCmd::PublishPaths { host: host.clone(), generation, paths }).await;
                match r {
                    Ok(_) => {
                        tracing::debug!(host = %host, generation, "path map published");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(host = %host, generation, error = %e, "path map not published");
                        Some(host)
                    }
                }
            }
        });
        // At most one write per host in the map (`tandem_meta`'s HOSTS_MAX), all in this task.
        let failed: Vec<String> = futures::future::join_all(writes).await.into_iter().flatten().collect();
        if !failed.is_empty() {
            // Compare again next round.
            self.soft.lock().expect("paths lock").stale.hosts(&failed);
        }
    }

    /// Advances the liveness of `nodes` (the map's) and every host's probe verdicts; marks the
    /// maps that a change affects stale.
    fn evaluate(&self, soft: &mut Soft, nodes: &[NodeId], now: Instant, since: Instant) {
        let in_grace = now.saturating_duration_since(since) < NODE_DOWN_AFTER;
        soft.health.retain(|id, _| nodes.contains(id));
        let mut node_changed = false;
        for &id in nodes {
            let fresh = if id == self.me {
                true
            } else {
                match self.leases.last_heard(id) {
                    Some(h) => now.saturating_duration_since(h) < NODE_DOWN_AFTER,
                    // Not heard since this node took over: alive for a grace period (every
                    // live node renews well within it), unless it was the deposed leader.
                    None => in_grace && !soft.forced.contains(&id),
                }
            };
            node_changed |= soft.health.entry(id).or_default().observe(now, fresh);
        }
        if node_changed {
            // A node's liveness shows in the map of every host reaching it: with a handful of
            // nodes, nearly every host.
            soft.stale = Stale::All;
        }
        let mut changed = Vec::new();
        for (host, probes) in soft.probes.iter_mut() {
            if probes.evaluate(now) {
                changed.push(host.clone());
            }
        }
        soft.stale.hosts(&changed);
    }

    /// Of `hosts`, those whose computed map differs from the published one: (host, next
    /// generation, map).
    fn changed_maps(
        &self,
        soft: &Soft,
        map: &ClusterMap,
        hosts: &[&HostRecord],
    ) -> Vec<(String, u64, Vec<VolumePaths>)> {
        let nodes: BTreeMap<NodeId, NodeInput> = map
            .nodes
            .values()
            .map(|n| {
                let liveness = soft.health.get(&n.id).map(NodeHealth::liveness).unwrap_or(tandem_paths::Liveness::Up);
                let raft_leader = n.id == self.me;
                (n.id, NodeInput { id: n.id, site: n.site.clone(), targets: n.targets(), liveness, raft_leader })
            })
            .collect();
        let empty = HostProbes::new();
        hosts
            .iter()
            .filter_map(|host| {
                let probes = soft.probes.get(&host.name).unwrap_or(&empty);
                let paths = compute_host(map, &nodes, &host.name, &host.site, probes);
                (paths != host.paths).then(|| (host.name.clone(), host.generation + 1, paths))
            })
            .collect()
    }

    /// Takes probe results for `host` (on the leader); the node's API forwards them here.
    pub fn take_probes(&self, host: &str, probes: Vec<PathProbe>) -> ProbeReply {
        let status = self.meta.status();
        if status.role != RaftRole::Leader {
            return ProbeReply::NotLeader(status.leader.filter(|l| *l != self.me));
        }
        if probes.len() > PROBES_PER_REPORT_MAX {
            return ProbeReply::Refused(format!(
                "{} probe results in one report; at most {PROBES_PER_REPORT_MAX}",
                probes.len()
            ));
        }
        let targets = self.meta.local_read(|st| st.map.hosts.contains_key(host).then(|| host_targets(&st.map, host)));
        let Some(targets) = targets else {
            return ProbeReply::Refused(format!("no host named {host:?}"));
        };
        let now = Instant::now();
        let mut soft = self.soft.lock().expect("paths lock");
        let tracker = soft.probes.entry(host.to_string()).or_default();
        for p in probes {
            if !targets.contains(&(p.node, p.address)) {
                continue;
            }
            let outcome = match p.rtt_us {
                Some(rtt_us) if p.error.is_empty() => ProbeOutcome::Ok { rtt_us },
                _ => ProbeOutcome::Failed { refused: p.refused, error: p.error },
            };
            tracker.record(now, p.node, p.address, outcome);
        }
        // A refused connection turns a path unreachable at once: publish it this round.
        if tracker.evaluate(now) {
            soft.stale.host(host);
        }
        ProbeReply::Accepted
    }

    /// Hands probe results to the leader, wherever it is: here, or over the probe channel.
    pub async fn report(
        &self,
        transport: &dyn Transport,
        host: &str,
        probes: Vec<PathProbe>,
    ) -> Result<(), ReportError> {
        let leader = self.meta.status().leader.ok_or(ReportError::NoLeader)?;
        let reply = if leader == self.me {
            self.take_probes(host, probes)
        } else {
            let msg = ProbeMsg::HostProbes { host: host.to_string(), probes };
            probe_call(transport, leader, &msg, FORWARD_TIMEOUT)
                .await
                .map_err(|e| ReportError::Unavailable(format!("the leader (node {leader}) did not answer: {e}")))?
        };
        match reply {
            ProbeReply::Accepted => Ok(()),
            ProbeReply::Refused(why) => Err(ReportError::Refused(why)),
            ProbeReply::NotLeader(_) => Err(ReportError::NoLeader),
            other => Err(ReportError::Unavailable(format!("unexpected answer {other:?}"))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the cluster has no Raft leader now; retry")]
    NoLeader,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Refused(String),
}

/// Every (node, target port) that `host`'s volumes have paths through.
fn host_targets(map: &ClusterMap, host: &str) -> BTreeSet<(NodeId, SocketAddr)> {
    let Some(h) = map.hosts.get(host) else { return BTreeSet::new() };
    let replicas: BTreeSet<NodeId> =
        h.volumes.iter().filter_map(|id| map.volumes.get(id)).flat_map(|v| v.replicas.iter().copied()).collect();
    replicas
        .into_iter()
        .filter_map(|id| map.nodes.get(&id))
        .flat_map(|n| n.targets().into_iter().map(move |a| (n.id, a)))
        .collect()
}

/// The path map of one host: its connected volumes by name, each with its paths.
pub fn compute_host(
    map: &ClusterMap,
    nodes: &BTreeMap<NodeId, NodeInput>,
    host: &str,
    site: &str,
    probes: &HostProbes,
) -> Vec<VolumePaths> {
    let Some(h) = map.hosts.get(host) else { return Vec::new() };
    let input = HostInput { name: host, site };
    let reach = |node: NodeId, addr: SocketAddr| probes.reach(node, addr);
    let mut out: Vec<VolumePaths> = h
        .volumes
        .iter()
        .filter_map(|id| map.volumes.get(id))
        .map(|v| {
            let volume = VolumeInput {
                name: v.name.clone(),
                primary: v.primary,
                replicas: v.replicas.clone(),
                isr: v.isr.clone(),
                resyncing: v.resync.keys().copied().collect(),
                preferred_site: map.datasets.get(&v.dataset).and_then(|d| d.preferred_site.clone()),
            };
            tandem_paths::volume_paths(&input, &volume, nodes, &reach)
        })
        .collect();
    out.sort_by(|a, b| a.volume.cmp(&b.volume));
    out
}
