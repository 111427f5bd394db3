//! The paths of one volume for one host: state, reason and order.
//!
//! A pure function of the cluster's state (node liveness, the volume's primary and in-sync set)
//! and of the host's probe verdicts. The path manager calls it for every (host, volume) pair
//! whenever an input changes, and publishes the result if it differs from the last one; hence
//! the reasons are stable sentences with no measured numbers in them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tandem_types::NodeId;

use crate::health::Liveness;
use crate::probes::Reach;

/// The state of one path, as in ALUA / NVMe ANA. The derived order is the order of preference.
///
/// Persisted with bincode: no attributes that skip, flatten or guess fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathState {
    /// Send I/O here: the node is (or is about to be) the primary.
    ActiveOptimized,
    /// Works, at a cost: the node proxies I/O to the primary, or this port is slower than
    /// another port of the primary.
    ActiveNonOptimized,
    /// Do not send I/O here.
    Unavailable,
}

impl PathState {
    /// The name used in JSON, in `Display` and by `FromStr`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::ActiveOptimized => "active-optimized",
            PathState::ActiveNonOptimized => "active-non-optimized",
            PathState::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for PathState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`PathState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsePathStateError(pub String);

impl fmt::Display for ParsePathStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown path state {:?}: expected active-optimized, active-non-optimized or unavailable", self.0)
    }
}

impl std::error::Error for ParsePathStateError {}

impl FromStr for PathState {
    type Err = ParsePathStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [PathState::ActiveOptimized, PathState::ActiveNonOptimized, PathState::Unavailable]
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParsePathStateError(s.to_owned()))
    }
}

/// One path of one volume for one host. `path` is the path's name: `n{node}p{port}`, where
/// `port` is the index of `address` in the node's target list (0 = its main NBD address).
///
/// Persisted with bincode: no attributes that skip, flatten or guess fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathEntry {
    pub path: String,
    pub node: NodeId,
    pub address: SocketAddr,
    pub state: PathState,
    /// Why the path is in this state: a stable sentence (no measured numbers), so that it
    /// changes only when the state's cause does.
    pub reason: String,
}

/// The paths of one volume for one host, in order of preference (see [`volume_paths`]).
///
/// Persisted with bincode: no attributes that skip, flatten or guess fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePaths {
    pub volume: String,
    pub paths: Vec<PathEntry>,
}

/// A node as the path computation needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInput {
    pub id: NodeId,
    pub site: String,
    /// The node's target addresses; the index is the path's port (0 = the main NBD address).
    pub targets: Vec<SocketAddr>,
    pub liveness: Liveness,
    /// The node is the Raft leader (a failover candidate other than it is preferred).
    pub raft_leader: bool,
}

/// A volume as the path computation needs it (from the committed cluster map).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInput {
    pub name: String,
    pub primary: NodeId,
    pub replicas: Vec<NodeId>,
    /// The in-sync set, which contains the primary.
    pub isr: Vec<NodeId>,
    /// Replicas outside the in-sync set that are copying what they missed.
    pub resyncing: Vec<NodeId>,
    pub preferred_site: Option<String>,
}

/// The host the paths are computed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostInput<'a> {
    pub name: &'a str,
    pub site: &'a str,
}

/// The failover candidate, deterministic: among `live` (in-sync, up, not the old primary) those
/// in the `preferred` site if there are any, else all of them; of these a node other than
/// `avoid` (the Raft leader's node) if there is one, and then the lowest id. A primary on the
/// Raft leader's node costs two timeouts in a row when that node fails (an election, then the
/// failover), so it goes there only when no other node qualifies. The Raft leader fails over to
/// this node, and [`volume_paths`] steers hosts to it before the failover is committed, so the
/// two must use this one rule.
pub fn pick_primary(
    live: &[NodeId],
    sites: &BTreeMap<NodeId, String>,
    preferred: Option<&str>,
    avoid: Option<NodeId>,
) -> Option<NodeId> {
    let in_preferred = |id: &NodeId| preferred.is_some_and(|site| sites.get(id).is_some_and(|s| s.as_str() == site));
    let local: Vec<NodeId> = live.iter().copied().filter(in_preferred).collect();
    let candidates = if local.is_empty() { live.to_vec() } else { local };
    candidates.iter().copied().filter(|id| Some(*id) != avoid).min().or_else(|| candidates.iter().copied().min())
}

/// The node hosts should send I/O to.
#[derive(Clone, Copy, Debug)]
enum Leader {
    /// The volume's primary, which is up.
    Primary(NodeId),
    /// The primary `old` is down; `node` is the one the failover will choose.
    TakingOver { node: NodeId, old: NodeId },
    /// The primary `old` is down and no in-sync node is up to take over.
    Nobody { old: NodeId },
}

impl Leader {
    fn of(volume: &VolumeInput, nodes: &BTreeMap<NodeId, NodeInput>) -> Leader {
        let is_up = |id: &NodeId| nodes.get(id).is_some_and(|n| n.liveness == Liveness::Up);
        let old = volume.primary;
        // A primary missing from `nodes` cannot serve: it is handled like a down one.
        if is_up(&old) {
            return Leader::Primary(old);
        }
        let live: Vec<NodeId> = volume.isr.iter().copied().filter(|id| *id != old && is_up(id)).collect();
        let sites: BTreeMap<NodeId, String> = nodes.iter().map(|(id, n)| (*id, n.site.clone())).collect();
        let raft_leader = nodes.values().find(|n| n.raft_leader).map(|n| n.id);
        match pick_primary(&live, &sites, volume.preferred_site.as_deref(), raft_leader) {
            Some(node) => Leader::TakingOver { node, old },
            None => Leader::Nobody { old },
        }
    }
}

/// One path before sorting, with what the order needs.
struct Row<'a> {
    entry: PathEntry,
    site: &'a str,
    in_host_site: bool,
    slow: bool,
    port: usize,
}

impl Row<'_> {
    /// State, then the host's own site first (other sites grouped by name), then fast before
    /// slow, then node id and port. Fully determined by the inputs, so the published order
    /// moves only when a state, a site or a speed verdict does.
    fn order_key(&self) -> (PathState, bool, &str, bool, NodeId, usize) {
        (self.entry.state, !self.in_host_site, self.site, self.slow, self.entry.node, self.port)
    }
}

/// The paths of one volume for one host, in order of preference.
///
/// The paths are every target address of every node in `volume.replicas` (nodes missing from
/// `nodes` are skipped). Each gets the first rule that applies:
/// 1. its node is down → unavailable;
/// 2. its node is not in sync → unavailable ("resyncing" if it is copying);
/// 3. the host's probes say the path is unreachable → unavailable;
/// 4. its node is the primary, or the in-sync node that takes over from a down primary
///    ([`pick_primary`]) → active-optimized; but a port the host measures as slow while the
///    node has another port that is fast or unprobed → active-non-optimized;
/// 5. otherwise (an in-sync replica, which proxies to the primary) → active-non-optimized.
///
/// `reach` gives the host's verdict on a path ([`crate::HostProbes::reach`]).
pub fn volume_paths(
    host: &HostInput,
    volume: &VolumeInput,
    nodes: &BTreeMap<NodeId, NodeInput>,
    reach: &dyn Fn(NodeId, SocketAddr) -> Reach,
) -> VolumePaths {
    let leader = Leader::of(volume, nodes);
    let mut seen = BTreeSet::new();
    let mut rows = Vec::new();
    for node in volume.replicas.iter().filter(|id| seen.insert(**id)).filter_map(|id| nodes.get(id)) {
        let reaches: Vec<Reach> = node.targets.iter().map(|address| reach(node.id, *address)).collect();
        // A port of the node that is fast or not yet measured: a slow port gives way to it (the
        // slow port itself is never one, so this is always another port).
        let has_better_port = reaches.iter().any(|r| matches!(r, Reach::Reachable { slow: false } | Reach::Unprobed));
        for (port, (address, path_reach)) in node.targets.iter().zip(&reaches).enumerate() {
            let slow = *path_reach == Reach::Reachable { slow: true };
            let (state, reason) = path_state(node, volume, leader, path_reach, slow && has_better_port);
            rows.push(Row {
                entry: PathEntry {
                    path: format!("n{}p{port}", node.id),
                    node: node.id,
                    address: *address,
                    state,
                    reason,
                },
                site: &node.site,
                in_host_site: node.site == host.site,
                slow,
                port,
            });
        }
    }
    rows.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    VolumePaths { volume: volume.name.clone(), paths: rows.into_iter().map(|row| row.entry).collect() }
}

/// The state and reason of one path of `node` (rules 1 to 5 of [`volume_paths`]).
fn path_state(
    node: &NodeInput,
    volume: &VolumeInput,
    leader: Leader,
    reach: &Reach,
    demote_slow: bool,
) -> (PathState, String) {
    const SLOWER: &str = "but slower from this host than its other paths";
    let id = node.id;
    if let Liveness::Down { why } = &node.liveness {
        return (PathState::Unavailable, format!("node {id} is {why}"));
    }
    if !volume.isr.contains(&id) {
        let reason = if volume.resyncing.contains(&id) { "out of sync (resyncing)" } else { "out of sync" };
        return (PathState::Unavailable, reason.to_owned());
    }
    if let Reach::Unreachable { why } = reach {
        return (PathState::Unavailable, format!("unreachable from this host: {why}"));
    }
    match leader {
        Leader::Primary(primary) if primary == id && demote_slow => {
            (PathState::ActiveNonOptimized, format!("primary, {SLOWER}"))
        }
        Leader::Primary(primary) if primary == id => (PathState::ActiveOptimized, "primary".to_owned()),
        Leader::TakingOver { node, old } if node == id => {
            let reason = format!("takes over from node {old}, which is down (failover pending)");
            if demote_slow {
                (PathState::ActiveNonOptimized, format!("{reason}, {SLOWER}"))
            } else {
                (PathState::ActiveOptimized, reason)
            }
        }
        Leader::Primary(to) | Leader::TakingOver { node: to, .. } => {
            (PathState::ActiveNonOptimized, format!("in-sync replica; proxies I/O to node {to}"))
        }
        Leader::Nobody { old } => (
            PathState::ActiveNonOptimized,
            format!("in-sync replica; the primary, node {old}, is down and no in-sync node can take over"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::*;
    use crate::health::NodeHealth;
    use PathState::{ActiveNonOptimized as Ano, ActiveOptimized as Ao, Unavailable as Ua};

    const SLOW: Reach = Reach::Reachable { slow: true };
    const FAST: Reach = Reach::Reachable { slow: false };

    /// The address of `node`'s `port`.
    fn target(node: NodeId, port: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, node.get() as u8], 10809 + port as u16))
    }

    fn node(id: NodeId, site: &str, ports: usize) -> NodeInput {
        NodeInput {
            id,
            site: site.into(),
            targets: (0..ports).map(|p| target(id, p)).collect(),
            liveness: Liveness::Up,
            raft_leader: false,
        }
    }

    /// Nodes with one port each, all up, from (id, site).
    fn cluster(nodes: &[(u64, &str)]) -> BTreeMap<NodeId, NodeInput> {
        nodes.iter().map(|&(id, site)| (NodeId(id), node(NodeId(id), site, 1))).collect()
    }

    fn down(nodes: &mut BTreeMap<NodeId, NodeInput>, id: u64) {
        nodes.get_mut(&NodeId(id)).unwrap().liveness = Liveness::Down { why: "down for the test".into() };
    }

    fn ids(ids: &[u64]) -> Vec<NodeId> {
        ids.iter().copied().map(NodeId).collect()
    }

    /// A volume "vol" from node numbers: its primary, replicas and in-sync replicas.
    fn volume(primary: u64, replicas: &[u64], isr: &[u64]) -> VolumeInput {
        VolumeInput {
            name: "vol".into(),
            primary: NodeId(primary),
            replicas: ids(replicas),
            isr: ids(isr),
            resyncing: Vec::new(),
            preferred_site: None,
        }
    }

    const HOST: HostInput<'static> = HostInput { name: "host", site: "a" };

    fn unprobed(_: NodeId, _: SocketAddr) -> Reach {
        Reach::Unprobed
    }

    /// (path, state, reason) of every path, in order.
    fn summary(paths: &VolumePaths) -> Vec<(&str, PathState, &str)> {
        paths.paths.iter().map(|p| (p.path.as_str(), p.state, p.reason.as_str())).collect()
    }

    #[test]
    fn primary_is_optimized_in_sync_replicas_proxy_and_the_rest_are_unavailable() {
        let nodes = cluster(&[(1, "a"), (2, "a"), (3, "a"), (4, "a")]);
        let mut vol = volume(1, &[1, 2, 3, 4], &[1, 2]);
        vol.resyncing = vec![NodeId(3)];
        let paths = volume_paths(&HOST, &vol, &nodes, &unprobed);
        assert_eq!(paths.volume, "vol");
        assert_eq!(
            summary(&paths),
            [
                ("n1p0", Ao, "primary"),
                ("n2p0", Ano, "in-sync replica; proxies I/O to node 1"),
                ("n3p0", Ua, "out of sync (resyncing)"),
                ("n4p0", Ua, "out of sync"),
            ]
        );
        assert_eq!(paths.paths[0].node, NodeId(1));
        assert_eq!(paths.paths[0].address, target(NodeId(1), 0));
    }

    #[test]
    fn a_down_node_is_unavailable_whatever_else_holds() {
        let mut nodes = cluster(&[(1, "a"), (2, "a"), (3, "a")]);
        down(&mut nodes, 2);
        down(&mut nodes, 3);
        let paths = volume_paths(&HOST, &volume(1, &[1, 2, 3], &[1, 2]), &nodes, &unprobed);
        assert_eq!(
            summary(&paths),
            [
                ("n1p0", Ao, "primary"),
                ("n2p0", Ua, "node 2 is down for the test"),
                ("n3p0", Ua, "node 3 is down for the test"),
            ]
        );
    }

    #[test]
    fn when_the_primary_is_down_the_lowest_in_sync_node_takes_over() {
        let mut nodes = cluster(&[(1, "a"), (2, "a"), (3, "a"), (4, "a")]);
        down(&mut nodes, 1);
        // 2 is out of sync, so 3 is the candidate though 2 is lower.
        let paths = volume_paths(&HOST, &volume(1, &[1, 2, 3, 4], &[1, 3, 4]), &nodes, &unprobed);
        assert_eq!(
            summary(&paths),
            [
                ("n3p0", Ao, "takes over from node 1, which is down (failover pending)"),
                ("n4p0", Ano, "in-sync replica; proxies I/O to node 3"),
                ("n1p0", Ua, "node 1 is down for the test"),
                ("n2p0", Ua, "out of sync"),
            ]
        );
    }

    #[test]
    fn the_takeover_respects_the_preferred_site() {
        let mut nodes = cluster(&[(1, "a"), (2, "b"), (3, "a"), (4, "a")]);
        down(&mut nodes, 1);
        let mut vol = volume(1, &[1, 2, 3, 4], &[1, 2, 3, 4]);
        vol.preferred_site = Some("a".into());
        let paths = volume_paths(&HOST, &vol, &nodes, &unprobed);
        assert_eq!(paths.paths[0].path, "n3p0");
        assert_eq!(paths.paths[0].state, Ao);
        // The host's site is "b" now: the order changes, the candidate does not.
        let host_b = HostInput { name: "host", site: "b" };
        let paths = volume_paths(&host_b, &vol, &nodes, &unprobed);
        assert_eq!(paths.paths[0].path, "n3p0");
        assert_eq!(paths.paths.iter().filter(|p| p.state == Ao).count(), 1);
    }

    #[test]
    fn pick_primary_prefers_the_site_then_the_lowest_id() {
        let sites: BTreeMap<NodeId, String> = [(1, "a"), (2, "b"), (5, "b"), (7, "c")]
            .into_iter()
            .map(|(id, site)| (NodeId(id), site.to_owned()))
            .collect();
        assert_eq!(pick_primary(&[NodeId(7), NodeId(5), NodeId(2)], &sites, Some("b"), None), Some(NodeId(2)));
        assert_eq!(pick_primary(&[NodeId(7), NodeId(5), NodeId(1)], &sites, Some("b"), None), Some(NodeId(5)));
        assert_eq!(pick_primary(&[NodeId(7), NodeId(5), NodeId(1)], &sites, Some("c"), None), Some(NodeId(7)));
        assert_eq!(
            pick_primary(&[NodeId(7), NodeId(5), NodeId(2)], &sites, Some("a"), None),
            Some(NodeId(2)),
            "no live node in the site"
        );
        assert_eq!(pick_primary(&[NodeId(7), NodeId(5), NodeId(2)], &sites, None, None), Some(NodeId(2)));
        assert_eq!(pick_primary(&[], &sites, Some("a"), None), None);
    }

    #[test]
    fn pick_primary_keeps_off_the_raft_leader_within_the_preferred_site() {
        let sites: BTreeMap<NodeId, String> = [(1, "a"), (2, "b"), (5, "b"), (7, "c")]
            .into_iter()
            .map(|(id, site)| (NodeId(id), site.to_owned()))
            .collect();
        assert_eq!(
            pick_primary(&[NodeId(7), NodeId(5), NodeId(2)], &sites, Some("b"), Some(NodeId(2))),
            Some(NodeId(5))
        );
        assert_eq!(pick_primary(&[NodeId(7), NodeId(5), NodeId(2)], &sites, None, Some(NodeId(2))), Some(NodeId(5)));
        assert_eq!(
            pick_primary(&[NodeId(7), NodeId(2)], &sites, Some("b"), Some(NodeId(2))),
            Some(NodeId(2)),
            "the site comes first"
        );
        assert_eq!(
            pick_primary(&[NodeId(2)], &sites, None, Some(NodeId(2))),
            Some(NodeId(2)),
            "the leader if no one else"
        );
        assert_eq!(
            pick_primary(&[NodeId(7), NodeId(5), NodeId(2)], &sites, Some("b"), Some(NodeId(9))),
            Some(NodeId(2))
        );
    }

    #[test]
    fn with_no_candidate_no_path_is_optimized() {
        let mut nodes = cluster(&[(1, "a"), (2, "a"), (3, "a")]);
        down(&mut nodes, 1);
        down(&mut nodes, 2);
        let paths = volume_paths(&HOST, &volume(1, &[1, 2, 3], &[1, 2]), &nodes, &unprobed);
        assert!(paths.paths.iter().all(|p| p.state == Ua), "{:?}", summary(&paths));
    }

    #[test]
    fn a_primary_missing_from_the_nodes_is_handled_like_a_down_one() {
        let nodes = cluster(&[(2, "a"), (3, "a")]);
        let paths = volume_paths(&HOST, &volume(1, &[1, 2, 3], &[1, 2, 3]), &nodes, &unprobed);
        assert_eq!(
            summary(&paths),
            [
                ("n2p0", Ao, "takes over from node 1, which is down (failover pending)"),
                ("n3p0", Ano, "in-sync replica; proxies I/O to node 2"),
            ]
        );
    }

    #[test]
    fn an_unreachable_primary_leaves_no_optimized_path() {
        let nodes = cluster(&[(1, "a"), (2, "a"), (3, "a")]);
        let reach = |node: NodeId, _: SocketAddr| {
            if node == NodeId(1) {
                Reach::Unreachable { why: "connection refused".into() }
            } else {
                FAST
            }
        };
        let paths = volume_paths(&HOST, &volume(1, &[1, 2, 3], &[1, 2, 3]), &nodes, &reach);
        assert_eq!(
            summary(&paths),
            [
                ("n2p0", Ano, "in-sync replica; proxies I/O to node 1"),
                ("n3p0", Ano, "in-sync replica; proxies I/O to node 1"),
                ("n1p0", Ua, "unreachable from this host: connection refused"),
            ]
        );
    }

    /// The primary (node 1) has two ports; node 2 is an in-sync replica with two ports.
    fn two_ports(reach: &dyn Fn(NodeId, SocketAddr) -> Reach) -> Vec<(String, PathState, String)> {
        let nodes: BTreeMap<_, _> =
            [(NodeId(1), node(NodeId(1), "a", 2)), (NodeId(2), node(NodeId(2), "a", 2))].into_iter().collect();
        let paths = volume_paths(&HOST, &volume(1, &[1, 2], &[1, 2]), &nodes, reach);
        paths.paths.into_iter().map(|p| (p.path, p.state, p.reason)).collect()
    }

    fn owned(rows: &[(&str, PathState, &str)]) -> Vec<(String, PathState, String)> {
        rows.iter().map(|(path, state, reason)| (path.to_string(), *state, reason.to_string())).collect()
    }

    #[test]
    fn a_slow_port_of_the_primary_gives_way_to_its_other_port() {
        let port0_slow = |_: NodeId, address: SocketAddr| if address.port() == 10809 { SLOW } else { FAST };
        assert_eq!(
            two_ports(&port0_slow),
            owned(&[
                ("n1p1", Ao, "primary"),
                // Fast before slow, then node id.
                ("n2p1", Ano, "in-sync replica; proxies I/O to node 1"),
                ("n1p0", Ano, "primary, but slower from this host than its other paths"),
                ("n2p0", Ano, "in-sync replica; proxies I/O to node 1"),
            ])
        );
        // An unprobed port counts as a better one too.
        let port1_unprobed =
            |_: NodeId, address: SocketAddr| if address.port() == 10809 { SLOW } else { Reach::Unprobed };
        let rows = two_ports(&port1_unprobed);
        assert_eq!(rows[0], owned(&[("n1p1", Ao, "primary")])[0]);
        assert!(rows.iter().any(|(path, state, _)| path == "n1p0" && *state == Ano), "{rows:?}");
    }

    #[test]
    fn a_slow_port_stays_optimized_when_no_other_port_is_better() {
        let all_slow = |_: NodeId, _: SocketAddr| SLOW;
        let rows = two_ports(&all_slow);
        assert_eq!(rows[..2], owned(&[("n1p0", Ao, "primary"), ("n1p1", Ao, "primary")]));
        let other_unreachable = |_: NodeId, address: SocketAddr| {
            if address.port() == 10809 {
                SLOW
            } else {
                Reach::Unreachable { why: "timed out".into() }
            }
        };
        let rows = two_ports(&other_unreachable);
        assert_eq!(rows[0], owned(&[("n1p0", Ao, "primary")])[0]);
    }

    #[test]
    fn a_slow_port_of_the_takeover_candidate_gives_way_too() {
        let mut nodes: BTreeMap<_, _> =
            [(NodeId(1), node(NodeId(1), "a", 1)), (NodeId(2), node(NodeId(2), "a", 2))].into_iter().collect();
        down(&mut nodes, 1);
        let reach =
            |node: NodeId, address: SocketAddr| if node == NodeId(2) && address.port() == 10809 { SLOW } else { FAST };
        let paths = volume_paths(&HOST, &volume(1, &[1, 2], &[1, 2]), &nodes, &reach);
        assert_eq!(
            summary(&paths)[..2],
            [
                ("n2p1", Ao, "takes over from node 1, which is down (failover pending)"),
                (
                    "n2p0",
                    Ano,
                    "takes over from node 1, which is down (failover pending), but slower from this host than its \
                     other paths"
                ),
            ]
        );
    }

    #[test]
    fn order_is_state_then_own_site_then_site_then_speed_then_node_and_port() {
        let nodes = cluster(&[(1, "c"), (2, "b"), (3, "c"), (4, "b"), (5, "a"), (6, "b"), (7, "a")]);
        let mut vol = volume(7, &[1, 2, 3, 4, 5, 6, 7], &[1, 2, 3, 4, 5, 6, 7]);
        vol.isr.retain(|id| *id != NodeId(6));
        let reach = |node: NodeId, _: SocketAddr| if node == NodeId(2) { SLOW } else { FAST };
        let host = HostInput { name: "host", site: "b" };
        let order: Vec<_> = volume_paths(&host, &vol, &nodes, &reach).paths.into_iter().map(|p| p.path).collect();
        // 7 is the primary; then the host's site b (4, then the slow 2), then site a (5), then
        // site c (1, 3); the out-of-sync 6 last.
        assert_eq!(order, ["n7p0", "n4p0", "n2p0", "n5p0", "n1p0", "n3p0", "n6p0"]);
    }

    #[test]
    fn nodes_missing_from_the_map_and_repeated_replicas_are_skipped() {
        let nodes = cluster(&[(1, "a"), (2, "a")]);
        let paths = volume_paths(&HOST, &volume(1, &[1, 2, 2, 9], &[1, 2]), &nodes, &unprobed);
        let names: Vec<_> = paths.paths.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(names, ["n1p0", "n2p0"]);
    }

    #[test]
    fn the_reason_of_a_down_node_does_not_change_with_time() {
        let t0 = Instant::now();
        let reason_at = |at: Duration| {
            let mut health = NodeHealth::new();
            health.observe(t0, true);
            health.observe(t0 + at, false);
            let mut nodes = cluster(&[(1, "a"), (2, "a")]);
            nodes.get_mut(&NodeId(2)).unwrap().liveness = health.liveness();
            let paths = volume_paths(&HOST, &volume(1, &[1, 2], &[1, 2]), &nodes, &unprobed);
            paths.paths[1].reason.clone()
        };
        let first = reason_at(Duration::from_millis(751));
        assert!(first.starts_with("node 2 is down"), "{first}");
        for at_ms in [800, 2_000, 60_000] {
            assert_eq!(reason_at(Duration::from_millis(at_ms)), first);
        }
    }

    #[test]
    fn reasons_carry_no_numbers_but_node_ids() {
        let mut nodes: BTreeMap<_, _> = (1..=6).map(|id| (NodeId(id), node(NodeId(id), "a", 2))).collect();
        down(&mut nodes, 1);
        let mut vol = volume(1, &[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4]);
        vol.resyncing = vec![NodeId(5)];
        let reach = |node: NodeId, address: SocketAddr| match (node, address.port()) {
            (NodeId(2), 10809) => SLOW,
            (NodeId(4), _) => Reach::Unreachable { why: "connection refused".into() },
            _ => FAST,
        };
        let paths = volume_paths(&HOST, &vol, &nodes, &reach);
        let mut seen_states = BTreeSet::new();
        for entry in &paths.paths {
            seen_states.insert(entry.state);
            let mut text = entry.reason.clone();
            for id in 1..=6 {
                text = text.replace(&format!("node {id}"), "node N");
            }
            assert!(!text.chars().any(|c| c.is_ascii_digit()), "{}: {:?}", entry.path, entry.reason);
        }
        assert_eq!(seen_states.len(), 3, "the scenario covers every state");
    }

    #[test]
    fn path_states_have_one_name_everywhere() {
        for (state, name) in [(Ao, "active-optimized"), (Ano, "active-non-optimized"), (Ua, "unavailable")] {
            assert_eq!(state.to_string(), name);
            assert_eq!(name.parse::<PathState>(), Ok(state));
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<PathState>(&format!("\"{name}\"")).unwrap(), state);
        }
        assert_eq!("optimized".parse::<PathState>(), Err(ParsePathStateError("optimized".into())));
    }

    #[test]
    fn volume_paths_round_trip_through_bincode() {
        let nodes = cluster(&[(1, "a"), (2, "a")]);
        let paths = volume_paths(&HOST, &volume(1, &[1, 2], &[1]), &nodes, &unprobed);
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&paths, config).unwrap();
        let (decoded, read): (VolumePaths, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(read, bytes.len());
        assert_eq!(decoded, paths);
    }

    fn reach_strategy() -> impl Strategy<Value = Reach> {
        prop_oneof![Just(Reach::Unprobed), Just(FAST), Just(SLOW), Just(Reach::Unreachable { why: "timed out".into() }),]
    }

    proptest! {
        /// Whatever the inputs: every path is listed once, in order, at most one node is
        /// optimized and it is the primary or the takeover candidate, and the result is a pure
        /// function of the inputs.
        #[test]
        fn paths_are_complete_ordered_and_have_one_optimized_node(
            specs in proptest::collection::vec((0..3usize, 1..4usize, any::<bool>(), any::<bool>()), 1..7),
            primary_index in 0..7usize,
            reaches in proptest::collection::vec(reach_strategy(), 24),
            preferred in proptest::option::of(0..3usize),
        ) {
            let sites = ["a", "b", "c"];
            let mut nodes = BTreeMap::new();
            let mut vol = volume(0, &[], &[]);
            for (i, &(site, ports, up, in_sync)) in specs.iter().enumerate() {
                let id = NodeId(i as u64 + 1);
                let mut n = node(id, sites[site], ports);
                if !up {
                    n.liveness = Liveness::Down { why: "down".into() };
                }
                nodes.insert(id, n);
                vol.replicas.push(id);
                if in_sync {
                    vol.isr.push(id);
                }
            }
            vol.primary = NodeId((primary_index % specs.len()) as u64 + 1);
            if !vol.isr.contains(&vol.primary) {
                vol.isr.push(vol.primary);
                vol.isr.sort();
            }
            vol.preferred_site = preferred.map(|s| sites[s].to_owned());
            let reach = |node: NodeId, address: SocketAddr| {
                reaches[(node.get() as usize * 4 + usize::from(address.port() - 10809)) % reaches.len()].clone()
            };
            let paths = volume_paths(&HOST, &vol, &nodes, &reach);
            prop_assert_eq!(&paths, &volume_paths(&HOST, &vol, &nodes, &reach));

            let total: usize = specs.iter().map(|s| s.1).sum();
            prop_assert_eq!(paths.paths.len(), total);
            prop_assert!(paths.paths.windows(2).all(|w| w[0].state <= w[1].state));
            let optimized: BTreeSet<NodeId> =
                paths.paths.iter().filter(|p| p.state == Ao).map(|p| p.node).collect();
            prop_assert!(optimized.len() <= 1);
            if let Some(&leader) = optimized.iter().next() {
                let primary_up = nodes[&vol.primary].liveness == Liveness::Up;
                prop_assert!(vol.isr.contains(&leader));
                prop_assert_eq!(leader == vol.primary, primary_up);
            }
            for entry in &paths.paths {
                let n = &nodes[&entry.node];
                let usable = n.liveness == Liveness::Up
                    && vol.isr.contains(&entry.node)
                    && !matches!(reach(entry.node, entry.address), Reach::Unreachable { .. });
                prop_assert_eq!(entry.state != Ua, usable, "{:?}", entry);
            }
        }
    }
}
